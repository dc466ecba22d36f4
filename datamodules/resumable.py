"""Exact mid-epoch resume for map-style data modules: count consumed training batches, skip them after a restart;
optional length-grouped batches and each epoch's padding fraction.

Used by every training data module here (SFT, preference, ranking, unpaired, prompts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from recipes.datamodules.io import DataFormatError
from recipes.datamodules.sampler import ResumableSampler, holdout_split, padding_fraction


class ResumableLoaderMixin:
    """Mix into a ``LightningDataModule`` (before it in the bases).

    ``resumable_loader(dataset, collate)`` builds the shuffled, rank-sharded training loader; the module's
    ``state_dict`` records how many micro-batches of the current epoch were consumed, and after a restore the next
    loader skips exactly those samples (`recipes.datamodules.sampler.ResumableSampler`). Batch size, seed and workers
    default to the module's ``batch_size``, ``seed`` and ``num_workers`` attributes.

    A module that knows its examples' widths (``example_length``; ``batch_cells`` where a batch is not one row per
    example) gets, on each training epoch, this rank's padding fraction (1 - real tokens / collated tensor cells) in
    ``padding_fraction`` and logged; with ``group_by_length`` its batches are grouped by that width.
    """

    _consumed: int = 0  # training micro-batches consumed in the current epoch
    _resume_skip: int = 0
    _batches_per_epoch: int = 0
    group_by_length: bool = False
    padding_fraction: float = math.nan  # this rank's, of the training epoch last iterated

    def example_length(self, example: Any) -> int | None:
        """The columns ``example`` needs in a collated training batch, the key of ``group_by_length``; None (this
        default): unknown, so the module neither groups by length nor measures its padding."""
        return None

    def batch_cells(self, examples: Sequence[Any]) -> tuple[int, int]:
        """(real tokens, tensor cells) of the collated training batch of ``examples``; this default: one row per
        example holding ``example_length`` tokens, right- or left-padded to the longest."""
        lengths = [self.example_length(e) for e in examples]
        return sum(lengths), len(lengths) * max(lengths)

    def resumable_loader(self, dataset: Sequence[Any], collate: Callable, batch_size: int | None = None,
                         seed: int | None = None, num_workers: int | None = None,
                         drop_last: bool = False) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        batch_size = batch_size if batch_size is not None else self.batch_size
        measured = len(dataset) > 0 and self.example_length(dataset[0]) is not None
        if self.group_by_length and len(dataset) > 0 and not measured:
            raise ValueError(f"{type(self).__name__}: group_by_length needs the examples' lengths, which this module "
                             "does not define (example_length); set group_by_length: false")
        lengths = [self.example_length(e) for e in dataset] if self.group_by_length else None
        measure = partial(self._measure_padding, dataset, batch_size, drop_last) if measured else None
        sampler = ResumableSampler(dataset, num_replicas=trainer.world_size if trainer else 1,
                                   rank=trainer.global_rank if trainer else 0, shuffle=True,
                                   seed=seed if seed is not None else self.seed, lengths=lengths,
                                   batch_size=batch_size, on_epoch=measure)
        sampler.skip(self._resume_skip * batch_size)
        self._consumed, self._resume_skip = self._resume_skip, 0
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                            num_workers=num_workers if num_workers is not None else self.num_workers)
        self._batches_per_epoch = len(loader)  # the sampler's length is the full shard, skip or not
        return loader

    def _measure_padding(self, dataset: Sequence[Any], batch_size: int, drop_last: bool, epoch: int,
                         order: list[int]) -> None:
        """The sampler's ``on_epoch``: the padding fraction of this rank's batches of the epoch being iterated
        (all of them, also after a resume's skip), cut as the loader cuts them."""
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        self.padding_fraction = padding_fraction(batches, lambda batch: self.batch_cells([dataset[i] for i in batch]))
        logging.getLogger(type(self).__module__).info("%s: epoch %d padding fraction %.3f (grouped by length: %s)",
                                                      type(self).__name__, epoch, self.padding_fraction,
                                                      self.group_by_length)

    def eval_loader(self, dataset: Sequence[Any], collate: Callable) -> DataLoader:
        """An evaluation loader in dataset order, with the module's ``batch_size`` and ``num_workers``."""
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        # The count is per epoch; at an epoch boundary Lightning starts a fresh epoch and nothing is skipped.
        n = self._batches_per_epoch
        return {"consumed_batches": self._consumed % n if n else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_skip = int(state_dict.get("consumed_batches", 0))


class SplitLoadersMixin(ResumableLoaderMixin):
    """`ResumableLoaderMixin` plus the loaders of a module with a ``train_set`` and a ``val_set`` of examples and a
    ``collate(examples)`` method: the resumable training loader and the in-order validation loader."""

    def holdout(self, examples: list, val_fraction: float, seed: int, source: str) -> tuple[list, list]:
        """`recipes.datamodules.sampler.holdout_split` of ``examples`` (train, validation), refusing a split that
        leaves nothing to train on (a positive fraction holds out at least one row)."""
        train, val = holdout_split(examples, val_fraction, seed)
        if not train:
            raise DataFormatError(source, None, None, f"has {len(examples)} usable rows and "
                                  f"val_fraction={val_fraction} holds out all of them, leaving none to train on",
                                  "add rows, lower data.val_fraction (0: no validation) or pass a separate "
                                  "data.val_data")
        return train, val

    def train_dataloader(self) -> DataLoader:
        return self.resumable_loader(self.train_set, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, self.collate)
