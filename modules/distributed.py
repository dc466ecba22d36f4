"""Statistics over every data-parallel rank and FSDP2 helpers for rollouts: the pieces that make a PPO iteration on
N processes compute what one process computes on the same global batch. Outside torch.distributed each is the plain
single-process operation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from modules.rl_utils import RunningMoments


def world_size() -> int:
    """Processes in the default group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over every rank (a new tensor; ``x`` is left alone)."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def global_masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``modules.rl_utils.masked_whiten`` with the statistics of every rank's masked entries together.

    ``(x - mean) / sqrt(var + eps)`` with ``mean = S1 / n`` and the unbiased ``var = sum m (x - mean)^2 / (n - 1)``,
    each sum all-reduced over the ranks (two passes, so no catastrophic cancellation). On one process this is
    exactly ``masked_whiten`` over the local batch; on N it is the whitening of the whole global rollout batch, which
    is what PPO's "advantage normalization over the rollout batch" (Xu et al., arXiv 2404.10719, Table 3) means.

    Args:
        x: values. Shape: (b, t)
        mask: 1 where an entry counts. Shape: (b, t)

    Returns:
        The whitened values, 0 on padding. Shape: (b, t)
    """
    m = mask.to(x.dtype)
    total = all_reduce_sum(torch.stack([(x * m).sum(), m.sum()]))
    mean = total[0] / total[1]
    sq = all_reduce_sum(((x - mean) ** 2 * m).sum())
    var = sq / (total[1] - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def all_gather_flat(x: Tensor) -> Tensor:
    """Every rank's ``x`` (any length, flattened), concatenated in rank order."""
    x = x.detach().flatten()
    n = world_size()
    if n == 1:
        return x
    count = torch.tensor([x.numel()], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(n)]
    dist.all_gather(counts, count)
    width = int(max(c.item() for c in counts))
    padded = torch.zeros(width, dtype=x.dtype, device=x.device)
    padded[:x.numel()] = x
    parts = [torch.zeros_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)])


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


def per_rank_state(state: object) -> list[object]:
    """Every rank's ``state``, in rank order (``[state]`` on one process): for a checkpoint that rank 0 writes alone
    (Lightning's DDP file, the metadata file of a distributed checkpoint), so each rank's own value survives; read it
    back with `own_state`. A collective: every rank calls it."""
    if world_size() == 1:
        return [state]
    states: list[object] = [None] * world_size()
    dist.all_gather_object(states, state)
    return states


def own_state(states: object, rank: int, what: str) -> object | None:
    """This rank's entry of a `per_rank_state` list. A checkpoint written by another number of ranks cannot give
    each rank its own value: a warning names ``what`` and None is returned (start it afresh). A single value (a
    checkpoint from before per-rank states) is returned as it is."""
    if not isinstance(states, list):
        return states
    if len(states) != world_size():
        import logging

        logging.getLogger(__name__).warning(
            "%s: the checkpoint holds %d ranks' states, this run has %d ranks; starting it afresh on every rank "
            "(the run continues, but not exactly as an uninterrupted one would).", what, len(states), world_size())
        return None
    return states[rank]


def update_global_moments(moments: RunningMoments, x: Tensor) -> None:
    """Merge every rank's ``x`` into ``moments``, so each rank's running statistics are the same."""
    moments.update(all_gather_flat(x))


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
    `modules.models.fsdp2_shard` sets them (the root keeps its weights after forward, FSDP2's default), and every
    unit drops its gathered weights. No-op for a model without FSDP2 units.
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
    """`modules.models.fsdp2_shard` for a one-label sequence-classification model read through
    `modules.scalar_models.token_scores`, which calls the backbone and the head directly (not the model's forward):
    the backbone (each decoder layer a unit) and the head are sharded as units of their own, so each gathers its
    weights when it runs; ``param_dtype`` as in ``fsdp2_shard``. No-op without a mesh."""
    if device_mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    from modules.models import fsdp2_mesh_and_policy, fsdp2_shard, is_peft
    from modules.scalar_models import _head_name

    hf = model.get_base_model() if is_peft(model) else model
    fsdp2_shard(getattr(hf, hf.base_model_prefix), device_mesh, param_dtype)
    mesh, policy = fsdp2_mesh_and_policy(device_mesh, param_dtype)
    fully_shard(getattr(hf, _head_name(model)), mesh=mesh, mp_policy=policy)
    return model


def reshard(model: nn.Module) -> None:
    """Drop the gathered weights of every FSDP2 unit in ``model`` (no-op for units already sharded, or without FSDP2).

    FSDP2 keeps the root unit gathered after a forward that no backward follows (a frozen reference, say); an
    in-place update of the shards would then not reach that gathered copy, so update shards only after this."""
    for unit in _fsdp_modules(model):
        unit.reshard()
