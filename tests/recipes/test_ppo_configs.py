"""The PPO configs: yaml/ppo_llama2.yaml holds the paper's HH-RLHF settings, and the Table-3 ablation ladder adds
exactly one trick per rung (Xu et al., arXiv 2404.10719, Sec. 5 and Table 3)."""

import yaml

from tests.conftest import REPO

LADDER = ["ppo_base", "ppo_advnorm", "ppo_largebatch", "ppo_ema"]
EMA = "callbacks.ema_reference.EMAReference"


def flat(tree, prefix=""):
    """Dotted keys of a YAML tree; lists of callbacks become their class paths."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key == "callbacks":
            out[name] = tuple(c["class_path"] for c in value or [])
        elif isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def load(rel):
    return flat(yaml.safe_load((REPO / "yaml" / rel).read_text()))


def test_ppo_llama2_has_the_papers_settings():
    cfg, m = load("ppo_llama2.yaml"), "model.init_args."
    devices, per_gpu = cfg["trainer.devices"], cfg["data.init_args.rollout_batch_size"]
    mini = cfg[m + "mini_batch_size"]
    assert devices * per_gpu == 512 and per_gpu // mini == 4  # rollout batch 512 in 4 minibatches
    assert cfg[m + "optimizer.init_args.lr"] == 1e-5 and cfg[m + "critic_optimizer.init_args.lr"] == 5e-6
    expected = {"temperature": 1.0, "top_k": 200, "gamma": 1.0, "lam": 1.0, "kl_coef": 0.1, "reward_clip": 20.0,
                "normalize_advantages": True, "normalize_values": True, "max_new_tokens": 256}
    assert {k: cfg[m + k] for k in expected} == expected
    assert EMA in cfg["trainer.callbacks"]
    assert cfg[m + "critic.name_or_path"] == cfg[m + "reward.init_args.path"]  # critic starts from the reward model


def test_ablation_ladder_adds_one_trick_per_rung():
    rungs = [load(f"ablations/{name}.yaml") for name in LADDER]
    paths = {"trainer.default_root_dir", "trainer.logger.init_args.save_dir"}  # each rung writes its own folder
    diffs = [{k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - paths for a, b in zip(rungs, rungs[1:])]
    m = "model.init_args."
    assert diffs == [{m + "normalize_advantages"}, {"data.init_args.rollout_batch_size"}, {"trainer.callbacks"}]
    base, advnorm, large, ema = rungs
    assert base[m + "normalize_advantages"] is False and advnorm[m + "normalize_advantages"] is True
    assert [r["data.init_args.rollout_batch_size"] // r[m + "mini_batch_size"] for r in (advnorm, large)] == [1, 4]
    assert EMA not in large["trainer.callbacks"] and EMA in ema["trainer.callbacks"]
