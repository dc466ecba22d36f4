"""Two processes on CPU (gloo): DDP and FSDP2 (Lightning's ModelParallelStrategy) give the weights of one process
on the same global batch, for SFT, DPO and PPO; a sharded checkpoint resumes and exports to a folder that plain
transformers loads. Marker `distributed`; the CLI cases are also `slow` (each launches `python -m recipes fit` as a user
would, a few steps of a tiny model; 20-90 s per run on a loaded 2-core machine)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = pytest.mark.distributed

STEPS = 4
GLOBAL_BATCH = 4
TOLERANCE = 1e-4  # float sums reordered across ranks; Adam's first steps amplify 1e-7 gradient noise to ~1e-5
PPO_TOLERANCE = 5e-4  # PPO: rollout forwards on differently padded batches add ~1e-7 noise to every input as well
FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}


def _skip_without_gloo() -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def _run(cmd: list[str], tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_RECIPES_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _fit(tmp_path, name: str, devices: int, strategy, global_batch: int = GLOBAL_BATCH,
         config: str = "yaml/tiny/sft.yaml", extra: tuple[str, ...] | None = None, steps: int = STEPS,
         callbacks: tuple[dict, ...] = (), batch_arg: str = "batch_size") -> dict[str, torch.Tensor]:
    out = tmp_path / name
    export = {"class_path": "recipes.callbacks.hf_export.HFExport", "init_args": {"dirpath": str(out / "hf")}}
    if extra is None:  # SFT: a per-rank mean of per-sequence means is exact
        extra = ("--model.init_args.loss_reduction", "sequence", "--data.init_args.max_rows", "200",
                 "--trainer.gradient_clip_val", "null", "--model.init_args.scheduler.init_args.warmup_steps", "0")
    checkpointing = any("ModelCheckpoint" in c["class_path"] for c in callbacks)
    cmd = [sys.executable, "-m", "recipes", "fit", "--config", config,
           "--trainer.max_steps", str(steps), "--trainer.devices", str(devices),
           "--trainer.strategy", json.dumps(strategy) if isinstance(strategy, dict) else strategy,
           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_checkpointing", str(checkpointing).lower(), "--trainer.limit_val_batches", "0",
           "--trainer.default_root_dir", str(out), "--trainer.callbacks", json.dumps([*callbacks, export]),
           f"--data.init_args.{batch_arg}", str(global_batch // devices), *extra]
    _run(cmd, tmp_path)
    return load_file(out / "hf" / "model.safetensors")


def _assert_same(double: dict, single: dict, tolerance: float, label: str) -> None:
    assert single.keys() == double.keys()
    for name, value in single.items():
        torch.testing.assert_close(double[name], value, atol=tolerance, rtol=tolerance, msg=f"{label}: {name}")


def _gap(a: dict, b: dict) -> float:
    return max((a[k] - v).abs().max().item() for k, v in b.items())


@pytest.mark.slow
def test_ddp_and_fsdp2_match_one_process(tmp_path):
    """Same global batch of 4: one process x 4, DDP 2 x 2, FSDP2 2 x 2 end with the same weights (to 1e-4), while
    a control run on a different global batch (2) ends measurably elsewhere, so the comparison has teeth."""
    _skip_without_gloo()
    single = _fit(tmp_path, "single", 1, "auto")
    control = _fit(tmp_path, "control", 1, "auto", global_batch=2)
    assert _gap(control, single) > 100 * TOLERANCE
    for label, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        _assert_same(_fit(tmp_path, f"double-{label}", 2, strategy), single, TOLERANCE, label)


@pytest.mark.slow
def test_fsdp2_lora_matches_one_process_and_exports_merged(tmp_path):
    """LoRA under FSDP2 (frozen base weights and trainable adapters in the same units): 2 x 2 rows end where 1 x 4
    does, and the sharded model exports with the adapter merged (gathered, then
    `recipes.modules.export.merged_lora_state_dict`) into a plain folder that transformers loads; the adapter it merged
    has been trained (its B matrices, zero at init, are not)."""
    _skip_without_gloo()
    from transformers import AutoModelForCausalLM

    lora = ("--model.init_args.loss_reduction", "sequence", "--data.init_args.max_rows", "200",
            "--trainer.gradient_clip_val", "null", "--model.init_args.scheduler.init_args.warmup_steps", "0",
            "--model.init_args.model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}))
    adapter = {"class_path": "recipes.callbacks.hf_export.HFExport",
               "init_args": {"dirpath": str(tmp_path / "adapter"), "merge_lora": False}}
    single = _fit(tmp_path, "lora-single", 1, "auto", extra=lora)
    double = _fit(tmp_path, "lora-fsdp2", 2, FSDP2, extra=lora, callbacks=(adapter,))
    assert not any("lora" in name for name in double)
    _assert_same(double, single, TOLERANCE, "fsdp2 lora")
    trained = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 1e-3
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lora-fsdp2" / "hf") is not None


@pytest.mark.slow
def test_reward_model_ddp_and_fsdp2_match_one_process(tmp_path):
    """The reward model's pairwise loss is a per-pair mean: 2 x 2 pairs end where 1 x 4 does under DDP and FSDP2
    (backbone layers and head sharded: `recipes.modules.sharding.fsdp2_shard_scalar`). Before the reward model was
    sharded, each FSDP2 rank trained its own unsynchronized copy and the export differed from the checkpoint."""
    _skip_without_gloo()
    rm = ("--data.init_args.max_rows", "120", "--trainer.gradient_clip_val", "null",
          "--model.init_args.scheduler.init_args.warmup_steps", "0")
    kwargs = dict(config="yaml/tiny/reward.yaml", extra=rm)
    single = _fit(tmp_path, "rm-single", 1, "auto", **kwargs)
    control = _fit(tmp_path, "rm-control", 1, "auto", global_batch=2, **kwargs)
    assert _gap(control, single) > 10 * TOLERANCE
    for label, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        _assert_same(_fit(tmp_path, f"rm-{label}", 2, strategy, **kwargs), single, TOLERANCE, f"reward {label}")


@pytest.mark.slow
def test_rrhf_and_pro_under_fsdp2_match_one_process(tmp_path):
    """The ranking baselines (RRHF, PRO) under FSDP2: 2 x 2 ranked lists end where 1 x 4 do (1e-4), while RRHF on
    another global batch ends elsewhere."""
    _skip_without_gloo()
    ranking = ("--data.init_args.max_rows", "120", "--trainer.gradient_clip_val", "null",
               "--model.init_args.scheduler.init_args.warmup_steps", "0")
    for name in ("rrhf", "pro"):
        kwargs = dict(config=f"yaml/tiny/{name}.yaml", extra=ranking)
        single = _fit(tmp_path, f"{name}-single", 1, "auto", **kwargs)
        if name == "rrhf":
            control = _fit(tmp_path, "rrhf-control", 1, "auto", global_batch=2, **kwargs)
            assert _gap(control, single) > 10 * TOLERANCE
        _assert_same(_fit(tmp_path, f"{name}-fsdp2", 2, FSDP2, **kwargs), single, TOLERANCE, f"{name} fsdp2")


@pytest.mark.slow
def test_dpo_ddp_and_fsdp2_match_one_process_with_frozen_and_precomputed_reference(tmp_path):
    """DPO's per-pair mean is exact under data parallelism: 2 x 2 pairs end where 1 x 4 does under DDP and FSDP2,
    with a frozen reference copy (sharded like the policy under FSDP2) and with the precomputed reference (each
    rank computes its shard of the table, all-gathered)."""
    _skip_without_gloo()
    dpo = ("--data.init_args.max_rows", "120", "--trainer.gradient_clip_val", "null",
           "--model.init_args.scheduler.init_args.warmup_steps", "0")
    single = _fit(tmp_path, "dpo-single", 1, "auto", config="yaml/tiny/dpo.yaml", extra=dpo)
    control = _fit(tmp_path, "dpo-control", 1, "auto", global_batch=2, config="yaml/tiny/dpo.yaml", extra=dpo)
    assert _gap(control, single) > 10 * TOLERANCE
    for label, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        for mode in ("frozen_copy", "precomputed"):
            double = _fit(tmp_path, f"dpo-{label}-{mode}", 2, strategy, config="yaml/tiny/dpo.yaml",
                          extra=(*dpo, "--model.init_args.reference_mode", mode))
            _assert_same(double, single, TOLERANCE, f"{label} {mode}")


@pytest.mark.slow
def test_ppo_ddp_and_fsdp2_match_one_process_with_ema_reference(tmp_path):
    """PPO, 2 iterations of a rollout of 8 prompts (greedy, so every layout samples the same responses), one
    minibatch, 4 epochs, an EMA reference (eta 0.5), advantage whitening and a reward-model reward (sharded under
    FSDP2, 3 rows per forward): 2 x 4 prompts under DDP and FSDP2 end where 1 x 8 does (to 5e-4), while a rollout of
    4 prompts ends elsewhere. This holds only because whitening,
    the token-weighted losses and the target-KL test use statistics of every rank (`recipes.modules.distributed`), and
    under FSDP2 the sampling loop runs on gathered weights and EMA lerps the local shards of policy and reference."""
    _skip_without_gloo()
    from recipes.modules.tokenizer import load_tokenizer
    from tests.modules.test_ppo import _save_reward_model

    # FSDP2 shards the reward model (DDP: a copy per rank)
    reward = {"class_path": "recipes.modules.reward_functions.SequenceClassifierReward",
              "init_args": {"path": _save_reward_model(tmp_path / "rm", load_tokenizer("builtin:byte")),
                            "batch_size": 3}}
    ppo = ("--model.init_args.temperature", "0", "--model.init_args.mini_batch_size", "null",
           "--model.init_args.normalize_values", "true", "--model.init_args.target_kl", "1000.0",
           "--model.init_args.reward", json.dumps(reward))
    ema = ({"class_path": "recipes.callbacks.ema_reference.EMAReference", "init_args": {"eta": 0.5}},)
    kwargs = dict(config="yaml/tiny/ppo.yaml", extra=ppo, steps=2, callbacks=ema, batch_arg="rollout_batch_size")
    single = _fit(tmp_path, "ppo-single", 1, "auto", global_batch=8, **kwargs)
    control = _fit(tmp_path, "ppo-control", 1, "auto", global_batch=4, **kwargs)
    assert _gap(control, single) > 10 * PPO_TOLERANCE
    for label, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        double = _fit(tmp_path, f"ppo-{label}", 2, strategy, global_batch=8, **kwargs)
        _assert_same(double, single, PPO_TOLERANCE, f"ppo {label}")


@pytest.mark.slow
def test_ppo_lora_with_ema_adapter_under_fsdp2_matches_one_process(tmp_path):
    """LoRA PPO (policy and critic) with an EMA reference adapter: ``EMAReference`` plans its adapter
    (`recipes.modules.adapters.plan_adapter`) and ``configure_model`` adds it before FSDP2 shards the policy, so it is
    sharded like the policy's adapter and lerped on local shards. 2 x 4 prompts end where 1 x 8 does (merged exports, to
    5e-4), while a rollout of 4 prompts ends elsewhere; the sharded checkpoint exports (`python -m recipes.export`)
    to exactly what the run exported."""
    _skip_without_gloo()
    lora = json.dumps({"r": 4, "alpha": 8, "dropout": 0.0})
    ppo = ("--model.init_args.temperature", "0", "--model.init_args.mini_batch_size", "null",
           "--model.init_args.target_kl", "1000.0", "--model.init_args.model.lora", lora,
           "--model.init_args.critic.lora", json.dumps({**json.loads(lora), "modules_to_save": ["score"]}))
    ema = ({"class_path": "recipes.callbacks.ema_reference.EMAReference", "init_args": {"eta": 0.5}},)
    kwargs = dict(config="yaml/tiny/ppo.yaml", extra=ppo, steps=2, callbacks=ema, batch_arg="rollout_batch_size")
    single = _fit(tmp_path, "lora-ppo-single", 1, "auto", global_batch=8, **kwargs)
    control = _fit(tmp_path, "lora-ppo-control", 1, "auto", global_batch=4, **kwargs)
    assert _gap(control, single) > 10 * PPO_TOLERANCE
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts"), "every_n_train_steps": 2, "filename": "{step}"}}
    double = _fit(tmp_path, "lora-ppo-fsdp2", 2, FSDP2, global_batch=8, **{**kwargs, "callbacks": (*ema, ckpt)})
    _assert_same(double, single, PPO_TOLERANCE, "lora ppo fsdp2")
    # the sharded checkpoint (base, policy and EMA adapters, critic) exports, merged, to what the run exported
    out = tmp_path / "exported"
    _run([sys.executable, "-m", "recipes.export", "--config", str(tmp_path / "lora-ppo-fsdp2" / "config.yaml"),
          "--ckpt_path", str(tmp_path / "ckpts" / "step=2.ckpt"), "--out", str(out)], tmp_path)
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == double.keys() and all(torch.equal(exported[k], v) for k, v in double.items())


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_match_one_process(tmp_path, monkeypatch):
    """Lightning's DeepSpeedStrategy on 2 CPU processes (``tests/deepspeed_cpu`` bypasses only its CUDA device
    bookkeeping): SFT under ZeRO-2 and ZeRO-3 and DPO with the precomputed reference under ZeRO-3 (each rank's share
    of the reference pass on partitioned weights, equal forward counts) end where one process ends on the same global
    batch (1e-4), and the HF export of the ZeRO-3 runs gathers the partitions; PPO under ZeRO-2 (one optimizer, two
    parameter groups, micro-batched) ends where one process does (5e-4). The runs start from one saved model:
    a random init inside ``deepspeed.zero.Init`` draws other weights than a plain one."""
    _skip_without_gloo()
    pytest.importorskip("deepspeed")
    from recipes.modules.models import ModelSpec, build_causal_lm
    from recipes.modules.tokenizer import load_tokenizer
    from tests.conftest import TINY_LLAMA

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests" / "deepspeed_cpu"), str(REPO)]))
    tok = load_tokenizer("builtin:byte")
    build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), tok).save_pretrained(tmp_path / "init")
    tok.save_pretrained(tmp_path / "init")
    start = ("--model.init_args.model.name_or_path", str(tmp_path / "init"), "--trainer.gradient_clip_val", "null",
             "--model.init_args.scheduler.init_args.warmup_steps", "0")
    sft = (*start, "--model.init_args.loss_reduction", "sequence", "--data.init_args.max_rows", "200")
    dpo = (*start, "--data.init_args.max_rows", "120", "--model.init_args.reference_mode", "precomputed")
    for name, config, extra, stages in (("sft", "yaml/tiny/sft.yaml", sft, (2, 3)),
                                        ("dpo", "yaml/tiny/dpo.yaml", dpo, (3,))):
        single = _fit(tmp_path, f"{name}-single", 1, "auto", config=config, extra=extra)
        for stage in stages:
            strategy = {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": stage}}
            double = _fit(tmp_path, f"{name}-zero{stage}", 2, strategy, config=config, extra=extra)
            _assert_same(double, single, TOLERANCE, f"{name} zero-{stage}")
    # PPO under ZeRO-2: actor and critic are two parameter groups of DeepSpeed's one optimizer; 2 micro-batches per
    # step (DeepSpeed must be told where the accumulation ends), an EMA reference, whitening and value normalization
    ppo = ("--model.init_args.temperature", "0", "--model.init_args.mini_batch_size", "null",
           "--model.init_args.micro_batch_size", "2", "--model.init_args.max_grad_norm", "null",
           "--model.init_args.normalize_values", "true", "--model.init_args.target_kl", "1000.0")
    ema = ({"class_path": "recipes.callbacks.ema_reference.EMAReference", "init_args": {"eta": 0.5}},)
    kwargs = dict(config="yaml/tiny/ppo.yaml", extra=ppo, steps=2, callbacks=ema, batch_arg="rollout_batch_size",
                  global_batch=8)
    single = _fit(tmp_path, "ppo-single", 1, "auto", **kwargs)
    zero2 = {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 2}}
    _assert_same(_fit(tmp_path, "ppo-zero2", 2, zero2, **kwargs), single, PPO_TOLERANCE, "ppo zero-2")


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_resumes_and_exports(tmp_path):
    """FSDP2, 2 processes: 2 steps write a distributed checkpoint (a folder of shards); a second run resumes from it
    for 2 more steps and ends where 4 uninterrupted steps end (1e-6: same layout, same order of operations); its
    step-4 checkpoint, exported in one CPU process by `python -m recipes.export`, is bit-equal to the HFExport the
    run wrote itself and loads with plain `AutoModelForCausalLM.from_pretrained`."""
    _skip_without_gloo()
    from transformers import AutoModelForCausalLM

    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts"), "every_n_train_steps": 2, "save_top_k": -1,
                          "filename": "{step}"}}
    sft = ("--model.init_args.loss_reduction", "sequence", "--data.init_args.max_rows", "200",
           "--trainer.gradient_clip_val", "null", "--model.init_args.scheduler.init_args.warmup_steps", "0",
           "--model.init_args.scheduler.init_args.total_steps", str(STEPS))  # one schedule, however long a run is
    straight = _fit(tmp_path, "straight", 2, FSDP2, extra=sft)
    _fit(tmp_path, "first", 2, FSDP2, steps=2, callbacks=(ckpt,), extra=sft)
    first_ckpt = tmp_path / "ckpts" / "step=2.ckpt"
    assert (first_ckpt / ".metadata").is_file(), sorted(os.listdir(tmp_path / "ckpts"))  # a sharded folder
    resumed = _fit(tmp_path, "resumed", 2, FSDP2, callbacks=(ckpt,), extra=(*sft, "--ckpt_path", str(first_ckpt)))
    _assert_same(resumed, straight, 1e-6, "resumed")
    out = tmp_path / "exported"
    _run([sys.executable, "-m", "recipes.export", "--config", str(tmp_path / "resumed" / "config.yaml"),
          "--ckpt_path", str(tmp_path / "ckpts" / "step=4.ckpt"), "--out", str(out)], tmp_path)
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == resumed.keys()
    for name, value in resumed.items():
        assert torch.equal(exported[name], value), name
    model = AutoModelForCausalLM.from_pretrained(out)
    name = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[name], resumed[name])
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_ppo_fsdp2_sharded_checkpoint_resumes_exactly(tmp_path):
    """The headline PPO set-up on 2 processes (FSDP2, sampled rollouts, an EMA reference, running reward and value
    moments), stopped after 2 iterations and resumed from its distributed checkpoint, ends where 4 uninterrupted
    iterations end (1e-6): every rank's sampling generator, the moments, the EMA reference and both optimizers
    come back."""
    _skip_without_gloo()
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts"), "every_n_train_steps": 2, "save_top_k": -1,
                          "filename": "{step}"}}
    ema = {"class_path": "recipes.callbacks.ema_reference.EMAReference", "init_args": {"eta": 0.5}}
    ppo = ("--model.init_args.mini_batch_size", "null", "--model.init_args.ppo_epochs", "2",
           "--model.init_args.normalize_rewards", "true", "--model.init_args.normalize_values", "true")
    kwargs = dict(config="yaml/tiny/ppo.yaml", global_batch=8, batch_arg="rollout_batch_size")
    straight = _fit(tmp_path, "ppo-straight", 2, FSDP2, extra=ppo, callbacks=(ema,), **kwargs)
    _fit(tmp_path, "ppo-first", 2, FSDP2, steps=2, extra=ppo, callbacks=(ema, ckpt), **kwargs)
    first_ckpt = tmp_path / "ckpts" / "step=2.ckpt"
    assert (first_ckpt / ".metadata").is_file(), sorted(os.listdir(tmp_path / "ckpts"))
    resumed = _fit(tmp_path, "ppo-resumed", 2, FSDP2, extra=(*ppo, "--ckpt_path", str(first_ckpt)),
                   callbacks=(ema, ckpt), **kwargs)
    _assert_same(resumed, straight, 1e-6, "ppo resumed")


def _sharded_worker(rank: int, init_file: str, result_file: str, rm_path: str) -> None:
    """Rank ``rank`` of the 2-process check below; writes its findings to ``result_file.<rank>``."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from recipes.callbacks.ema_reference import local_pair
    from recipes.modules.generation import sample
    from recipes.modules.models import ModelSpec, build_causal_lm
    from recipes.modules.ppo import PPOModule
    from recipes.modules.reward_functions import SequenceClassifierReward
    from recipes.modules.sharding import fsdp2_shard, reshard, unsharded
    from recipes.modules.tokenizer import load_tokenizer
    from tests.conftest import TINY_LLAMA

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same full weights on both ranks before sharding
        tok = load_tokenizer("builtin:byte")
        full = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), tok).eval()
        other = copy.deepcopy(full)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.0)
        expected_ema = {k: 0.75 * v + 0.25 * (v + 1.0) for k, v in full.state_dict().items()}  # eta = 0.25
        mesh = init_device_mesh("cpu", (2,))
        policy_full = copy.deepcopy(other).train()  # the policy unsharded, for the gradient-norm check
        reference, policy = fsdp2_shard(copy.deepcopy(full), mesh), fsdp2_shard(other, mesh)
        ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
        new_tokens = 3 if rank == 0 else 7  # different forward counts per rank: collectives would hang
        want = sample(full, ids, mask, new_tokens, eos_token_id=-1, pad_token_id=0, temperature=0).response_ids
        with unsharded(reference):
            got = sample(reference, ids, mask, new_tokens, eos_token_id=-1, pad_token_id=0,
                         temperature=0).response_ids
        # FSDP2 mixed precision (bf16-mixed): fp32 shards, gathered in bf16 for the sampling loop
        bf16 = fsdp2_shard(copy.deepcopy(full), mesh, torch.bfloat16)
        with unsharded(bf16):
            gathered_dtypes = {p.dtype for p in bf16.parameters()}
            got_bf16 = sample(bf16, ids, mask, new_tokens, eos_token_id=-1, pad_token_id=0, temperature=0)
        want_bf16 = sample(copy.deepcopy(full).to(torch.bfloat16), ids, mask, new_tokens, eos_token_id=-1,
                           pad_token_id=0, temperature=0)
        bf16_ok = (gathered_dtypes == {torch.bfloat16} and torch.equal(got_bf16.response_ids, want_bf16.response_ids)
                   and {p.to_local().dtype for p in bf16.parameters()} == {torch.float32})
        # PPOModule.configure_model shards the frozen reward model too; each rank scores its own texts (3 rows in
        # forwards of 2) and gets what the full reward model gives
        module = PPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), critic=ModelSpec(config=dict(TINY_LLAMA)),
                           reward=SequenceClassifierReward(rm_path, batch_size=2), tokenizer=tok)
        module._device_mesh = mesh
        module.configure_model()
        prompts, responses = [f"q{rank}", "hello", "x"], [" a b", f" rank {rank} says", ""]
        got_scores = module.reward_fn(prompts, responses)
        want_scores = SequenceClassifierReward(rm_path, batch_size=2)(prompts, responses)
        rm_params = list(module.reward_fn.model.parameters())
        rm_sharded = all(type(p).__name__ == "DTensor" for p in rm_params)
        rm_local = sum(p.to_local().numel() for p in rm_params) if rm_sharded else 0
        reward_ok = (rm_sharded and 0 < rm_local <= 0.6 * sum(p.numel() for p in rm_params)
                     and torch.allclose(got_scores, want_scores, atol=1e-5))
        dist.barrier()
        with torch.no_grad():
            reference(input_ids=ids)  # FSDP2 keeps the root's weights gathered after this (no backward follows)
        reshard(reference)  # as EMAReference does before it lerps, so the next forward sees the new shards
        pairs = [local_pair(i, r, p) for i, (r, p) in enumerate(zip(reference.parameters(), policy.parameters()))]
        with torch.no_grad():
            torch._foreach_lerp_([r for r, _ in pairs], [p for _, p in pairs], 0.25)
            full.load_state_dict(expected_ema)
            forward_ok = torch.allclose(reference(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5)
        reshard(reference)  # the forward above left the root gathered again
        sharded = all(type(p).__name__ == "DTensor" for p in reference.parameters())
        # gradient-norm clipping (PPO's max_grad_norm) sees the norm of the whole gradient, not of a shard
        policy_full(input_ids=ids).logits.square().mean().backward()
        policy.train()
        policy(input_ids=ids).logits.square().mean().backward()  # the same batch on both ranks: the same gradient
        want_norm = torch.nn.utils.clip_grad_norm_(policy_full.parameters(), 1e-3)
        got_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1e-3)
        got_norm = got_norm.full_tensor() if hasattr(got_norm, "full_tensor") else got_norm
        gathered = {k: v.full_tensor() for k, v in reference.state_dict().items()}
        ema_ok = forward_ok and all(torch.allclose(gathered[k], v, atol=1e-6) for k, v in expected_ema.items())
        torch.save({"sample_equal": torch.equal(got, want), "length": got.shape[1], "ema_ok": ema_ok,
                    "sharded": sharded, "norm_ok": bool(torch.allclose(got_norm, want_norm, rtol=1e-5)),
                    "bf16_gather": bf16_ok, "reward_sharded": bool(reward_ok)},
                   f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 2 spawned interpreters importing transformers: 10-45 s
def test_unsharded_sampling_sharded_ema_lerp_bf16_gather_and_sharded_reward_model(tmp_path):
    """FSDP2 over 2 processes: inside `recipes.modules.sharding.unsharded`, ranks make different numbers of forwards (3
    and 7 greedy tokens; outside it the per-layer all-gathers would hang) and sample what the unsharded model
    samples; the EMA lerp on local shards, after a forward of the reference and the resharding EMAReference does, gives
    ``0.75 ref + 0.25 policy`` of the full tensors (weights and the next forward's logits), and the reference stays
    sharded (its parameters are DTensors afterwards); gradient clipping of the sharded model uses the norm of
    the full gradient (as PPO's ``max_grad_norm`` needs). With a bf16 ``param_dtype`` (``bf16-mixed``) the shards
    stay fp32 but the sampling loop runs on weights gathered in bf16 and samples what a bf16 copy samples. The
    frozen reward model of a PPOModule is sharded by ``configure_model`` (each rank holds about half of it) and
    scores each rank's texts as the full model does."""
    _skip_without_gloo()
    import torch.multiprocessing as mp

    from recipes.modules.tokenizer import load_tokenizer
    from tests.modules.test_ppo import _save_reward_model

    rm_path = _save_reward_model(tmp_path / "rm", load_tokenizer("builtin:byte"))
    result = str(tmp_path / "result")
    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), result, rm_path), nprocs=2, join=True)
    for rank, length in ((0, 3), (1, 7)):
        found = torch.load(f"{result}.{rank}")
        assert found == {"sample_equal": True, "length": length, "ema_ok": True, "sharded": True, "norm_ok": True,
                         "bf16_gather": True, "reward_sharded": True}, (rank, found)
