"""EMAReference: keep the KL reference of PPO or DPO as an exponential moving average of the policy."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from recipes.modules.adapters import (
    adapter_pairs,
    ensure_adapter,
    plan_adapter,
    readd_adapter_before_load,
)
from recipes.modules.models import is_peft
from recipes.modules.sharding import copy_local, local_pair, reshard


class EMAReference(Callback):
    """After each training step, move the reference towards the policy: ``ref <- (1 - eta) * ref + eta * policy``.

    The module is left as it is (unlike Lightning's ``WeightAveraging``, nothing is swapped into the trained
    model); only the reference that the KL term (PPO) or the log-ratio (DPO, TR-DPO style) is measured against
    moves. ``eta = 0`` keeps the initial reference, ``eta = 1`` makes it the current policy.

    - Full fine-tuning: the module's ``reference`` attribute, a frozen ``nn.Module`` with the policy's parameter
      names, is updated in place (``torch.lerp``).
    - Sharded (FSDP2 / ``ModelParallelStrategy``, or DeepSpeed ZeRO-3): policy and reference are sharded alike, so
      each rank averages its local shards (``DTensor.to_local``, ``ds_tensor``) in place; nothing is gathered, and
      the reference stays sharded.
    - LoRA: the reference is the shared base model plus its own adapter ``adapter_name``, added to the policy by the
      module's ``configure_model`` (`recipes.modules.adapters.plan_adapter`: before sharding, so under FSDP2 it is sharded like
      the policy's adapter) and initialized from the policy's adapter at the start of a fresh fit; the module's
      ``reference_adapter`` is set to it so that it runs its reference through
      ``recipes.modules.adapters.reference_context(policy, reference_adapter)``. Only the
      adapter factors are averaged (the reference is ``base + B_ema A_ema``, not the average of ``B A``), and no
      second base model exists.

    The step is ``trainer.global_step`` (optimizer steps; for ``PPOModule`` one per PPO iteration), and the update
    runs once per new step even with gradient accumulation. The full-FT reference and the EMA adapter are in the
    model's state dict, so a checkpoint holds them; the callback's own state is the last updated step.

    Example::

        trainer = L.Trainer(callbacks=[EMAReference(eta=0.1, update_every_n_steps=1)])
        trainer.fit(PPOModule(...), PromptDataModule(...))

    Args:
        eta: the EMA rate ``eta`` in ``[0, 1]``.
        update_every_n_steps: update after every n-th optimizer step.
        start_step: first ``global_step`` at which updates happen.
        policy_attr: the module attribute holding the policy.
        adapter_name: the name of the EMA adapter with LoRA.
    """

    def __init__(self, eta: float = 0.1, update_every_n_steps: int = 1, start_step: int = 1,
                 policy_attr: str = "policy", adapter_name: str = "ema_reference") -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"EMAReference: eta must be in [0, 1], got {eta}.")
        if update_every_n_steps < 1:
            raise ValueError(f"EMAReference: update_every_n_steps must be >= 1, got {update_every_n_steps}.")
        self.eta, self.update_every_n_steps, self.start_step = eta, update_every_n_steps, start_step
        self.policy_attr, self.adapter_name = policy_attr, adapter_name
        self.last_updated_step = 0
        self._restored = False  # a checkpoint restored the callback (and the EMA adapter with the model's weights)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def should_update(self, step: int) -> bool:
        """Whether to update the reference after the optimizer step that brought ``global_step`` to ``step``."""
        return step >= self.start_step and (step - self.start_step) % self.update_every_n_steps == 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Have the module create the LoRA EMA adapter in ``configure_model`` (next), and let a checkpoint that holds
        the adapter load into a policy that does not have it yet (loading outside a Trainer)."""
        plan_adapter(pl_module, self.adapter_name)
        pl_module.register_load_state_dict_pre_hook(
            readd_adapter_before_load(self.policy_attr, self.adapter_name, set_reference=False))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Pair up reference and policy parameters; a fresh LoRA EMA adapter starts equal to the policy's adapter."""
        policy = getattr(pl_module, self.policy_attr)
        if is_peft(policy):
            ensure_adapter(policy, self.adapter_name)
            self._pairs = adapter_pairs(policy, self.adapter_name)
            if not self._restored:  # a restored EMA adapter keeps its checkpointed values
                copy_local(self._pairs)
            pl_module.reference_adapter = self.adapter_name
        else:
            reference = getattr(pl_module, "reference", None)
            if not isinstance(reference, nn.Module):
                raise TypeError(f"EMAReference: {type(pl_module).__name__} has neither a LoRA policy nor a "
                                "`reference` module to average into.")
            ref_params = dict(reference.named_parameters())
            self._pairs = [(ref_params[name], p) for name, p in policy.named_parameters()]
        for index, (ref, param) in enumerate(self._pairs):
            local_pair(index, ref, param)  # fail at the start, not after the first step, on mismatched sharding

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Average the policy into the reference when an optimizer step happened and ``should_update`` says so."""
        # global_step is 1 after the first optimizer step, so step k is "after k optimizer steps"; comparing with the
        # last updated step makes accumulation micro-batches (same global_step) update once.
        step = trainer.global_step
        if step == self.last_updated_step or not self.should_update(step):
            return
        reshard(pl_module)  # FSDP2: a root kept gathered after its forward would not see the updated shards
        with torch.no_grad():
            # FSDP2 may re-point a DTensor's local storage at lazy init, so the shards are looked up at each update
            pairs = [local_pair(i, r, p) for i, (r, p) in enumerate(self._pairs)]
            torch._foreach_lerp_([r for r, _ in pairs], [p.detach().to(r.dtype) for r, p in pairs], self.eta)
        self.last_updated_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        """The last updated step (the averaged weights themselves are in the model's state dict)."""
        return {"last_updated_step": self.last_updated_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last updated step."""
        self.last_updated_step, self._restored = int(state_dict["last_updated_step"]), True
