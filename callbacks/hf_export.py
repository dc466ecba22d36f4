"""HFExport: write the trained model as a Hugging Face folder when fitting ends."""

from __future__ import annotations

import logging
import os

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger(__name__)


class HFExport(Callback):
    """At the end of ``fit``, call the module's ``export_pretrained(path)`` on global rank 0.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` (policies) or
    ``AutoModelForSequenceClassification.from_pretrained`` (reward models) with no import of this project. Each fit
    exports into its own version folder; ``<default_root_dir>/hf`` is then made a link to it, so a later step (an
    evaluation, a PPO run starting from this SFT) names one path that always holds the newest export. A
    ``fast_dev_run`` exports nothing.

    Example::

        trainer = L.Trainer(default_root_dir="runs/sft", callbacks=[HFExport()])  # runs/sft/hf -> version_N/hf

    Args:
        dirpath: output folder; default ``<trainer.log_dir or default_root_dir>/hf``.
        merge_lora: merge LoRA adapters into the base weights (``False``: save the adapter folder).
        link_latest: point ``<default_root_dir>/hf`` at the export (a relative symlink, replaced by each fit; a real
            folder there is left alone, with a warning). Only for the default folder: an export to a ``dirpath`` you
            chose is left where you said (and a link never points at another callback's folder).
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True, link_latest: bool = True) -> None:
        self.dirpath, self.merge_lora, self.link_latest = dirpath, merge_lora, link_latest
        self.exported_to: str | None = None

    def resolve_path(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf")

    @staticmethod
    def latest_path(trainer: L.Trainer) -> str:
        return os.path.join(trainer.default_root_dir, "hf")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export after the last optimizer step: every rank takes part (sharded weights are gathered), rank 0
        writes and links."""
        if trainer.fast_dev_run:  # a smoke run of a few batches: no model worth keeping, no folder left behind
            log.info("HFExport: fast_dev_run, nothing exported")
            return
        if not hasattr(pl_module, "export_pretrained"):
            raise TypeError(f"{type(pl_module).__name__} has no export_pretrained(path) method to export with.")
        path = trainer.strategy.broadcast(self.resolve_path(trainer))
        if trainer.is_global_zero and os.path.islink(path):  # an older run's newest-export link: write a folder
            os.unlink(path)  # there, not through the link into that run's export
        trainer.strategy.barrier("hf_export_path")
        self.exported_to = pl_module.export_pretrained(path, merge_lora=self.merge_lora,
                                                       is_writer=trainer.is_global_zero)
        if self.link_latest and self.dirpath is None and trainer.is_global_zero:
            self.link(self.exported_to, self.latest_path(trainer))
        trainer.strategy.barrier("hf_export")

    @staticmethod
    def link(target: str, link: str) -> None:
        """Make ``link`` a relative symlink to ``target``, atomically replacing an older link; leave a real folder."""
        if os.path.abspath(target) == os.path.abspath(link) or (
                os.path.realpath(target) == os.path.realpath(link) and not os.path.islink(link)):
            return  # the export is the folder itself (log_dir is default_root_dir): a link would point at itself
        if os.path.exists(link) and not os.path.islink(link):
            log.warning("HFExport: %s is a folder, not a link, so it still holds an older export; the new one is %s "
                        "(remove the folder to have %s follow the newest export)", link, target, link)
            return
        tmp = f"{link}.tmp{os.getpid()}"
        try:
            if os.path.lexists(tmp):  # left by a run that stopped between the two steps below
                os.unlink(tmp)
            os.symlink(os.path.relpath(target, os.path.dirname(os.path.abspath(link))), tmp, target_is_directory=True)
            os.replace(tmp, link)  # renames the link itself, never what an old link points to
        except OSError as e:  # a file system without symlinks
            log.warning("HFExport: could not link %s to %s (%s); use the export folder itself", link, target, e)
            return
        log.info("HFExport: %s -> %s", link, target)
