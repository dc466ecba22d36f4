"""AlignmentModule: the wiring every training LightningModule shares (model spec, tokenizer, optimizer and scheduler
factories, hyperparameters, the epoch-end metric logging, the Hugging Face export); each algorithm adds its math."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

from recipes.modules.export import model_card, save_pretrained
from recipes.modules.guards import check_gradients, check_loss, check_weights
from recipes.modules.models import ModelSpec, build_causal_lm
from recipes.modules.optim import adamw, build_optimization
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard, is_sharded
from recipes.modules.validation import check_vocabulary

# Constructor arguments kept out of the saved hyperparameters: objects, not settings (the YAML holds their config).
NOT_HPARAMS = ("tokenizer", "optimizer", "scheduler", "loss")


log = logging.getLogger(__name__)
_OLD_CLASS = re.compile(r"The class '((?:modules|datamodules|callbacks)\.[\w.]+)' requested by the checkpoint")


class ReadsOldCheckpoints:
    """``load_from_checkpoint`` also of a checkpoint that rlhf-recipes 0.1's CLI wrote: it names the module's class by
    its old path (``modules.sft.SFTModule``), which Lightning refuses; every 0.1 LightningModule kept its file and name,
    so the class is read at the same path under the one import root (``recipes.modules.sft.SFTModule``)."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except ValueError as error:
            old = _OLD_CLASS.search(str(error))
            if old is None or "_class_path" in kwargs:
                raise
            new = f"recipes.{old.group(1)}"
            log.warning("%s: class path '%s' (rlhf-recipes 0.1) read as '%s'", checkpoint_path, old.group(1), new)
            return super().load_from_checkpoint(checkpoint_path, *args, _class_path=new, **kwargs)


class AlignmentModule(ReadsOldCheckpoints, L.LightningModule):
    """Base of `SFTModule`, `DPOModule`, `RewardModule` and `RankingModule`: one trained network built from a
    `recipes.modules.models.ModelSpec` in ``configure_model`` and held as ``self.<network_attr>``.

    A subclass keeps its own typed ``__init__`` (the YAML keys) and passes the shared arguments up; every argument
    of the subclass's ``__init__`` except ``NOT_HPARAMS`` is saved as a hyperparameter. It lists the metrics its
    ``validation_step`` updates in ``epoch_metrics``; they are logged as ``val/<name>`` (or ``test/<name>``, since
    ``test_step`` runs ``validation_step``) and reset at the end of each epoch.

    Args:
        model: the network to build (`recipes.modules.models.ModelSpec`), built in ``configure_model`` so strategies can
            shard it at initialization.
        tokenizer: the data's tokenizer (linked by the CLI); gives vocabulary size and special ids to random models
            and is saved with the export.
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
        guard_non_finite: stop the run, naming the step and the likely cause, at a non-finite loss (before its
            backward) or gradient (before the optimizer step applies it), and refuse to checkpoint non-finite weights
            (`recipes.modules.guards`). The checks only read values: a finite run is unchanged.
    """

    network_attr = "policy"  # the attribute holding the trained network

    def __init__(
        self,
        model: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        max_length: int | None = None,
        guard_non_finite: bool = True,
    ) -> None:
        super().__init__()
        # Lightning collects the arguments of every __init__ on the stack, so the subclass's own are saved too.
        self.save_hyperparameters(ignore=list(NOT_HPARAMS))
        self.spec, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.guard_non_finite = guard_non_finite
        setattr(self, self.network_attr, None)

    @property
    def network(self) -> nn.Module | None:
        """The trained network (``self.policy``, or ``self.model`` for the reward model); None before it is built."""
        return getattr(self, self.network_attr)

    # --- guards: non-finite numbers stop the run before they reach the weights or a checkpoint -----------------
    def on_before_backward(self, loss: Tensor) -> None:
        """A non-finite loss stops the run before its backward."""
        if self.guard_non_finite:
            check_loss(self, loss)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Non-finite gradients stop the run before the step (and before clipping). Skipped where the gradients are
        not the module's to read: fp16's loss scaler skips overflowing steps itself, DeepSpeed holds them."""
        strategy = self.trainer.strategy
        scaler = getattr(strategy.precision_plugin, "scaler", None)
        if self.guard_non_finite and scaler is None and type(strategy).__name__ != "DeepSpeedStrategy":
            check_gradients(self, self.network.named_parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write non-finite weights, so a checkpoint callback never replaces a good file with a bad one."""
        if self.guard_non_finite:
            check_weights(self)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's padding fraction as ``data/padding_fraction`` where the data module measures it
        (`recipes.datamodules.resumable.ResumableLoaderMixin`: padded cells over all cells of its batches)."""
        fraction = getattr(getattr(self._trainer, "datamodule", None), "padding_fraction", None)
        if fraction is not None and math.isfinite(fraction):  # NaN until a training epoch was iterated
            self.log("data/padding_fraction", float(fraction))

    # --- validation and test ----------------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, tuple[Metric, bool]]:
        """``{name: (metric, shown in the progress bar)}``: what ``validation_step`` accumulates."""
        return {}

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    def log_epoch_metrics(self, stage: str) -> None:
        """Log every epoch metric as ``<stage>/<name>`` (synced across processes by torchmetrics), then reset it."""
        for name, (metric, prog_bar) in self.epoch_metrics().items():
            self.log(f"{stage}/{name}", metric.compute(), prog_bar=prog_bar)
            metric.reset()

    # --- setup ------------------------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        """The network to train: a causal LM, FSDP2-sharded under ``ModelParallelStrategy`` (else unchanged)."""
        network = build_causal_lm(self.spec, self.tokenizer, self.hparams.max_length)
        return fsdp2_shard(network, self.device_mesh, fsdp2_param_dtype(self))

    def configure_model(self) -> None:
        if self.network is None:  # Lightning may call this more than once
            setattr(self, self.network_attr, self.build_network())
            check_vocabulary(type(self).__name__, self.network, self.spec, self.tokenizer)
            if self.device_mesh is not None and not is_sharded(self.network):  # no DDP either: ranks would diverge
                raise RuntimeError(f"{type(self).__name__}.build_network returned an unsharded network under "
                                   "ModelParallelStrategy, which synchronizes nothing else: shard it with "
                                   "recipes.modules.sharding.fsdp2_shard (or fsdp2_shard_scalar) over "
                                   "self.device_mesh.")

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``trainer.gradient_clip_val`` by norm under ``FSDPStrategy`` too, whose precision plugin refuses it: the
        FSDP root clips the norm over every rank's shards. Elsewhere Lightning's own clipping."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and \
                type(self.trainer.strategy).__name__ == "FSDPStrategy":
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimization(self, self.network.parameters(), self.optimizer_factory, self.scheduler_factory)

    def train(self, mode: bool = True) -> AlignmentModule:
        """Lightning switches the whole module to train mode; a frozen reference module (``self.reference``, as DPO
        and KTO hold) stays in eval (no dropout)."""
        super().train(mode)
        reference = getattr(self, "reference", None)
        if isinstance(reference, nn.Module):
            reference.eval()
        return self

    def export_pretrained(self, path: str, merge_lora: bool = True, is_writer: bool = True) -> str:
        """Write a Hugging Face folder (weights, config, tokenizer) that plain transformers loads. Under sharding,
        call on every rank (the weights are gathered collectively); ``is_writer`` marks the rank that writes."""
        return save_pretrained(self.network, self.tokenizer, path, merge_lora=merge_lora, is_writer=is_writer,
                               card=model_card(self))
