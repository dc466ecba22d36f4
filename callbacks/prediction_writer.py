"""JSONLPredictionWriter: write what ``predict_step`` returns (lists of dicts) to a JSON Lines file as it comes."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override


class JSONLPredictionWriter(BasePredictionWriter):
    """Append each predicted row to ``path`` (one file per rank: ``.rank{r}`` is added beyond rank 0).

    Example::

        trainer.predict(module, datamodule, return_predictions=False)  # with JSONLPredictionWriter("out.jsonl")

    Args:
        path: output file; default ``<log_dir or default_root_dir>/predictions.jsonl``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self.written = 0

    def resolve_path(self, trainer: L.Trainer) -> str:
        path = self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.jsonl")
        return path if trainer.global_rank == 0 else f"{path}.rank{trainer.global_rank}"

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh file."""
        path = self.resolve_path(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "w", encoding="utf-8").close()
        self.written = 0

    @override
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Append this batch's rows."""
        with open(self.resolve_path(trainer), "a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row) + "\n")
        self.written += len(prediction)
