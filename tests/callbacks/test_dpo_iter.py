"""DPOIterRound: the reference is the round's starting policy (asserted inside the hooks) in every reference mode, a
run killed between or inside rounds resumes exactly, and the tiny config's reward rises from round 1 to round 2."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from recipes.__main__ import cli_main
from recipes.callbacks.dpo_iter import DPOIterRound
from recipes.datamodules.online_preference import OnlinePreferenceDataModule
from recipes.modules.dpo import DPOModule
from recipes.modules.models import LoRASpec, ModelSpec
from recipes.modules.reference import FrozenCopy
from recipes.modules.reward_functions import CharacterFractionReward
from tests.conftest import REPO, TINY_LLAMA, quiet_trainer


def make_dm():
    return OnlinePreferenceDataModule(reward=CharacterFractionReward(scale=10.0), max_length=48, max_new_tokens=6,
                                      prompts_per_round=16, k=3, batch_size=8, max_rows=64)


def make_module(tokenizer, mode="frozen_copy", lora=None):
    return DPOModule(ModelSpec(config=dict(TINY_LLAMA), lora=lora), tokenizer, reference_mode=mode, max_length=48,
                     optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))


def fit(module, dm, callbacks, ckpt_path=None, **kwargs):
    trainer = quiet_trainer(reload_dataloaders_every_n_epochs=1, callbacks=callbacks, **kwargs)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def reference_params(module):
    """The tensors that make up the reference, keyed like the policy's (frozen copy, or the LoRA reference adapter)."""
    if isinstance(module.reference, FrozenCopy):
        return dict(module.reference.named_parameters())
    params = dict(module.policy.named_parameters())
    return {name: params[name.replace(".default.", ".round_reference.")] for name in params if ".default." in name}


class AssertingRound(DPOIterRound):
    """Asserts inside the hooks: after each reset the reference equals the policy; during a round it never moves."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.snapshots, self.batches = [], 0

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        ref, policy = reference_params(pl_module), dict(pl_module.policy.named_parameters())
        for name, tensor in ref.items():
            assert torch.equal(tensor, policy[name]), name
        if pl_module.mode == "disabled_adapter":
            assert pl_module.reference.adapter == self.adapter_name
        self.snapshots.append({name: t.detach().clone() for name, t in ref.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        for name, tensor in reference_params(pl_module).items():
            assert torch.equal(tensor, self.snapshots[-1][name]), name


@pytest.mark.parametrize("mode", ["frozen_copy", "disabled_adapter"])
def test_reference_is_the_round_start_policy_and_fixed_within_the_round(byte_tokenizer, mode, tmp_path):
    lora = LoRASpec(r=4, dropout=0.0) if mode == "disabled_adapter" else None
    module, cb = make_module(byte_tokenizer, mode, lora), AssertingRound(rounds=2)
    trainer = fit(module, make_dm(), [cb], max_epochs=5, default_root_dir=tmp_path)
    assert trainer.current_epoch == 2 and len(cb.snapshots) == 2 and cb.batches == 2 * 2  # 16 pairs / 8, rounds=2 stop
    moved = [not torch.equal(cb.snapshots[0][n], cb.snapshots[1][n]) for n in cb.snapshots[0]]
    assert any(moved)  # round 2's reference is the trained policy, not the initial one


def test_precomputed_reference_is_recomputed_from_the_round_start_policy(byte_tokenizer, tmp_path):
    seen = []

    class Check(DPOIterRound):
        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            dm = trainer.datamodule
            batch = dm.collate(dm.train_set)
            with torch.no_grad():
                expected = pl_module._logps(pl_module.policy.eval(), batch).view(2, -1).T
            pl_module.policy.train()
            torch.testing.assert_close(pl_module.reference.tables["train"], expected)
            seen.append(pl_module.reference.tables["train"].clone())

    module = make_module(byte_tokenizer, "precomputed")
    module.hparams.reference_cache_dir = str(tmp_path / "cache")
    fit(module, make_dm(), [Check(rounds=2)], max_epochs=2, default_root_dir=tmp_path)
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])


def test_reload_every_epoch_is_required(byte_tokenizer, tmp_path):
    trainer = quiet_trainer(max_epochs=1, callbacks=[DPOIterRound()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer.fit(make_module(byte_tokenizer), make_dm())


def test_killed_run_resumes_to_the_same_parameters(byte_tokenizer, tmp_path):
    """2 rounds of 2 steps each. Uninterrupted (checkpointing after every step) vs. resumed from: the end of round 1
    (a run stopped by max_epochs=1), step 1 (inside round 1) and step 3 (inside round 2)."""
    L.seed_everything(7)
    full = make_module(byte_tokenizer)
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    fit(full, make_dm(), [DPOIterRound(rounds=2), every_step], max_epochs=2, default_root_dir=tmp_path,
        enable_checkpointing=True)
    expected = [h["reward_mean"] for h in full.trainer.datamodule.history]

    L.seed_everything(7)
    trainer = fit(make_module(byte_tokenizer), make_dm(), [DPOIterRound(rounds=2)], max_epochs=1,
                  default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "between_rounds.ckpt")

    for ckpt in ["between_rounds.ckpt", "ckpt/epoch=0-step=1.ckpt", "ckpt/epoch=1-step=3.ckpt"]:
        L.seed_everything(123)  # the resumed run must not depend on the global seed
        resumed, dm = make_module(byte_tokenizer), make_dm()
        trainer = fit(resumed, dm, [DPOIterRound(rounds=2)], ckpt_path=str(tmp_path / ckpt), max_epochs=2,
                      default_root_dir=tmp_path)
        assert trainer.global_step == 4
        assert [h["reward_mean"] for h in dm.history] == expected, ckpt
        for (name, a), b in zip(full.policy.named_parameters(), resumed.policy.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{ckpt}: {name}")


def test_lora_run_resumed_inside_a_round_reads_the_saved_round_adapter(byte_tokenizer, tmp_path):
    """Killed at step 1 (inside round 1), a LoRA run resumes measuring against the round adapter as the checkpoint
    saved it: not the adapter-disabled base model, and not reset to the half-trained policy."""
    lora, ckpt = LoRASpec(r=4, dropout=0.0), tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    fit(make_module(byte_tokenizer, "disabled_adapter", lora), make_dm(), [DPOIterRound(rounds=1), every_step],
        max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)  # 13 pairs: 2 steps in the round
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    seen = {}

    class Check(L.Callback):  # beside DPOIterRound, whose state must load under its own name
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # step 2, the first after resuming
            seen["adapter"] = pl_module.reference.adapter
            seen["params"] = {f"policy.{n}": p.detach().clone() for n, p in pl_module.policy.named_parameters()
                              if ".round_reference." in n}

    fit(make_module(byte_tokenizer, "disabled_adapter", lora), make_dm(), [DPOIterRound(rounds=1), Check()],
        ckpt_path=str(ckpt), max_epochs=1, default_root_dir=tmp_path)
    assert seen["adapter"] == "round_reference" and seen["params"]
    for name, value in seen["params"].items():
        assert torch.equal(value, saved[name]), name
    assert any(not torch.equal(saved[n], saved[n.replace(".round_reference.", ".default.")]) for n in seen["params"])


def test_tiny_config_reward_rises_from_round_1_to_round_2(tmp_path):
    """yaml/tiny/dpo_iter.yaml as shipped (seed 0): mean reward of the generations 1.097 in round 1, 1.404 in round 2."""
    root = str(tmp_path)
    cli = cli_main(["fit", "--config", str(REPO / "yaml/tiny/dpo_iter.yaml"), "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root])
    history = cli.datamodule.history
    assert [int(h["round"]) for h in history] == [0, 1]
    assert history[1]["reward_mean"] > history[0]["reward_mean"] + 0.15
    assert cli.trainer.callback_metrics["dpo_iter/round"] == 1.0
