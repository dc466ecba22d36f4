"""JSONLPredictionWriter: write what ``predict_step`` returns to a JSON Lines file as it comes, one row per example."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override


def to_json(value: Any) -> Any:
    """``value`` with every tensor (and numpy value) turned into numbers and lists, inside dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()  # a 0-d tensor becomes a Python number
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    return value


def prediction_rows(prediction: Any, batch_indices: Sequence[int] | None = None,
                    field: str = "score") -> list[dict[str, Any]]:
    """One JSON-ready dict per example of a batch's ``prediction``.

    Accepted: a list of dicts (one per example, e.g. generations); a tensor whose first dimension is the batch (each
    row becomes ``{field: value}``, e.g. a reward model's scores); a dict of per-example columns of equal length.
    With ``batch_indices`` (the examples' positions in the predict dataset, which Lightning passes to writers) the rows
    of a tensor or a dict of columns get an ``index`` unless they have one, so they can be matched to the input
    file's rows (counted from 0); a list of dicts is written as it is.
    """
    if isinstance(prediction, torch.Tensor):
        values = to_json(prediction.reshape(len(prediction), -1) if prediction.dim() > 1 else prediction)
        rows = [{field: v} for v in (values if prediction.dim() else [values])]
    elif isinstance(prediction, Mapping):
        columns = {k: to_json(v) for k, v in prediction.items()}
        sizes = {k: len(v) for k, v in columns.items() if isinstance(v, list)}
        if not sizes or len(set(sizes.values())) != 1 or len(sizes) != len(columns):
            raise TypeError(f"JSONLPredictionWriter: a dict prediction needs per-example columns of one length; got "
                            f"lengths {sizes} for keys {sorted(columns)}")
        n = next(iter(sizes.values()))
        rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    elif isinstance(prediction, (list, tuple)) and all(isinstance(r, Mapping) for r in prediction):
        return [to_json(r) for r in prediction]  # rows that carry their own text, written as they are
    else:
        raise TypeError(f"JSONLPredictionWriter: predict_step returned {type(prediction).__name__}; return a tensor "
                        "with one value per example, a dict of per-example columns, or a list of dicts")
    if batch_indices is not None and len(batch_indices) == len(rows):
        rows = [{"index": int(i), **row} if "index" not in row else row for i, row in zip(batch_indices, rows)]
    return rows


class JSONLPredictionWriter(BasePredictionWriter):
    """Append each predicted row to ``path`` (one file per rank: ``.rank{r}`` is added beyond rank 0).

    Tensors are written as numbers and lists (`prediction_rows`): a reward model's ``predict_step`` returns a ``(B,)``
    tensor of scores, written as ``{"index": i, "score": s}`` per text, ``i`` its row of ``data.predict_data``
    (counted from 0).

    Example::

        trainer.predict(module, datamodule, return_predictions=False)  # with JSONLPredictionWriter("out.jsonl")

    Args:
        path: output file; default ``<log_dir or default_root_dir>/predictions.jsonl``.
        field: the key under which a tensor prediction's per-example values are written.
    """

    def __init__(self, path: str | None = None, field: str = "score") -> None:
        super().__init__(write_interval="batch")
        self.path, self.field = path, field
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
        """Append this batch's rows, tensors converted."""
        rows = prediction_rows(prediction, batch_indices, self.field)
        with open(self.resolve_path(trainer), "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        self.written += len(rows)
