"""LoRA adapters as the reference: the adapter-disabled or named-adapter context, frozen reference adapters planned
before sharding, and re-adding them when a checkpoint holding them loads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn


@contextlib.contextmanager
def reference_context(model: nn.Module, adapter: str | None = None) -> Iterator[None]:
    """Run a peft (LoRA) ``model`` as its own reference, with no second copy of the base weights.

    ``adapter=None``: all adapters disabled (the reference is the base model). A name: that adapter is made the
    active one for the duration (e.g. the EMA reference adapter of `recipes.callbacks.ema_reference.EMAReference`),
    then the previously active adapter is restored, trainable again (`recipes.modules.reference.AdapterReference`).
    Raises ``TypeError`` for a model without adapters: such a model needs an explicit frozen reference copy.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference_context needs a peft (LoRA) model; use a frozen reference copy otherwise.")
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)  # peft's set_adapter also makes the active adapter trainable again


def add_frozen_adapter(policy: nn.Module, name: str) -> None:
    """Add a frozen LoRA adapter ``name`` configured like the active one; the active adapter stays active and
    trainable (a reference adapter for `reference_context`)."""
    active = policy.active_adapter
    policy.add_adapter(name, policy.peft_config[active])
    policy.set_adapter(active)  # peft's set_adapter makes the active adapter trainable and the others frozen
    for param_name, p in policy.named_parameters():
        if f".{name}." in param_name:
            p.requires_grad_(False)


def plan_adapter(module: nn.Module, name: str) -> None:
    """Ask a LightningModule to create the frozen adapter ``name`` in its ``configure_model`` (`add_planned_adapters`).

    Callbacks that keep a reference adapter call this in ``setup``, which Lightning runs before ``configure_model``:
    an adapter created there exists before FSDP2 shards the policy, so it is sharded like the policy's own adapter
    (added after sharding it would be plain tensors beside DTensors), and it exists before a checkpoint loads."""
    planned = getattr(module, "planned_adapters", [])
    module.planned_adapters = planned if name in planned else [*planned, name]


def ensure_adapter(policy: nn.Module, name: str) -> None:
    """Add the frozen adapter ``name`` to ``policy`` if it lacks it (a module that did not call
    `add_planned_adapters`); refused for an FSDP2-sharded policy, whose adapters must exist before sharding."""
    from recipes.modules.sharding import is_sharded

    if name in policy.peft_config:
        return
    if is_sharded(policy):
        raise RuntimeError(f"The sharded policy has no adapter '{name}': its LightningModule's configure_model must "
                           "call recipes.modules.adapters.add_planned_adapters(self, policy) before it shards the "
                           "policy.")
    add_frozen_adapter(policy, name)


def add_planned_adapters(module: nn.Module, policy: nn.Module) -> None:
    """Add the adapters planned for ``module`` (`plan_adapter`) to a LoRA ``policy``, frozen; call before sharding.
    No-op for a policy without adapters."""
    for name in getattr(module, "planned_adapters", []) if hasattr(policy, "peft_config") else []:
        ensure_adapter(policy, name)


def adapter_pairs(policy: nn.Module, name: str) -> list[tuple[Tensor, Tensor]]:
    """(adapter ``name``'s parameter, the active adapter's parameter) for every adapter weight."""
    active, params = policy.active_adapter, dict(policy.named_parameters())
    return [(params[param_name.replace(f".{active}.", f".{name}.")], p) for param_name, p in params.items()
            if f".{active}." in param_name]


def readd_adapter_before_load(policy_attr: str, name: str):
    """A ``register_load_state_dict_pre_hook`` hook: when a checkpoint holds adapter ``name`` that the module's
    policy does not have yet (a module built before the callback planned it, as `recipes.export` builds one), add
    it first so the weights load into it. Which adapter the reference reads is the callback's business."""

    def hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        policy = getattr(module, policy_attr, None)
        if (policy is not None and hasattr(policy, "peft_config") and name not in policy.peft_config
                and any(f".{name}." in key for key in state_dict)):
            add_frozen_adapter(policy, name)

    return hook
