"""RewardModule: a Bradley-Terry reward model, a causal-LM backbone with a scalar head read at the last real token.

It exports as a Hugging Face ``AutoModelForSequenceClassification`` (``num_labels=1``) that plain transformers loads
and that PPO uses as its reward model and to initialize its critic (`modules.scalar_models.build_scalar_model`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy
from transformers import PreTrainedTokenizerBase

from modules.export import save_pretrained
from modules.losses import PairwiseRewardLoss
from modules.models import ModelSpec
from modules.optim import adamw, build_optimization
from modules.scalar_models import build_scalar_model, sequence_scores


class RewardModule(L.LightningModule):
    """Pairwise reward modelling: ``loss = -log sigmoid(r_c - r_r - m) [+ center_coef (r_c + r_r)^2]``.

    Batches are `datamodules.preference.PreferenceDataModule` batches: ``(2B, T)`` with the chosen rows first and an
    optional per-pair ``margin`` ``(B,)``. The reward is the head's output at each row's last real token (the EOS
    that ends the response).

    Args:
        model: the backbone to build (`modules.models.ModelSpec`; a causal LM's weights load into it, the head starts
            fresh), built in ``configure_model``.
        tokenizer: the data's tokenizer (linked by the CLI); saved with the export.
        loss: the pairwise loss; default ``PairwiseRewardLoss()`` (no centering).
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        use_margin: pass the batch's ``margin`` to the loss when the data carries one.
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
    """

    def __init__(
        self,
        model: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        use_margin: bool = True,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "optimizer", "scheduler", "loss"])
        self.spec, self.tokenizer = model, tokenizer
        self.loss = loss if loss is not None else PairwiseRewardLoss()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.model: nn.Module | None = None
        self.val_loss, self.val_margin = MeanMetric(), MeanMetric()
        self.val_accuracy = BinaryAccuracy()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards of every row, read at its last real token. Shape: ``(B,)``, float32."""
        return sequence_scores(self.model, input_ids, attention_mask)

    def _step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rewards = self(batch["input_ids"], batch["attention_mask"])  # (2B,)
        b = rewards.shape[0] // 2
        chosen_rewards, rejected_rewards = rewards[:b], rewards[b:]
        margin = batch.get("margin") if self.hparams.use_margin else None
        losses, accuracies = self.loss(chosen_rewards, rejected_rewards, margin)
        return losses.mean(), accuracies, chosen_rewards.detach(), rejected_rewards.detach()

    # --- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, accuracies, chosen, rejected = self._step(batch)
        b = chosen.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("rewards/accuracies", accuracies.mean(), prog_bar=True, batch_size=b)
        self.log("rewards/margins", (chosen - rejected).mean(), batch_size=b)
        self.log("rewards/chosen", chosen.mean(), batch_size=b)
        self.log("rewards/rejected", rejected.mean(), batch_size=b)
        return loss

    # --- validation -------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, _, chosen, rejected = self._step(batch)
        margins = chosen - rejected  # (B,)
        self.val_loss.update(loss.detach(), weight=margins.shape[0])
        self.val_margin.update(margins)
        self.val_accuracy.update((margins > 0).long(), torch.ones_like(margins, dtype=torch.long))

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/rewards/accuracies", self.val_accuracy.compute(), prog_bar=True)
        self.log("val/rewards/margins", self.val_margin.compute())
        for metric in (self.val_loss, self.val_margin, self.val_accuracy):
            metric.reset()

    # --- prediction -------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Rewards of a batch of (prompt, response) rows (``data.predict_data``), in file order. Shape: ``(B,)``."""
        return self(batch["input_ids"], batch["attention_mask"])

    # --- setup ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_scalar_model(self.spec, self.tokenizer, self.hparams.max_length)

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimization(self, self.model.parameters(), self.optimizer_factory, self.scheduler_factory)

    def export_pretrained(self, path: str, merge_lora: bool = True, is_writer: bool = True) -> str:
        """Write an ``AutoModelForSequenceClassification`` folder (num_labels=1) with the tokenizer; under sharding,
        call on every rank, ``is_writer`` marks the rank that writes."""
        return save_pretrained(self.model, self.tokenizer, path, merge_lora=merge_lora, is_writer=is_writer)
