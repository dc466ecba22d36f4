"""DPOIterRound: at the start of every DPO-Iter round, make the DPO reference the policy that starts the round."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from recipes.modules.adapters import plan_adapter, readd_adapter_before_load
from recipes.modules.reference import AdapterReference, Reference


class DPOIterRound(Callback):
    """Iterative DPO (Xu et al. 2024, arXiv 2404.10719 Sec. 6): one epoch is one round; at each round start the
    reference is reset to the current policy, and it stays fixed during the round.

    The round's pairs come from `recipes.datamodules.online_preference.OnlinePreferenceDataModule`, which Lightning asks
    for a new loader every epoch (``trainer.reload_dataloaders_every_n_epochs: 1``, checked here). The reference is the
    module's own (``pl_module.reference``, a `recipes.modules.reference.Reference`); this callback only calls its
    ``reset_to(policy, datamodule)``, which in each mode of `recipes.modules.dpo.DPOModule` does:

    - ``frozen_copy``: the policy's parameters and buffers are copied into the frozen copy.
    - ``disabled_adapter`` (LoRA): first ``use_adapter(adapter_name)`` makes the reference a frozen adapter (planned
      in ``setup``, so the policy has it from ``configure_model``; no second base model); the policy's adapter is
      copied into it.
    - ``precomputed`` (full fine-tuning only): the reference log-probs are recomputed for the round's pairs with
      the current policy. With LoRA it is refused: that mode's reference is the base model.
    - a reference-free loss: nothing to reset.

    The round (``trainer.current_epoch``) of the last reset is the callback's state, so a run resumed inside a round
    keeps that round's reference (restored from the checkpoint with the model; with LoRA the round adapter is read
    again) instead of resetting it to the half-trained policy. After ``rounds`` rounds the trainer stops. Each round
    logs ``dpo_iter/round``, ``dpo_iter/reward_mean`` (mean reward of the round's generations: the learning curve),
    ``dpo_iter/pairs`` and the dropped counts ``dpo_iter/ties``, ``dpo_iter/below_margin``.

    Example::

        trainer = L.Trainer(max_epochs=4, reload_dataloaders_every_n_epochs=1, callbacks=[DPOIterRound(rounds=4)])
        trainer.fit(DPOModule(...), OnlinePreferenceDataModule(reward=..., k=5))

    Args:
        rounds: stop after this many rounds (paper: 4); None: ``trainer.max_epochs`` decides.
        adapter_name: the reference adapter's name with LoRA.
        policy_attr: the module attribute holding the policy.
    """

    def __init__(self, rounds: int | None = None, adapter_name: str = "round_reference",
                 policy_attr: str = "policy") -> None:
        if rounds is not None and rounds < 1:
            raise ValueError(f"DPOIterRound: rounds must be >= 1, got {rounds}.")
        self.rounds, self.adapter_name, self.policy_attr = rounds, adapter_name, policy_attr
        self.last_reset_round = -1

    def should_reset(self, round_: int) -> bool:
        """Whether to reset the reference at the start of round ``round_`` (once per round, also across a resume)."""
        return round_ != self.last_reset_round

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the round wiring, and let a checkpoint that holds the reference adapter load into a fresh policy."""
        if stage == "fit" and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("DPOIterRound: one epoch is one round, so the pairs must be regenerated every epoch; set "
                             "trainer.reload_dataloaders_every_n_epochs: 1 (it is "
                             f"{trainer.reload_dataloaders_every_n_epochs}).")
        plan_adapter(pl_module, self.adapter_name)  # a LoRA policy gets the reference adapter in configure_model
        pl_module.register_load_state_dict_pre_hook(readd_adapter_before_load(self.policy_attr, self.adapter_name))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed after a reset measures against that round's reference again (LoRA: its restored adapter)."""
        # Resumed inside a round, Lightning calls no on_train_epoch_start: the round adapter is named here instead.
        if self.last_reset_round >= 0:
            self.reference(pl_module)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reset the reference to the policy that starts this round, then log the round's data statistics."""
        # current_epoch is the 0-based round; the data module generated this round's pairs just before this hook.
        round_ = trainer.current_epoch
        if self.should_reset(round_):
            self.reset_reference(trainer, pl_module)
            self.last_reset_round = round_
        history = getattr(trainer.datamodule, "history", None) or []
        entry = next((h for h in reversed(history) if int(h["round"]) == round_), None)
        if entry is not None:
            pl_module.log_dict({f"dpo_iter/{key}": float(entry[key])
                                for key in ("round", "reward_mean", "pairs", "ties", "below_margin")},
                               on_step=False, on_epoch=True, batch_size=1)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop after ``rounds`` rounds (current_epoch is still the finished round's 0-based index here)."""
        if self.rounds is not None and trainer.current_epoch + 1 >= self.rounds:
            trainer.should_stop = True

    @torch.no_grad()
    def reset_reference(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make ``pl_module``'s reference equal to its current policy (see the class docstring for each mode)."""
        reference = self.reference(pl_module)
        if reference is not None:  # shard to shard under FSDP2 (Reference.reset_to reshards first)
            try:
                reference.reset_to(getattr(pl_module, self.policy_attr), trainer.datamodule)
            except ValueError as error:  # a LoRA policy's precomputed reference
                raise ValueError(f"DPOIterRound: {error}") from error

    def reference(self, pl_module: L.LightningModule) -> Reference | None:
        """The module's reference, reading the round adapter ``adapter_name`` with LoRA; None for a reference-free
        loss (DPOModule's ``mode`` 'none')."""
        reference = getattr(pl_module, "reference", None)
        if reference is None and getattr(pl_module, "mode", None) == "none":
            return None
        if not isinstance(reference, Reference):
            raise TypeError(f"DPOIterRound: {type(pl_module).__name__} has no `reference` (a frozen copy, LoRA "
                            "policy or precomputed reference: recipes.modules.reference.Reference) to reset.")
        if isinstance(reference, AdapterReference):
            reference.use_adapter(self.adapter_name)
        return reference

    @override
    def state_dict(self) -> dict[str, Any]:
        """The round of the last reset (the reference itself is in the model's state dict or its checkpoint hook)."""
        return {"last_reset_round": self.last_reset_round}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the round of the last reset."""
        self.last_reset_round = int(state_dict["last_reset_round"])
