"""A resumable, rank-aware sampler: a killed run picks up at the next unseen batch of the same shuffled order."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, one shard per rank) that can skip the samples a resumed run
    already consumed in its current epoch.

    It subclasses ``DistributedSampler`` so Lightning keeps it instead of injecting its own; Lightning calls
    ``set_epoch`` every epoch. ``skip(n)`` drops the first ``n`` samples of this rank's shard for the next iteration
    only; ``__len__`` stays the full shard length so Lightning's restored batch counter still ends the epoch at the
    right place.

    Args:
        data_source: the dataset.
        num_replicas, rank: world size and this process's rank (1 and 0 on a single process).
        shuffle, seed: as ``DistributedSampler``; the order of epoch ``e`` depends only on ``seed + e``.
    """

    def __init__(self, data_source: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self._skip = 0

    def skip(self, num_samples: int) -> None:
        self._skip = num_samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0  # only the first iteration after a resume is shortened
        return iter(indices[skip:])


def holdout_split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` of the examples held out (at least one when the fraction
    is positive), both kept in their original order."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction)) if fraction > 0 else 0
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]
