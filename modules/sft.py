"""SFTModule: supervised fine-tuning of a causal LM with the loss on response tokens only."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from recipes.modules.base import AlignmentModule
from recipes.modules.generation import sample
from recipes.modules.models import ModelSpec
from recipes.modules.optim import adamw
from recipes.modules.policy import completion_logprobs
from recipes.modules.validation import at_least


class SFTModule(AlignmentModule):
    """Negative log-likelihood of the response given the prompt.

    ``loss = -sum_t m_t log pi(y_t | y_<t) / sum_t m_t`` over the response mask ``m`` of the micro-batch
    (``loss_reduction="token"``), or the mean over sequences of each sequence's token mean (``"sequence"``, which
    makes gradient accumulation exactly equal to a larger batch).

    Args:
        model: what to build (see `recipes.modules.models.ModelSpec`); built in ``configure_model`` so strategies can
        shard. tokenizer: the data's tokenizer (linked by the CLI); gives vocab size and special ids to random models
        and
            is saved with the export.
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        loss_reduction: ``token`` or ``sequence`` (above).
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
        max_new_tokens, temperature: generation settings of ``predict`` (``temperature=0``: greedy).
        guard_non_finite: stop at a non-finite loss or gradient and refuse non-finite checkpoints
            (`recipes.modules.base.AlignmentModule`).
    """

    policy: torch.nn.Module | None  # built in configure_model (`AlignmentModule.build_network`)

    def __init__(
        self,
        model: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        loss_reduction: Literal["token", "sequence"] = "token",
        max_length: int | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        guard_non_finite: bool = True,
    ) -> None:
        at_least("SFTModule", "max_new_tokens", max_new_tokens, 1, "predict generates at least one token")
        at_least("SFTModule", "temperature", temperature, 0.0, "0 decodes greedily, 1 samples from the policy")
        super().__init__(model, tokenizer, optimizer, scheduler, max_length, guard_non_finite)
        self.val_nll = MeanMetric()  # token-weighted, synced across processes
        self._step_start = 0.0

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token response log-probs and their mask, both ``(B, T')``."""
        return completion_logprobs(self.policy, batch["input_ids"], batch["attention_mask"],
                                   batch["completion_mask"])

    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs, mask = self(batch)
        mask = mask.to(logprobs.dtype)
        tokens = mask.sum()
        if self.hparams.loss_reduction == "sequence":
            loss = (-(logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        else:
            loss = -(logprobs * mask).sum() / tokens.clamp(min=1)
        return loss, tokens

    # --- training ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._nll(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self._tokens = int(batch["attention_mask"].sum())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_start
        if elapsed > 0:
            self.log("train/tokens_per_s", self._tokens / elapsed, batch_size=1)

    # --- validation -------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, tokens = self._nll(batch)
        self.val_nll.update(loss.detach(), weight=tokens)

    def log_epoch_metrics(self, stage: str) -> None:
        """``<stage>/loss`` (token-weighted NLL) and ``<stage>/ppl`` (its exponential, capped at e^50)."""
        nll = self.val_nll.compute()
        self.log(f"{stage}/loss", nll, prog_bar=True)
        self.log(f"{stage}/ppl", torch.exp(nll.clamp(max=50)) if math.isfinite(float(nll)) else nll)
        self.val_nll.reset()

    # --- prediction: generate responses to the data module's prompts ---------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """Responses to a left-padded prompt batch (`recipes.modules.types.PromptBatch`), decoded, EOS stripped."""
        tok, hp = self.tokenizer, self.hparams
        gen = sample(self.policy, batch["input_ids"], batch["attention_mask"], hp.max_new_tokens, tok.eos_token_id,
                     tok.pad_token_id, temperature=hp.temperature)
        texts = tok.batch_decode(gen.response_ids * gen.response_mask, skip_special_tokens=True)
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompts"], texts)]
