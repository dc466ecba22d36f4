"""Statistics over every data-parallel rank and FSDP2 helpers for rollouts: the pieces that make a PPO iteration on
N processes compute what one process computes on the same global batch. Outside torch.distributed each is the plain
single-process operation."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from recipes.modules.rl_utils import RunningMoments


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
    """``recipes.modules.rl_utils.masked_whiten`` with the statistics of every rank's masked entries together.

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
