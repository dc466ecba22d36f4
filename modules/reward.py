"""RewardModule: a Bradley-Terry reward model, a causal-LM backbone with a scalar head read at the last real token.

It exports as a Hugging Face ``AutoModelForSequenceClassification`` (``num_labels=1``) that plain transformers loads
and that PPO uses as its reward model and to initialize its critic (`recipes.modules.scalar_models.build_scalar_model`).
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import BinaryAccuracy
from transformers import PreTrainedTokenizerBase

from recipes.modules.base import AlignmentModule
from recipes.modules.export import model_card, save_pretrained
from recipes.modules.losses import PairwiseRewardLoss
from recipes.modules.models import ModelSpec
from recipes.modules.optim import adamw
from recipes.modules.scalar_models import build_scalar_model, sequence_scores
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard_scalar
from recipes.modules.tokenizer import appending_eos

log = logging.getLogger(__name__)


class RewardModule(AlignmentModule):
    """Pairwise reward modelling: ``loss = -log sigmoid(r_c - r_r - m) [+ center_coef (r_c + r_r)^2]``.

    Batches are `recipes.datamodules.preference.PreferenceDataModule` batches: ``(2B, T)`` with the chosen rows first
    and an optional per-pair ``margin`` ``(B,)``. The reward is the head's output at each row's last real token (the EOS
    that ends the response).

    Args:
        model: the backbone to build (`recipes.modules.models.ModelSpec`; a causal LM's weights load into it, the head
        starts
            fresh), built in ``configure_model``.
        tokenizer: the data's tokenizer (linked by the CLI); saved with the export.
        loss: the pairwise loss; default ``PairwiseRewardLoss()`` (no centering).
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        use_margin: pass the batch's ``margin`` to the loss when the data carries one.
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
        guard_non_finite: stop at a non-finite loss or gradient and refuse non-finite checkpoints
            (`recipes.modules.base.AlignmentModule`).
    """

    network_attr = "model"
    model: nn.Module | None  # the scalar model, built in configure_model
    input_convention = (  # written into the export's README.md
        "Score `prompt + response` followed by the EOS token: the reward is the head's output at that last token, as "
        "in training. The exported tokenizer appends EOS itself (tokenizer.json's post-processor, `add_eos_token: "
        "true`), so `pipeline(\"text-classification\", model=folder, function_to_apply=\"none\")` scores the text as "
        "given; do not append another EOS (encode with `add_special_tokens=False` to feed ids you built yourself). "
        "`recipes.modules.tokenizer.load_tokenizer` restores the training tokenizer (no EOS appended), which "
        "`SequenceClassifierReward` uses. A tokenizer that cannot append EOS (no `eos_appended_for_scoring` in "
        "tokenizer_config.json) is exported as it is: append the EOS token to the text yourself.")

    def __init__(
        self,
        model: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        use_margin: bool = True,
        max_length: int | None = None,
        guard_non_finite: bool = True,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, scheduler, max_length, guard_non_finite)
        self.loss = loss if loss is not None else PairwiseRewardLoss()
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

    def epoch_metrics(self) -> dict[str, tuple[Metric, bool]]:
        return {"loss": (self.val_loss, True), "rewards/accuracies": (self.val_accuracy, True),
                "rewards/margins": (self.val_margin, False)}

    # --- prediction -------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Rewards of a batch of (prompt, response) rows (``data.predict_data``), in file order. Shape: ``(B,)``."""
        return self(batch["input_ids"], batch["attention_mask"])

    # --- setup ------------------------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        """A causal-LM backbone with a fresh scalar head; exports as ``AutoModelForSequenceClassification``. Under
        ``ModelParallelStrategy`` backbone layers and head are FSDP2 units (`sequence_scores` calls them directly)."""
        network = build_scalar_model(self.spec, self.tokenizer, self.hparams.max_length)
        return fsdp2_shard_scalar(network, self.device_mesh, fsdp2_param_dtype(self))

    def export_pretrained(self, path: str, merge_lora: bool = True, is_writer: bool = True) -> str:
        """`AlignmentModule.export_pretrained` with a tokenizer that appends EOS (``input_convention``) and the
        module's model card."""
        tokenizer = self.tokenizer
        if tokenizer is not None and is_writer:
            try:
                tokenizer = appending_eos(tokenizer)
            except TypeError as e:
                log.warning("Reward-model export: %s", e)
        return save_pretrained(self.network, tokenizer, path, merge_lora=merge_lora, is_writer=is_writer,
                               card=model_card(self) if is_writer else None)
