"""HFExport: write the trained model as a Hugging Face folder when fitting ends."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class HFExport(Callback):
    """At the end of ``fit``, call the module's ``export_pretrained(path)`` on global rank 0.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` (policies) or
    ``AutoModelForSequenceClassification.from_pretrained`` (reward models) with no import of this project.

    Example::

        trainer = L.Trainer(callbacks=[HFExport("runs/sft/hf")])

    Args:
        dirpath: output folder; default ``<trainer.log_dir or default_root_dir>/hf``.
        merge_lora: merge LoRA adapters into the base weights (``False``: save the adapter folder).
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        self.dirpath, self.merge_lora = dirpath, merge_lora
        self.exported_to: str | None = None

    def resolve_path(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export after the last optimizer step: every rank takes part (sharded weights are gathered), rank 0
        writes."""
        if not hasattr(pl_module, "export_pretrained"):
            raise TypeError(f"{type(pl_module).__name__} has no export_pretrained(path) method to export with.")
        path = trainer.strategy.broadcast(self.resolve_path(trainer))
        self.exported_to = pl_module.export_pretrained(path, merge_lora=self.merge_lora,
                                                       is_writer=trainer.is_global_zero)
        trainer.strategy.barrier("hf_export")
