"""RankingModule: RRHF, PRO or any ranking loss over k scored responses per prompt, one forward over all of them."""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from transformers import PreTrainedTokenizerBase

from recipes.modules.base import AlignmentModule
from recipes.modules.models import ModelSpec
from recipes.modules.optim import adamw
from recipes.modules.policy import completion_logprobs, sequence_logprobs
from recipes.modules.ranking_losses import RRHFLoss, ranking_accuracy

LOSS_METRICS = ("loss", "rank_loss", "sft_loss")


class RankingModule(AlignmentModule):
    """Align a causal LM policy with rankings of k >= 2 scored responses per prompt; no reference model.

    Every real response of the ``(B, k, T)`` batch (`recipes.datamodules.ranking.RankingDataModule`) goes through the
    policy in one flattened forward (`recipes.modules.policy.completion_logprobs`); the loss (``RRHFLoss`` by default,
    ``PROLoss`` or any module with the same signature, by ``class_path``) sees the ``(B, k)`` summed log-probs, the
    response lengths, the scores and the mask of real response slots, and returns per-prompt losses.

    Metrics: ``train/loss``, ``train/rank_loss``, ``train/sft_loss``, ``rank/accuracy`` (the fraction of ordered
    pairs ``s_i > s_j`` with ``p_i > p_j``, ``p`` the length-normalized log-prob), and ``val/...`` for each.

    Args:
        model: the policy to build (`recipes.modules.models.ModelSpec`), built in ``configure_model``.
        tokenizer: the data's tokenizer (linked by the CLI); saved with the export.
        loss: ranking loss module; default ``RRHFLoss()``.
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
        guard_non_finite: stop at a non-finite loss or gradient and refuse non-finite checkpoints
            (`recipes.modules.base.AlignmentModule`).
    """

    policy: nn.Module | None  # built in configure_model (`AlignmentModule.build_network`)

    def __init__(
        self,
        model: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        max_length: int | None = None,
        guard_non_finite: bool = True,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, scheduler, max_length, guard_non_finite)
        self.loss = loss if loss is not None else RRHFLoss()
        self.val_losses = nn.ModuleDict({name: MeanMetric() for name in LOSS_METRICS})
        self.val_accuracy = MeanMetric()  # weighted by the number of ordered pairs

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed completion log-probs and completion lengths of every response slot, both ``(B, k)`` (0 on
        padding slots, which never reach the model)."""
        b, k, t = batch["input_ids"].shape
        real = batch["response_mask"].reshape(-1)  # (B*k,)
        rows = {name: batch[name].reshape(b * k, t)[real]
                for name in ("input_ids", "attention_mask", "completion_mask")}  # (N, T), N real responses
        logprobs, mask = completion_logprobs(self.policy, rows["input_ids"], rows["attention_mask"],
                                             rows["completion_mask"])  # (N, T')
        logps = sequence_logprobs(logprobs, mask)  # (N,)
        slots = real.nonzero().squeeze(-1)
        out = logps.new_zeros(b * k).index_put((slots,), logps)
        lengths = logps.new_zeros(b * k).index_put((slots,), mask.sum(-1).to(logps.dtype))
        return out.view(b, k), lengths.view(b, k)

    def _step(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        logps, lengths = self(batch)
        scores, valid = batch["scores"], batch["response_mask"]
        losses, rank_losses, sft_losses = self.loss(logps, lengths, scores, valid)
        correct, pairs = ranking_accuracy(logps, lengths, scores, valid)
        return {"loss": losses.mean(), "rank_loss": rank_losses.mean(), "sft_loss": sft_losses.mean()}, \
            correct.sum(), pairs.sum()

    # --- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        values, correct, pairs = self._step(batch)
        b = batch["scores"].shape[0]
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=b)
        self.log("rank/accuracy", correct / pairs.clamp(min=1), prog_bar=True, batch_size=b)
        return values["loss"]

    # --- validation -------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        values, correct, pairs = self._step(batch)
        for name, value in values.items():
            self.val_losses[name].update(value.detach(), weight=batch["scores"].shape[0])
        if pairs > 0:
            self.val_accuracy.update(correct / pairs, weight=pairs)

    def epoch_metrics(self) -> dict[str, tuple[Metric, bool]]:
        metrics = {name: (metric, name == "loss") for name, metric in self.val_losses.items()}
        return {**metrics, "rank/accuracy": (self.val_accuracy, True)}
