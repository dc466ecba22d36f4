"""A resumable, rank-aware sampler: a killed run picks up at the next unseen batch of the same shuffled order;
optionally grouped by length (megabatches sorted by length) to pad less."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence, Sized

import torch
from torch.utils.data import DistributedSampler

GROUP_BATCHES = 50  # global batches per megabatch of `group_by_length` (the HF Trainer's and torchtune's 50)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, one shard per rank) that can skip the samples a resumed run
    already consumed in its current epoch, and can group samples of similar length into the same batches.

    It subclasses ``DistributedSampler`` so Lightning keeps it instead of injecting its own; Lightning calls
    ``set_epoch`` every epoch. ``skip(n)`` drops the first ``n`` samples of this rank's order for the next iteration
    only; ``__len__`` stays the full shard length so Lightning's restored batch counter still ends the epoch at the
    right place.

    Without ``lengths`` the order is ``DistributedSampler``'s. With them (the "megabatch" scheme of HF Trainer's
    ``LengthGroupedSampler``): the epoch's permutation, padded to a multiple of the world size exactly as
    ``DistributedSampler`` pads it, is cut into megabatches of ``batch_size * num_replicas * group_batches``
    samples; each is sorted by length (descending, stable) and cut into global batches of ``batch_size *
    num_replicas``, whose order is then shuffled by the epoch's generator. A global batch that the permutation cannot
    fill (``num_samples % batch_size`` per rank) is taken from the permutation's tail before grouping and kept last,
    where a ``drop_last`` loader leaves it out, so what is dropped stays a random sample. Rank ``r`` takes every
    ``num_replicas``-th sample of each global batch from the ``r``-th: all ranks see similar lengths at a step, and
    as many samples as before. The order depends only on ``seed + epoch``, the lengths and the sizes.

    Args:
        data_source: the dataset.
        num_replicas, rank: world size and this process's rank (1 and 0 on a single process).
        shuffle, seed: as ``DistributedSampler``; the order of epoch ``e`` depends only on ``seed + e``.
        lengths: one length per sample (the columns it needs in a collated batch) to group by; None: no grouping.
        batch_size: samples per batch and rank (the loader's), for grouping.
        group_batches: global batches per megabatch; larger groups pad less and mix lengths less.
        on_epoch: called with ``(epoch, order)`` on each iteration, the rank's full order of the epoch (before any
            skip), e.g. to measure its padding.
    """

    def __init__(self, data_source: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, lengths: Sequence[int] | None = None, batch_size: int = 1,
                 group_batches: int = GROUP_BATCHES,
                 on_epoch: Callable[[int, list[int]], None] | None = None) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        if lengths is not None and len(lengths) != len(data_source):
            raise ValueError(f"ResumableSampler: {len(lengths)} lengths for {len(data_source)} samples.")
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"ResumableSampler: batch_size ({batch_size}) and group_batches ({group_batches}) "
                             "must be >= 1.")
        self.lengths = list(lengths) if lengths is not None else None
        self.batch_size, self.group_batches, self.on_epoch = batch_size, group_batches, on_epoch
        self._skip = 0

    def skip(self, num_samples: int) -> None:
        self._skip = num_samples

    def order(self) -> list[int]:
        """This rank's full order of the current epoch (no skip)."""
        return list(super().__iter__()) if self.lengths is None else self._grouped_order()

    def __iter__(self) -> Iterator[int]:
        indices = self.order()
        if self.on_epoch is not None:
            self.on_epoch(self.epoch, indices)
        skip, self._skip = self._skip, 0  # only the first iteration after a resume is shortened
        return iter(indices[skip:])

    def _grouped_order(self) -> list[int]:
        """This rank's share of the epoch's megabatch order (the class docstring's steps, in order)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        indices = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        pad = self.total_size - n
        if pad:  # DistributedSampler's padding: the permutation's first samples again
            indices += (indices * -(-pad // n))[:pad]
        width = self.batch_size * self.num_replicas  # one global batch
        cut = len(indices) - len(indices) % width
        indices, tail = indices[:cut], indices[cut:]
        by_length = lambda i: -self.lengths[i]  # descending; sorted() is stable, so ties keep the permutation's order
        mega = width * self.group_batches
        batches = []
        for start in range(0, len(indices), mega):
            group = sorted(indices[start:start + mega], key=by_length)
            batches += [group[b:b + width] for b in range(0, len(group), width)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if tail:
            batches.append(sorted(tail, key=by_length))
        return [i for batch in batches for i in batch[self.rank::self.num_replicas]]


def padding_fraction(batches: Sequence[Sequence[int]], cells: Callable[[Sequence[int]], tuple[int, int]]) -> float:
    """1 - (real tokens / tensor cells) over ``batches`` of sample indices; ``cells(batch)`` gives both counts of
    one collated batch. 0.0 for no batches."""
    tokens = total = 0
    for batch in batches:
        real, size = cells(batch)
        tokens, total = tokens + real, total + size
    return 1.0 - tokens / total if total else 0.0


def holdout_split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` of the examples held out (at least one when the fraction
    is positive), both kept in their original order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction)) if fraction > 0 else 0
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]
