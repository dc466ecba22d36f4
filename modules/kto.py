"""KTOModule: Kahneman-Tversky optimization of a causal LM policy on unpaired desirable / undesirable completions,
against a frozen or adapter-disabled reference, with the reference point ``z0`` estimated from mismatched pairs."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from transformers import PreTrainedTokenizerBase

from recipes.modules.adapters import add_planned_adapters
from recipes.modules.base import AlignmentModule
from recipes.modules.distributed import all_reduce_sum
from recipes.modules.losses import KTOLoss
from recipes.modules.models import ModelSpec, build_causal_lm, is_peft
from recipes.modules.optim import adamw
from recipes.modules.policy import completion_logprobs, sequence_logprobs
from recipes.modules.reference import AdapterReference, FrozenCopy, Reference
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard, is_partitioned
from recipes.modules.validation import check_vocabulary

KTOReferenceMode = Literal["auto", "frozen_copy", "disabled_adapter"]
METRICS = ("rewards/chosen", "rewards/rejected", "kto/z0", "kto/accuracy")  # averaged over rows; margins apart


class KTOModule(AlignmentModule):
    """KTO (Ethayarajh et al., arXiv 2402.01306): each row is one completion labelled desirable or undesirable.

    A batch (`recipes.datamodules.collate.collate_unpaired`) holds the rows and a mismatched KL batch, row ``i``'s
    prompt with row ``i + 1``'s completion (cyclically; the completions shifted by one, as TRL's KTO trainer pairs
    them). Per step:

    1. ``log pi(y|x)`` of the rows under the policy (with gradients) and under the reference;
    2. ``log pi(y'|x) - log pi_ref(y'|x)`` of the KL batch, policy without gradients (the paper does not
       backpropagate through ``z0``); its mean over every row of every rank (`recipes.modules.distributed.
       all_reduce_sum` of the sum and the count) is the KL estimate;
    3. the loss (`recipes.modules.losses.KTOLoss` by default, or any module with its signature by ``class_path``)
       clamps it at 0 as ``z0`` and returns per-row losses, averaged over the rows.

    The reference is ``self.reference``, a `recipes.modules.reference.Reference`: a `FrozenCopy` of the starting
    policy (``frozen_copy``), or the LoRA policy with its adapters disabled (``disabled_adapter``); ``auto`` picks the
    second with LoRA. A precomputed table cannot serve: the KL batch's pairs change with every shuffle.

    Metrics (``train/`` for the loss, ``val/`` in front during validation): ``train/loss``, ``rewards/chosen`` and
    ``rewards/rejected`` (mean ``beta * r`` of the desirable and the undesirable rows, TRL's names),
    ``rewards/margins`` (their difference), ``kto/z0`` (TRL's ``kl``) and ``kto/accuracy`` (the share of rows whose
    ``r`` lies on their label's side of ``z0``).

    Args:
        model: the policy to build (`recipes.modules.models.ModelSpec`), built in ``configure_model``.
        tokenizer: the data's tokenizer (linked by the CLI); saved with the export.
        loss: default ``KTOLoss(beta=0.1)``.
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        reference_mode: see above.
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
        guard_non_finite: stop at a non-finite loss or gradient (`recipes.modules.base.AlignmentModule`).
    """

    policy: nn.Module | None  # built in configure_model
    reference: Reference | None  # a frozen copy or the LoRA policy, from configure_model

    def __init__(
        self,
        model: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        reference_mode: KTOReferenceMode = "auto",
        max_length: int | None = None,
        guard_non_finite: bool = True,
    ) -> None:
        super().__init__(model, tokenizer, optimizer, scheduler, max_length, guard_non_finite)
        self.loss = loss if loss is not None else KTOLoss(beta=0.1)
        self.reference = None
        self.val_loss = MeanMetric()
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in METRICS})

    @property
    def mode(self) -> str:
        """``frozen_copy`` or ``disabled_adapter``: ``reference_mode`` with ``auto`` resolved."""
        mode = self.hparams.reference_mode
        if mode == "auto":
            return "disabled_adapter" if self.spec.lora is not None else "frozen_copy"
        return mode

    def forward(self, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        """Summed completion log-probs of the rows (``prefix="kl_"``: of the KL batch) under the policy: (B,)."""
        return self._logps(self.policy, batch, prefix)

    @staticmethod
    def _logps(model: nn.Module, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        logprobs, mask = completion_logprobs(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                             batch[f"{prefix}completion_mask"])  # (B, T')
        return sequence_logprobs(logprobs, mask)  # (B,)

    def kl_estimate(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean ``log pi(y'|x) - log pi_ref(y'|x)`` over the KL batch's rows on every rank (no gradients): ()."""
        with torch.no_grad():
            kl_logratios = self(batch, "kl_") - self.reference.logprobs(lambda m: self._logps(m, batch, "kl_"))
        total = all_reduce_sum(torch.stack([kl_logratios.sum(), kl_logratios.new_tensor(kl_logratios.numel())]))
        return total[0] / total[1]

    def _step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logps = self(batch)  # (B,)
        ref_logps = self.reference.logprobs(lambda m: self._logps(m, batch))  # (B,)
        desirable = batch["label"]
        losses, rewards, z0, accuracies = self.loss(logps, ref_logps, desirable, self.kl_estimate(batch))
        chosen, rejected = rewards[desirable], rewards[~desirable]
        metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "kto/z0": z0, "kto/accuracy": accuracies}
        if len(chosen) and len(rejected):
            metrics["rewards/margins"] = chosen.mean() - rejected.mean()
        return losses.mean(), metrics

    # --- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self._step(batch)
        b = batch["label"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for name, values in metrics.items():
            if values.numel():  # a batch may hold no desirable (or no undesirable) row
                self.log(name, values.float().mean(), prog_bar=name == "kto/accuracy", batch_size=values.numel())
        return loss

    # --- validation -------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, metrics = self._step(batch)
        self.val_loss.update(loss.detach(), weight=batch["label"].shape[0])
        metrics.pop("rewards/margins", None)  # per epoch: the difference of the two epoch means, below
        for name, values in metrics.items():
            if values.numel():
                self.val_metrics[name.replace("/", "_")].update(values.float())

    def epoch_metrics(self) -> dict[str, tuple[Metric, bool]]:
        metrics = {name: (self.val_metrics[name.replace("/", "_")], name == "kto/accuracy") for name in METRICS}
        return {"loss": (self.val_loss, True), **metrics}

    def log_epoch_metrics(self, stage: str) -> None:
        """The base's epoch metrics, plus ``rewards/margins``: the desirable rows' mean reward minus the
        undesirable rows', each over the whole epoch (computed on every rank alike: the means are synced)."""
        chosen, rejected = self.val_metrics["rewards_chosen"], self.val_metrics["rewards_rejected"]
        self.log(f"{stage}/rewards/margins", chosen.compute() - rejected.compute())
        super().log_epoch_metrics(stage)

    # --- setup ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        policy = build_causal_lm(self.spec, self.tokenizer, self.hparams.max_length)
        check_vocabulary("KTOModule", policy, self.spec, self.tokenizer)
        add_planned_adapters(self, policy)  # a reference adapter EMAReference plans, before sharding
        if self.mode == "disabled_adapter" and not is_peft(policy):
            raise ValueError("reference_mode 'disabled_adapter' needs a LoRA policy: set model.lora, or use "
                             "reference_mode 'frozen_copy'.")
        if self.mode == "frozen_copy" and is_partitioned(policy):
            raise ValueError("reference_mode 'frozen_copy' under DeepSpeed ZeRO-3: a copy of partitioned weights is "
                             "empty. Use LoRA with 'disabled_adapter', ZeRO-2, or FSDP.")
        mesh, dtype = self.device_mesh, fsdp2_param_dtype(self)
        if self.mode == "frozen_copy":  # copied before sharding; under ModelParallelStrategy both are FSDP2-sharded
            self.reference = fsdp2_shard(FrozenCopy.freeze(copy.deepcopy(policy)), mesh, dtype)
        else:
            self.reference = AdapterReference(policy)  # adapters disabled until a callback names its adapter
        self.policy = fsdp2_shard(policy, mesh, dtype)
