"""DPOModule: direct preference optimization (and IPO, SLiC hinge) against a frozen, adapter-disabled or
precomputed reference, or reference-free (SimPO, ORPO), with chosen and rejected responses in one concatenated
forward."""

from __future__ import annotations

import copy
from typing import Any, Literal

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from transformers import PreTrainedTokenizerBase

from recipes.modules.adapters import add_planned_adapters
from recipes.modules.base import AlignmentModule
from recipes.modules.losses import DPOLoss, ReferenceFreePreferenceLoss
from recipes.modules.models import ModelSpec, build_causal_lm, is_peft
from recipes.modules.optim import adamw
from recipes.modules.policy import completion_logprobs, sequence_logprobs
from recipes.modules.reference import AdapterReference, FrozenCopy, PrecomputedTable, Reference
from recipes.modules.reference_pass import ReferencePass, precompute_tables
from recipes.modules.sharding import fsdp2_param_dtype, fsdp2_shard, is_partitioned
from recipes.modules.validation import at_least, check_vocabulary

ReferenceMode = Literal["auto", "frozen_copy", "disabled_adapter", "precomputed"]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


class DPOModule(AlignmentModule):
    """Preference optimization of a causal LM policy against a reference policy.

    The loss (``DPOLoss`` by default; ``IPOLoss``, ``HingeLoss`` or any module with the same signature, by
    ``class_path``) sees summed completion log-probs of the chosen and rejected responses under the policy and the
    reference. The module owns the reference, ``self.reference``, a `recipes.modules.reference.Reference` chosen by
    ``reference_mode`` (callbacks such as `recipes.callbacks.ema_reference.EMAReference` move it only through its
    ``reset_to`` / ``lerp_`` / ``use_adapter``):

    - ``frozen_copy``: a `FrozenCopy` of the starting policy (full fine-tuning), checkpointed as ``reference.*``.
    - ``disabled_adapter``: an `AdapterReference`, the LoRA policy with its adapters disabled (or with a named
      reference adapter active), no second copy of the weights.
    - ``precomputed``: a `PrecomputedTable`, one pass over the train and validation pairs with the starting policy
      (adapter disabled) at the first step; then only the policy is held. The table is cached on disk, keyed by a
      fingerprint of the model weights and of the tokenized data, and saved in checkpoints so a resumed run reuses
      it. With several processes each rank computes a strided shard and the shards are all-gathered (every rank must
      run the pass, because FSDP forwards are collective); rank 0 reads and writes the cache file and broadcasts
      what it read (`recipes.modules.reference_pass`).
    - ``auto``: ``disabled_adapter`` with LoRA, else ``frozen_copy``.

    A loss with ``reference_free: true`` uses no reference at all (``self.reference`` stays None), and so does a
    `recipes.modules.losses.ReferenceFreePreferenceLoss` (``SimPOLoss``, ``ORPOLoss``; ``needs_reference = False``),
    which is called with summed log-probs and response token counts and length-normalizes them itself.

    Args:
        model: the policy to build (`recipes.modules.models.ModelSpec`), built in ``configure_model``.
        tokenizer: the data's tokenizer (linked by the CLI); saved with the export.
        loss: preference loss module; default ``DPOLoss(beta=0.1)``.
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        reference_mode: see above.
        average_logprobs: mean instead of sum of token log-probs per response (IPO variants use the mean); must
            stay false with a `ReferenceFreePreferenceLoss`, which takes the sums and divides by the counts itself.
        reference_cache_dir: folder of the precomputed cache (default ``~/.cache/rlhf-recipes/reference_logps``,
            or ``$RLHF_RECIPES_CACHE``); must be readable by rank 0. ``cache_reference: false`` disables it.
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
        reference_batch_size: pairs per forward of the precomputed reference pass (no gradients, no activations
            kept, so a GPU can take more); default the data's batch size (larger was slower on a 2-core CPU).
        guard_non_finite: stop at a non-finite loss or gradient and refuse non-finite checkpoints
            (`recipes.modules.base.AlignmentModule`).
    """

    policy: nn.Module | None  # built in configure_model
    reference: Reference | None  # the table from __init__, a frozen copy or the LoRA policy from configure_model

    def __init__(
        self,
        model: ModelSpec,
        tokenizer: PreTrainedTokenizerBase | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        reference_mode: ReferenceMode = "auto",
        average_logprobs: bool = False,
        cache_reference: bool = True,
        reference_cache_dir: str | None = None,
        max_length: int | None = None,
        reference_batch_size: int | None = None,
        guard_non_finite: bool = True,
    ) -> None:
        at_least("DPOModule", "reference_batch_size", reference_batch_size, 1, "Use null for the data's batch size")
        super().__init__(model, tokenizer, optimizer, scheduler, max_length, guard_non_finite)
        self.loss = loss if loss is not None else DPOLoss(beta=0.1)
        if isinstance(self.loss, ReferenceFreePreferenceLoss) and average_logprobs:
            raise ValueError(f"DPOModule: average_logprobs=True with {type(self.loss).__name__}, which already "
                             "divides the summed log-probs by the response lengths; set average_logprobs: false.")
        precomputed = self.mode == "precomputed"  # the other references need the policy: built in configure_model
        self.reference = PrecomputedTable(self._compute_table, self._table_source) if precomputed else None
        self.val_loss = MeanMetric()
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in METRICS})

    @property
    def mode(self) -> str:
        """The reference mode in effect: ``none`` for a reference-free loss, else a resolved ``reference_mode``."""
        if getattr(self.loss, "reference_free", False) or not getattr(self.loss, "needs_reference", True):
            return "none"
        mode = self.hparams.reference_mode
        if mode == "auto":
            return "disabled_adapter" if self.spec.lora is not None else "frozen_copy"
        return mode

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Summed (or mean) completion log-probs of every row of the concatenated batch under the policy: (2B,)."""
        return self._logps(self.policy, batch)

    def _logps(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logprobs, mask = completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                             batch["completion_mask"])  # (2B, T')
        return sequence_logprobs(logprobs, mask, average=self.hparams.average_logprobs)  # (2B,)

    def reference_forward(self, batch: dict[str, Tensor], split: str = "train") -> Tensor | None:
        """Reference log-probs of every row of the batch (2B,), whatever the reference is; None if reference-free."""
        if self.reference is None:
            return None
        return self.reference.logprobs(lambda model: self._logps(model, batch), batch["index"], split)

    def _sums_and_lengths(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed completion log-probs and response token counts of every row, for a length-normalizing loss."""
        logprobs, mask = completion_logprobs(self.policy, batch["input_ids"], batch["attention_mask"],
                                             batch["completion_mask"])  # (2B, T')
        return sequence_logprobs(logprobs, mask), mask.sum(-1).clamp(min=1)  # (2B,), (2B,); clamp as average=True

    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(self.loss, ReferenceFreePreferenceLoss):
            return self._reference_free_step(batch)
        logps = self(batch)  # (2B,)
        ref_logps = self.reference_forward(batch, split)
        b = logps.shape[0] // 2
        chosen, rejected = logps[:b], logps[b:]
        ref_chosen, ref_rejected = (None, None) if ref_logps is None else (ref_logps[:b], ref_logps[b:])
        losses, chosen_rewards, rejected_rewards = self.loss(chosen, rejected, ref_chosen, ref_rejected)
        return losses.mean(), self._metrics(chosen_rewards, rejected_rewards, chosen, rejected)

    @staticmethod
    def _metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, chosen: Tensor,
                 rejected: Tensor) -> dict[str, Tensor]:
        return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/margins": chosen_rewards - rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}

    def _reference_free_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logps, lengths = self._sums_and_lengths(batch)  # (2B,), (2B,)
        b = logps.shape[0] // 2
        losses, chosen_rewards, rejected_rewards = self.loss(logps[:b], logps[b:], lengths[:b], lengths[b:])
        return losses.mean(), self._metrics(chosen_rewards, rejected_rewards, logps[:b], logps[b:])

    # --- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self._step(batch, "train")
        b = batch["index"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for name, values in metrics.items():
            self.log(name, values.mean(), prog_bar=name == "rewards/accuracies", batch_size=b)
        return loss

    # --- validation -------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, metrics = self._step(batch, "val")
        self.val_loss.update(loss.detach(), weight=batch["index"].shape[0])
        for name, values in metrics.items():
            self.val_metrics[name.replace("/", "_")].update(values)

    def epoch_metrics(self) -> dict[str, tuple[Metric, bool]]:
        metrics = {name: (self.val_metrics[name.replace("/", "_")], name == "rewards/accuracies") for name in METRICS}
        return {"loss": (self.val_loss, True), **metrics}

    # --- the precomputed reference ----------------------------------------------------------------------------
    def precompute_reference(self, datamodule: Any = None) -> None:
        """Fill the precomputed reference's table for the ``train_set`` and ``val_set`` of ``datamodule`` (default:
        the trainer's; a `recipes.datamodules.preference.PreferenceDataModule`), from the cache when it holds them."""
        if not isinstance(self.reference, PrecomputedTable):
            raise TypeError(f"precompute_reference: the reference mode is '{self.mode}', not 'precomputed'.")
        dm = datamodule if datamodule is not None else getattr(self._trainer, "datamodule", None)
        self.reference.tables.update(self._compute_table(self.policy, dm))

    def _compute_table(self, policy: nn.Module, data: Any) -> dict[str, Tensor]:
        hp = self.hparams  # read at each pass: a caller may change the cache folder after construction
        settings = ReferencePass(hp.average_logprobs, hp.reference_batch_size, hp.cache_reference,
                                 hp.reference_cache_dir)
        return precompute_tables(policy, data, settings, self._trainer, self.device)

    def _table_source(self) -> tuple[nn.Module, Any]:
        """The policy and data of the first table: only while the policy is still the starting one."""
        trainer = self._trainer
        if trainer is not None and trainer.global_step > 0:
            raise RuntimeError("reference_mode 'precomputed': the reference log-probs are missing after "
                               f"{trainer.global_step} steps (a checkpoint from another mode?); the policy is no "
                               "longer the reference, so they cannot be recomputed. Start from the initial model.")
        return self.policy, getattr(trainer, "datamodule", None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # refuses non-finite weights
        if isinstance(self.reference, PrecomputedTable) and self.reference.tables:
            checkpoint["reference_logps"] = dict(self.reference.tables)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(self.reference, PrecomputedTable):
            self.reference.tables = dict(checkpoint.get("reference_logps", {}))

    # --- setup ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        policy = build_causal_lm(self.spec, self.tokenizer, self.hparams.max_length)
        check_vocabulary("DPOModule", policy, self.spec, self.tokenizer)
        add_planned_adapters(self, policy)  # reference adapters of EMAReference / DPOIterRound, before sharding
        if self.mode == "disabled_adapter" and not is_peft(policy):
            raise ValueError("reference_mode 'disabled_adapter' needs a LoRA policy: set model.lora, or use "
                             "reference_mode 'frozen_copy' or 'precomputed'.")
        mesh, dtype = self.device_mesh, fsdp2_param_dtype(self)
        if self.mode == "frozen_copy" and is_partitioned(policy):
            raise ValueError("reference_mode 'frozen_copy' under DeepSpeed ZeRO-3: a copy of partitioned weights is "
                             "empty. Use reference_mode 'precomputed' (yaml/dpo_llama2_deepspeed_zero3.yaml), LoRA "
                             "with 'disabled_adapter', ZeRO-2, or FSDP.")
        if self.mode == "frozen_copy":  # copied before sharding; under ModelParallelStrategy both are FSDP2-sharded
            self.reference = fsdp2_shard(FrozenCopy.freeze(copy.deepcopy(policy)), mesh, dtype)
        elif self.mode == "disabled_adapter":
            self.reference = AdapterReference(policy)  # adapters disabled until a callback names its adapter
        self.policy = fsdp2_shard(policy, mesh, dtype)
