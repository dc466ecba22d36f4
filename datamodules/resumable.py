"""Exact mid-epoch resume for map-style data modules: count consumed training batches, skip them after a restart.

The same mechanism as `datamodules.sft.SFTDataModule` (which still carries its own copy; it can inherit this mixin
instead in a later, separate change). Used by `datamodules.preference.PreferenceDataModule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader

from datamodules.sampler import ResumableSampler


class ResumableLoaderMixin:
    """Mix into a ``LightningDataModule`` that has ``self.batch_size``, ``self.seed`` and ``self.num_workers``.

    ``resumable_loader(dataset, collate)`` builds the shuffled, rank-sharded training loader; the module's
    ``state_dict`` records how many micro-batches of the current epoch were consumed, and after a restore the next
    loader skips exactly those samples (`datamodules.sampler.ResumableSampler`).
    """

    _consumed: int = 0  # training micro-batches consumed in the current epoch
    _resume_skip: int = 0
    _train_len: int = 0

    def resumable_loader(self, dataset: Sequence[Any], collate: Callable) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        sampler = ResumableSampler(dataset, num_replicas=trainer.world_size if trainer else 1,
                                   rank=trainer.global_rank if trainer else 0, shuffle=True, seed=self.seed)
        sampler.skip(self._resume_skip * self.batch_size)
        self._consumed, self._resume_skip, self._train_len = self._resume_skip, 0, len(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        # The count is per epoch; at an epoch boundary Lightning starts a fresh epoch and nothing is skipped.
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = -(-self._train_len // world)
        n_batches = -(-per_rank // self.batch_size)
        return {"consumed_batches": self._consumed % n_batches if n_batches else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_skip = int(state_dict.get("consumed_batches", 0))
