"""Placement of weights across processes: FSDP2 sharding and DeepSpeed ZeRO-3 partitions (which part of a weight
this rank holds, gathering for sampling, resharding). Collectives live in `recipes.modules.distributed`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from recipes.modules.models import is_peft


def fsdp2_shard(model: torch.nn.Module, device_mesh: Any | None,
                param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``) over the mesh Lightning's ``ModelParallelStrategy`` provides:
    each decoder layer (the model's ``_no_split_modules``) becomes one unit, then the root. With ``param_dtype``
    (`fsdp2_param_dtype`) the shards stay in their own dtype (fp32 masters) while every all-gather, forward and
    backward runs in ``param_dtype`` and gradients are reduced in fp32. No-op without a mesh."""
    if device_mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    mesh, policy = fsdp2_mesh_and_policy(device_mesh, param_dtype)
    base = model.get_base_model() if is_peft(model) else model
    layer_types = set(getattr(base, "_no_split_modules", None) or [])
    if not layer_types:
        raise ValueError(f"{type(base).__name__} names no _no_split_modules to shard by; wrap it yourself.")
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def fsdp2_mesh_and_policy(device_mesh: Any, param_dtype: torch.dtype | None) -> tuple[Any, Any]:
    """The data-parallel mesh to shard over and the ``MixedPrecisionPolicy`` for ``param_dtype`` (gradients reduced
    in fp32 when it is set; FSDP2's defaults when None)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    return mesh, MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)


def fsdp2_param_dtype(module: Any) -> torch.dtype | None:
    """The FSDP2 parameter dtype that a LightningModule's trainer precision asks for: ``bf16-mixed`` gives
    ``bfloat16``, FSDP2's own form of mixed precision (weights gathered in bf16: half the all-gather traffic and
    half the memory of a policy gathered whole for sampling), else None (gather in the weights' own dtype)."""
    trainer = getattr(module, "_trainer", None)
    return torch.bfloat16 if trainer is not None and str(trainer.precision) == "bf16-mixed" else None


def local_part(param: Tensor) -> Tensor:
    """The part of a parameter this rank holds: an FSDP2 DTensor's local shard, a DeepSpeed ZeRO-3 partition
    (``ds_tensor``; the parameter itself is then an empty placeholder), else the whole tensor."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def local_pair(index: int, ref: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's part of a (reference, policy) parameter pair: the local shards of two DTensors sharded alike or
    the ZeRO-3 partitions of two parameters partitioned alike (an in-place lerp on them updates the sharded
    reference, with no gather), or the tensors themselves (a ZeRO-3 parameter is an empty placeholder: a lerp on
    it would silently do nothing)."""
    from torch.distributed.tensor import DTensor

    if hasattr(ref, "ds_tensor") or hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3: the partitions, alike
        both = hasattr(ref, "ds_tensor") and hasattr(param, "ds_tensor")
        if not both or ref.ds_tensor.shape != param.ds_tensor.shape:
            raise ValueError(f"Parameter #{index} is partitioned differently by ZeRO-3 in reference and "
                             "policy; build both inside the same deepspeed.zero.Init (configure_model does).")
        return local_part(ref), local_part(param)
    if isinstance(ref, DTensor) != isinstance(param, DTensor):
        raise TypeError(f"Parameter #{index} is sharded in only one of reference and policy; shard "
                        "both alike (configure_model applies the same fsdp2_shard to each).")
    if not isinstance(ref, DTensor):
        return ref, param
    if ref.placements != param.placements or ref.shape != param.shape:
        raise ValueError(f"Parameter #{index} is sharded differently in reference ({ref.placements}, "
                         f"{tuple(ref.shape)}) and policy ({param.placements}, {tuple(param.shape)}).")
    return local_part(ref), local_part(param)


@torch.no_grad()
def copy_local(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Copy each ``(target, source)`` pair's source into its target on this rank's parts only (`local_pair`): a
    sharded reference becomes its policy without a gather. Reshard FSDP2 roots first (`reshard`)."""
    for index, (target, source) in enumerate(pairs):
        local_target, local_source = local_pair(index, target, source)
        local_target.copy_(local_source.detach())


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 units."""
    return bool(_fsdp_modules(model))


def is_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned ``model``'s weights (its parameters are then empty placeholders)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Hold an FSDP2-sharded model's full weights for a sampling loop, then shard it again.

    FSDP2 all-gathers a unit's weights in every forward; a KV-cache loop makes one forward per token, and ranks
    whose responses end early would stop calling them (a collective hang). Inside this context each unit is
    all-gathered once and kept (``reshard_after_forward`` off), so the forwards communicate nothing and each rank may
    stop on its own. The price is one full copy of the model's weights on every rank during the rollout (for a 7B
    policy in bf16 about 13.5 GB). On exit the layers go back to resharding after forward, as
    `recipes.modules.sharding.fsdp2_shard` sets them (the root keeps its weights after forward, FSDP2's default), and
    every unit drops its gathered weights. No-op for a model without FSDP2 units.
    """
    units = _fsdp_modules(model)
    if not units:
        yield model
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # the root keeps its weights
            unit.reshard()


def fsdp2_shard_scalar(model: nn.Module, device_mesh: object | None, param_dtype: torch.dtype | None = None
                       ) -> nn.Module:
    """`recipes.modules.sharding.fsdp2_shard` for a one-label sequence-classification model read through
    `recipes.modules.scalar_models.token_scores`, which calls the backbone and the head directly (not the model's
    forward): the backbone (each decoder layer a unit) and the head are sharded as units of their own, so each gathers
    its
    weights when it runs; ``param_dtype`` as in ``fsdp2_shard``. No-op without a mesh."""
    if device_mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    from recipes.modules.models import is_peft
    from recipes.modules.scalar_models import head_name
    from recipes.modules.sharding import fsdp2_mesh_and_policy, fsdp2_shard

    hf = model.get_base_model() if is_peft(model) else model
    fsdp2_shard(getattr(hf, hf.base_model_prefix), device_mesh, param_dtype)
    mesh, policy = fsdp2_mesh_and_policy(device_mesh, param_dtype)
    fully_shard(getattr(hf, head_name(model)), mesh=mesh, mp_policy=policy)
    return model


def reshard(model: nn.Module) -> None:
    """Drop the gathered weights of every FSDP2 unit in ``model`` (no-op for units already sharded, or without FSDP2).

    FSDP2 keeps the root unit gathered after a forward that no backward follows (a frozen reference, say); an
    in-place update of the shards would then not reach that gathered copy, so update shards only after this."""
    for unit in _fsdp_modules(model):
        unit.reshard()
