"""The KL/DPO reference as one object: a frozen copy of the policy, the LoRA policy with its adapters disabled or with
a named reference adapter, or a precomputed table; each scores a batch (`logprobs`), and the ones holding weights
can be reset to the policy (`reset_to`) or moved towards it (`lerp_`)."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from recipes.modules.adapters import adapter_pairs, ensure_adapter, reference_context
from recipes.modules.models import is_peft
from recipes.modules.sharding import copy_local, local_pair, reshard

Score = Callable[[nn.Module], Tensor]  # what the caller reads off one model for its batch, e.g. (2B,) or (B, R)
TableFn = Callable[[nn.Module, Any], dict[str, Tensor]]  # (policy, data) -> {split: (N, 2) [chosen, rejected]}
NOT_WEIGHTS = ("A precomputed reference is a table of log-probs, not weights: it cannot move towards the policy (an "
               "EMA reference). Use reference_mode frozen_copy, or disabled_adapter with LoRA.")


class Reference(metaclass=abc.ABCMeta):  # not abc.ABC: its empty __slots__ would bar FrozenCopy.freeze
    """What a KL penalty (PPO) or a DPO log-ratio is measured against, whichever kind it is.

    - ``logprobs(score, index, split)``: ``score(model)`` for the reference model, without gradients: the caller says
      what to read (DPO: summed completion log-probs of a chosen + rejected batch; PPO: per-token response log-probs)
      and never which model answers. A table answers for the rows ``index`` of ``split`` instead.
    - ``reset_to(policy)``: afterwards the reference is the policy as it is now (``ref <- policy``).
    - ``lerp_(policy, eta)``: ``ref <- (1 - eta) * ref + eta * policy``, in place.
    - ``parameter_pairs(policy)``: the ``(reference, policy)`` tensors those two update.

    Under FSDP2 and DeepSpeed ZeRO-3 reference and policy are sharded alike, so both updates touch only this rank's
    local shards or partitions (`recipes.modules.sharding.local_pair`): nothing is gathered.
    """

    @abc.abstractmethod
    def logprobs(self, score: Score, index: Tensor | None = None, split: str = "train") -> Tensor:
        """The reference's answer to ``score`` (no gradients); ``index`` and ``split`` address a table's rows."""

    def parameter_pairs(self, policy: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """``(reference tensor, policy tensor)`` for every weight that `reset_to` and `lerp_` update."""
        raise TypeError(f"{type(self).__name__} holds no weights of its own to reset or average.")

    def reset_to(self, policy: nn.Module, data: Any = None) -> None:
        """Make the reference equal to ``policy`` now (``data`` matters only to a table)."""
        self._reshard(policy)  # FSDP2: copy shard to shard (a root gathered after a forward holds plain tensors)
        copy_local(self.parameter_pairs(policy))

    @torch.no_grad()
    def lerp_(self, policy: nn.Module, eta: float) -> None:
        """``ref <- (1 - eta) * ref + eta * policy`` on this rank's parts of each weight."""
        self._reshard(policy)  # FSDP2: a root kept gathered after its forward would not see the updated shards
        # FSDP2 may re-point a DTensor's local storage at lazy init, so the shards are looked up at each update
        local = [local_pair(i, r, p) for i, (r, p) in enumerate(self.parameter_pairs(policy))]
        torch._foreach_lerp_([r for r, _ in local], [p.detach().to(r.dtype) for r, p in local], eta)

    def _reshard(self, policy: nn.Module) -> None:
        """Drop FSDP2's gathered weights first: the registered parameters are the shards again (no-op otherwise)."""
        reshard(policy)


class FrozenCopy(Reference, nn.Module):
    """A frozen copy of the starting policy (full fine-tuning): a second model, in eval mode, without gradients.

    The copy *is* the reference object: `freeze` gives the copied module this class's methods by swapping in a
    subclass of its own class (as FSDP2's ``fully_shard`` does), so it stays the module registered on the
    LightningModule as ``reference``, its weights checkpointed under ``reference.`` + the policy's parameter names,
    and it can be FSDP2-sharded like the policy (copy before sharding the policy, shard both alike).
    """

    _classes: ClassVar[dict[type, type]] = {}  # model class -> its FrozenCopy subclass, made once (as FSDP2's)

    @classmethod
    def freeze(cls, module: nn.Module) -> FrozenCopy:
        """``module`` (a copy of the policy the caller made, e.g. ``copy.deepcopy(policy)``), frozen and in eval
        mode, as a `FrozenCopy`: the same object, not a wrapper."""
        base = type(module)
        if not isinstance(module, FrozenCopy):
            if base not in cls._classes:
                cls._classes[base] = type(f"FrozenCopy{base.__name__}", (cls, base), {"__module__": cls.__module__})
            module.__class__ = cls._classes[base]
        return module.requires_grad_(False).eval()

    def logprobs(self, score: Score, index: Tensor | None = None, split: str = "train") -> Tensor:
        """``score`` of the copy (its mode is the caller's: `DPOModule.train` keeps it in eval)."""
        with torch.no_grad():
            return score(self)

    def parameter_pairs(self, policy: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """Each policy parameter with the copy's parameter of the same name."""
        params = dict(self.named_parameters())
        return [(params[name], p) for name, p in policy.named_parameters()]

    def reset_to(self, policy: nn.Module, data: Any = None) -> None:
        """Copy the policy's parameters and buffers into the copy."""
        self._reshard(policy)
        buffers = dict(self.named_buffers())
        copy_local(self.parameter_pairs(policy) + [(buffers[name], b) for name, b in policy.named_buffers()])

    def _reshard(self, policy: nn.Module) -> None:
        reshard(policy)
        reshard(self)


class AdapterReference(Reference):
    """A LoRA policy as its own reference: one base model, no second copy (torchtune's adapter-disabled reference).

    With ``adapter=None`` the reference is the base model (every adapter disabled). That one cannot move without
    moving the policy, so `reset_to` and `lerp_` need a named reference adapter first: `use_adapter` switches to a
    frozen adapter ``name`` configured like the policy's (EMAReference's ``ema_reference``, DPOIterRound's
    ``round_reference``), and `reset_to` / `lerp_` then update only its LoRA factors (``base + B_ref A_ref``). Either
    way `logprobs` runs the policy inside `recipes.modules.adapters.reference_context`, which restores the policy's
    active adapter, trainable, afterwards.

    Args:
        policy: the peft (LoRA) policy.
        adapter: None (adapters disabled) or the name of an adapter the policy holds.
    """

    def __init__(self, policy: nn.Module, adapter: str | None = None) -> None:
        if not is_peft(policy):
            raise TypeError("AdapterReference needs a peft (LoRA) policy; use FrozenCopy for full fine-tuning.")
        self.policy, self.adapter = policy, adapter

    def use_adapter(self, name: str) -> None:
        """Measure against the frozen adapter ``name`` from now on (added if the policy lacks it and is not sharded:
        a sharded policy must have it from ``configure_model``, `recipes.modules.adapters.plan_adapter`)."""
        ensure_adapter(self.policy, name)
        self.adapter = name

    def logprobs(self, score: Score, index: Tensor | None = None, split: str = "train") -> Tensor:
        """``score`` of the policy with adapters disabled, or with the reference adapter active."""
        with torch.no_grad(), reference_context(self.policy, self.adapter):
            return score(self.policy)

    def parameter_pairs(self, policy: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """Each factor of the policy's active adapter with the reference adapter's."""
        if self.adapter is None:
            raise TypeError("The adapter-disabled reference is the base model the policy trains on: it cannot be reset "
                            "or averaged on its own. Call use_adapter(name) first (EMAReference and DPOIterRound do).")
        return adapter_pairs(policy, self.adapter)


class PrecomputedTable(Reference):
    """Reference log-probs precomputed once per data split: ``tables[split]`` is ``(N, 2)`` [chosen, rejected] over
    the split's preference pairs, on CPU; the model that produced them is no longer held.

    A split that is missing when first read is computed by ``compute(*source())``: ``source`` gives the policy and
    the data, or raises if the policy is no longer the reference (after training steps). `reset_to` recomputes the
    whole table for the given data with the policy as it is now; `lerp_` is refused (a table holds no weights).

    Args:
        compute: ``(policy, data) -> {split: table}`` (`recipes.modules.reference_pass.precompute_tables`).
        source: ``() -> (policy, data)`` for the first computation.
    """

    def __init__(self, compute: TableFn, source: Callable[[], tuple[nn.Module, Any]]) -> None:
        self.compute, self.source = compute, source
        self.tables: dict[str, Tensor] = {}

    def logprobs(self, score: Score, index: Tensor | None = None, split: str = "train") -> Tensor:
        """Rows ``index`` (B,) of the ``split`` table, as the concatenated batch orders them: chosen rows, then
        rejected rows, (2B,), on ``index``'s device. ``score`` is not run."""
        if index is None:
            raise ValueError("A precomputed reference is read by row: pass the batch's `index`.")
        if split not in self.tables:
            self.tables.update(self.compute(*self.source()))
        return self.tables[split][index.cpu()].T.reshape(-1).to(index.device)  # (B, 2) -> (2B,)

    def reset_to(self, policy: nn.Module, data: Any = None) -> None:
        """Recompute every split of ``data`` with ``policy`` (full fine-tuning only)."""
        if is_peft(policy):
            raise ValueError("A precomputed reference of a LoRA policy is its base model (the pass disables the "
                             "adapters), not the current policy: it cannot be reset to the policy. Use reference_mode "
                             "disabled_adapter, whose reference can be a named adapter copied from the policy.")
        self.tables = self.compute(policy, data)

    def lerp_(self, policy: nn.Module, eta: float) -> None:
        """Refused: a table of log-probs cannot be averaged with a model."""
        raise TypeError(NOT_WEIGHTS)

    def parameter_pairs(self, policy: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """Refused, as `lerp_`."""
        raise TypeError(NOT_WEIGHTS)
