"""EMAReference: keep the KL reference of PPO or DPO as an exponential moving average of the policy."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from recipes.modules.adapters import plan_adapter, readd_adapter_before_load
from recipes.modules.reference import AdapterReference, Reference
from recipes.modules.sharding import local_pair


class EMAReference(Callback):
    """After each training step, move the reference towards the policy: ``ref <- (1 - eta) * ref + eta * policy``.

    The module is left as it is (unlike Lightning's ``WeightAveraging``, nothing is swapped into the trained
    model); only the reference that the KL term (PPO) or the log-ratio (DPO, TR-DPO style) is measured against
    moves. ``eta = 0`` keeps the initial reference, ``eta = 1`` makes it the current policy.

    The module owns its reference, ``pl_module.reference`` (a `recipes.modules.reference.Reference`); the callback
    drives it only through ``reference.lerp_(policy, eta)`` (and, with LoRA, ``use_adapter`` / ``reset_to``):

    - Full fine-tuning: the reference is a `FrozenCopy` with the policy's parameter names, updated in place
      (``torch.lerp``).
    - Sharded (FSDP2 / ``ModelParallelStrategy``, or DeepSpeed ZeRO-3): policy and reference are sharded alike, so
      each rank averages its local shards (``DTensor.to_local``, ``ds_tensor``) in place; nothing is gathered, and
      the reference stays sharded.
    - LoRA: the reference (an `AdapterReference`) is the shared base model plus its own adapter ``adapter_name``,
      added to the policy by the module's ``configure_model`` (`recipes.modules.adapters.plan_adapter`: before
      sharding, so under FSDP2 it is sharded like the policy's adapter) and initialized from the policy's adapter at
      the start of a fresh fit; ``reference.use_adapter(adapter_name)`` makes the module's reference read it. Only the
      adapter factors are averaged (the reference is ``base + B_ema A_ema``, not the average of ``B A``), and no
      second base model exists.
    - A precomputed reference (a table of log-probs) cannot be averaged: refused at the start of the fit.

    The step is ``trainer.global_step`` (optimizer steps; for ``PPOModule`` one per PPO iteration), and the update
    runs once per new step even with gradient accumulation. The full-FT reference (``reference.*``) and the EMA
    adapter are in the model's state dict, so a checkpoint holds them; the callback's own state is the last updated
    step.

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

    def should_update(self, step: int) -> bool:
        """Whether to update the reference after the optimizer step that brought ``global_step`` to ``step``."""
        return step >= self.start_step and (step - self.start_step) % self.update_every_n_steps == 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Have the module create the LoRA EMA adapter in ``configure_model`` (next), and let a checkpoint that holds
        the adapter load into a policy that does not have it yet (loading outside a Trainer)."""
        plan_adapter(pl_module, self.adapter_name)
        pl_module.register_load_state_dict_pre_hook(readd_adapter_before_load(self.policy_attr, self.adapter_name))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the reference can be averaged; with LoRA read the EMA adapter (a fresh fit: the policy's adapter)."""
        reference, policy = self.reference(pl_module), getattr(pl_module, self.policy_attr)
        if isinstance(reference, AdapterReference):
            reference.use_adapter(self.adapter_name)
            if not self._restored:  # a restored EMA adapter keeps its checkpointed values
                reference.reset_to(policy)
        try:
            pairs = reference.parameter_pairs(policy)
        except TypeError as error:
            raise TypeError(f"EMAReference: the reference of {type(pl_module).__name__} cannot be averaged: "
                            f"{error}") from error
        for index, (ref, param) in enumerate(pairs):
            local_pair(index, ref, param)  # fail at the start, not after the first step, on mismatched sharding

    @staticmethod
    def reference(pl_module: L.LightningModule) -> Reference:
        """The module's reference (`recipes.modules.reference.Reference`), which this callback moves."""
        reference = getattr(pl_module, "reference", None)
        if not isinstance(reference, Reference):
            raise TypeError(f"EMAReference: {type(pl_module).__name__} has no `reference` to average into (a "
                            f"recipes.modules.reference.Reference; got {type(reference).__name__}).")
        return reference

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Average the policy into the reference when an optimizer step happened and ``should_update`` says so."""
        # global_step is 1 after the first optimizer step, so step k is "after k optimizer steps"; comparing with the
        # last updated step makes accumulation micro-batches (same global_step) update once.
        step = trainer.global_step
        if step == self.last_updated_step or not self.should_update(step):
            return
        # shard-local and in place; FSDP2 roots are resharded first (Reference.lerp_)
        self.reference(pl_module).lerp_(getattr(pl_module, self.policy_attr), self.eta)
        self.last_updated_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        """The last updated step (the averaged weights themselves are in the model's state dict)."""
        return {"last_updated_step": self.last_updated_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last updated step."""
        self.last_updated_step, self._restored = int(state_dict["last_updated_step"]), True
