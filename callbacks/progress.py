"""StepProgressBar: Lightning's tqdm bar, counting optimizer steps out of ``max_steps`` in a run bounded by steps."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from typing_extensions import override


class StepProgressBar(TQDMProgressBar):
    """A `TQDMProgressBar` that shows ``global_step / max_steps`` on one bar for the whole run when the run ends by
    steps (``trainer.max_steps`` set, ``max_epochs`` -1 or unset); otherwise it is the plain per-epoch bar.

    Lightning's bars read ``max_epochs`` for the total: with ``max_steps`` alone that is -1, so the rich bar reads
    ``Epoch 2/-2`` and the tqdm one restarts each epoch with no sign of the end. The CLI adds this bar where the
    configuration names none and ``trainer.enable_progress_bar`` is not false.

    Example::

        trainer = L.Trainer(max_steps=300, callbacks=[StepProgressBar(refresh_rate=10)])

    Args:
        refresh_rate: update the bar every this many optimizer steps (batches in per-epoch mode); 0 hides it.
        process_position: offset of the bars, in lines, below other bars.
        leave: keep each finished per-epoch bar on screen (the one step bar always stays).
    """

    @staticmethod
    def unless_configured(trainer_kwargs: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
        """``callbacks`` plus a `StepProgressBar` unless the Trainer's keyword arguments disable the bar
        (``enable_progress_bar: false``) or list a progress bar of their own in ``callbacks``."""
        listed = trainer_kwargs.get("callbacks") or []
        given = [*callbacks, *(listed if isinstance(listed, list) else [listed])]
        if trainer_kwargs.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in given):
            return callbacks
        return [*callbacks, StepProgressBar()]

    def by_steps(self, trainer: L.Trainer) -> bool:
        """Whether the run ends at ``max_steps`` rather than at an epoch count."""
        return trainer.max_steps > 0 and trainer.max_epochs in (-1, None)

    def step_description(self, trainer: L.Trainer) -> str:
        """``Epoch 2, steps``: the epoch with no total (there is none), the count after it being steps."""
        return f"Epoch {trainer.current_epoch}, steps"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open the training bar; by steps it starts at ``global_step`` (a resumed run is part way)."""
        super().on_train_start(trainer, pl_module)
        if self.by_steps(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step  # tqdm's rate counts from here
            bar.set_description(self.step_description(trainer))
            self._set_n(trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """By steps, keep the one bar and name the epoch without a total; else Lightning's per-epoch reset."""
        if not self.by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.step_description(trainer))

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """By steps, move to ``global_step`` (already counting the step just taken: 1 after the first)."""
        if not self.by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        # A PPO iteration takes several optimizer steps: compare with the last shown step, not step % refresh_rate.
        if self.is_enabled and (step - bar.n >= self.refresh_rate or step >= trainer.max_steps):
            self._set_n(step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """By steps, the bar outlives the epoch; else Lightning's (closed here when ``leave``)."""
        if not self.by_steps(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _set_n(self, n: int) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = n
            bar.refresh()
