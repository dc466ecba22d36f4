"""DPOModule: direct preference optimization (and IPO, SLiC hinge) against a frozen, adapter-disabled or
precomputed reference, with chosen and rejected responses in one concatenated forward."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from recipes.modules.adapters import add_planned_adapters, reference_context
from recipes.modules.base import AlignmentModule
from recipes.modules.distributed import per_rank_state
from recipes.modules.losses import DPOLoss
from recipes.modules.models import ModelSpec, build_causal_lm, is_peft
from recipes.modules.optim import adamw
from recipes.modules.policy import (
    completion_logprobs,
    masked_completion_logps,
    sequence_logprobs,
)
from recipes.modules.sharding import (
    fsdp2_param_dtype,
    fsdp2_shard,
    is_partitioned,
    local_part,
    reshard,
)

log = logging.getLogger(__name__)

ReferenceMode = Literal["auto", "frozen_copy", "disabled_adapter", "precomputed"]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


class DPOModule(AlignmentModule):
    """Preference optimization of a causal LM policy against a reference policy.

    The loss (``DPOLoss`` by default; ``IPOLoss``, ``HingeLoss`` or any module with the same signature, by
    ``class_path``) sees summed completion log-probs of the chosen and rejected responses under the policy and the
    reference. Reference modes (``reference_mode``):

    - ``frozen_copy``: a frozen copy of the starting policy, held as ``self.reference`` (full fine-tuning).
    - ``disabled_adapter``: the LoRA policy with its adapter disabled, no second copy of the weights
      (``reference_context(self.policy, self.reference_adapter)``; ``reference_adapter`` names an adapter to use
      instead, as `recipes.callbacks.ema_reference.EMAReference` does).
    - ``precomputed``: one pass over the train and validation pairs with the starting policy (adapter disabled)
      before the first step; then only the policy is held. The table is cached on disk, keyed by a fingerprint of
      the model weights and of the tokenized data, and saved in checkpoints so a resumed run reuses it. With several
      processes each rank computes a strided shard and the shards are all-gathered (every rank must run the pass,
      because FSDP forwards are collective); rank 0 reads and writes the cache file and broadcasts what it read.
    - ``auto``: ``disabled_adapter`` with LoRA, else ``frozen_copy``.

    A loss with ``reference_free: true`` uses no reference at all. Anything that sets ``self.reference`` to a frozen
    module (e.g. an EMA reference callback) overrides the mode.

    Args:
        model: the policy to build (`recipes.modules.models.ModelSpec`), built in ``configure_model``.
        tokenizer: the data's tokenizer (linked by the CLI); saved with the export.
        loss: preference loss module; default ``DPOLoss(beta=0.1)``.
        optimizer, scheduler: factories (``class_path`` in YAML); the scheduler steps every optimizer step.
        reference_mode: see above.
        average_logprobs: mean instead of sum of token log-probs per response (IPO variants use the mean).
        reference_cache_dir: folder of the precomputed cache (default ``~/.cache/rlhf-recipes/reference_logps``,
            or ``$RLHF_RECIPES_CACHE``); must be readable by rank 0. ``cache_reference: false`` disables it.
        max_length: the data's token budget (linked by the CLI); sizes random models' position tables.
        reference_batch_size: pairs per forward of the precomputed reference pass (no gradients, no activations
            kept, so a GPU can take more); default the data's batch size (larger was slower on a 2-core CPU).
    """

    policy: nn.Module | None  # built in configure_model; the frozen copy, if any, is self.reference

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
    ) -> None:
        super().__init__(model, tokenizer, optimizer, scheduler, max_length)
        self.loss = loss if loss is not None else DPOLoss(beta=0.1)
        self.reference: nn.Module | None = None
        self.reference_adapter: str | None = None
        self.reference_logps: dict[str, Tensor] = {}  # precomputed: split -> (N, 2) [chosen, rejected], on CPU
        self._masked = True  # the reference pass computes logits only at completion positions (see below)
        self.val_loss = MeanMetric()
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in METRICS})

    @property
    def mode(self) -> str:
        """The reference mode in effect: ``none`` for a reference-free loss, else a resolved ``reference_mode``."""
        if getattr(self.loss, "reference_free", False):
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
        """Reference log-probs of every row of the batch (2B,), from the mode in effect; None if reference-free."""
        if self.mode == "none":
            return None
        if self.reference is not None:
            with torch.no_grad():
                return self._logps(self.reference, batch)
        if self.mode == "precomputed" and self.reference_adapter is None:
            table = self._reference_table(split)[batch["index"].cpu()]  # (B, 2)
            return table.T.reshape(-1).to(self.device)  # chosen rows first, as in the batch
        with torch.no_grad(), reference_context(self.policy, self.reference_adapter):
            return self._logps(self.policy, batch)

    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, dict[str, Tensor]]:
        logps = self(batch)  # (2B,)
        ref_logps = self.reference_forward(batch, split)
        b = logps.shape[0] // 2
        chosen, rejected = logps[:b], logps[b:]
        ref_chosen, ref_rejected = (None, None) if ref_logps is None else (ref_logps[:b], ref_logps[b:])
        losses, chosen_rewards, rejected_rewards = self.loss(chosen, rejected, ref_chosen, ref_rejected)
        metrics = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                   "rewards/margins": chosen_rewards - rejected_rewards,
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                   "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
        return losses.mean(), metrics

    # --- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self._step(batch, "train")
        b = batch["index"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        for name, values in metrics.items():
            self.log(name, values.mean(), prog_bar=name == "rewards/accuracies", batch_size=b)
        return loss

    def train(self, mode: bool = True) -> DPOModule:
        """Lightning switches the whole module to train mode; the frozen reference stays in eval (no dropout)."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

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
    def _reference_table(self, split: str) -> Tensor:
        if split not in self.reference_logps:
            trainer = self._trainer
            if trainer is not None and trainer.global_step > 0:
                raise RuntimeError("reference_mode 'precomputed': the reference log-probs are missing after "
                                   f"{trainer.global_step} steps (a checkpoint from another mode?); the policy is no "
                                   "longer the reference, so they cannot be recomputed. Start from the initial model.")
            self.precompute_reference()
        return self.reference_logps[split]

    @torch.no_grad()
    def precompute_reference(self, datamodule: Any = None) -> None:
        """Fill ``self.reference_logps`` for the ``train_set`` and ``val_set`` of ``datamodule`` (default: the
        trainer's; a `recipes.datamodules.preference.PreferenceDataModule`), from the cache when it holds them."""
        dm = datamodule if datamodule is not None else getattr(self._trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "train_set"):
            raise RuntimeError("reference_mode 'precomputed' needs a data module with train_set, val_set, collate "
                               "and batch_size (recipes.datamodules.preference.PreferenceDataModule).")
        from recipes.modules.cache import fingerprint

        was_training = self.policy.training
        self.policy.eval()  # no dropout in the reference pass
        try:
            for split, examples in (("train", dm.train_set), ("val", dm.val_set)):
                if examples:
                    key = f"{self._model_fingerprint()}-{fingerprint(examples)}"
                    self.reference_logps[split] = self._load_or_compute(key, examples, dm.collate, dm.batch_size)
        finally:
            self.policy.train(was_training)

    def _load_or_compute(self, key: str, examples: list, collate: Any, batch_size: int) -> Tensor:
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        path = None
        if self.hparams.cache_reference:
            from recipes.modules.cache import cache_dir

            folder = self.hparams.reference_cache_dir or str(cache_dir() / "reference_logps")
            path = os.path.join(folder, f"ref_logps-{key}.pt")
        table = torch.load(path) if rank == 0 and path and os.path.exists(path) else None
        if world > 1:
            table = trainer.strategy.broadcast(table, src=0)
        if table is not None:
            log.info("Reference log-probs for %d pairs read from %s", len(examples), path)
            return table
        per_rank = -(-len(examples) // world)
        shard = list(range(rank, len(examples), world))
        shard += shard[-1:] * (per_rank - len(shard)) if shard else [0] * per_rank  # equal forwards on every rank
        # Longest pairs first, so each batch pads little (and an out-of-memory error comes at once).
        shard.sort(key=lambda i: -len(examples[i]["prompt_ids"]) - max(len(examples[i]["chosen_ids"]),
                                                                           len(examples[i]["rejected_ids"])))
        size = self.hparams.reference_batch_size or batch_size
        values = []
        quiet = rank != 0 or (trainer is not None and trainer.progress_bar_callback is None)
        for start in tqdm(range(0, len(shard), size), desc=f"Reference log-probs ({len(examples)} pairs)",
                          disable=quiet, leave=False):
            batch = collate([examples[i] for i in shard[start:start + size]])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with reference_context(self.policy) if is_peft(self.policy) else contextlib.nullcontext():
                logps = self._reference_pass_logps(batch)  # (2b,)
            values.append(logps.view(2, -1).T.float())  # (b, 2)
        local, index = torch.cat(values), torch.tensor(shard, device=self.device)
        if world > 1:
            local, index = self.all_gather(local).reshape(-1, 2), self.all_gather(index).reshape(-1)
        table = torch.empty(len(examples), 2)
        table[index.cpu()] = local.cpu()
        if rank == 0 and path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(table, path + f".tmp{os.getpid()}")
            os.replace(path + f".tmp{os.getpid()}", path)
        log.info("Reference log-probs computed for %d pairs (%d per rank)%s", len(examples), per_rank,
                 f", cached at {path}" if path and rank == 0 else "")
        return table

    def _reference_pass_logps(self, batch: dict[str, Tensor]) -> Tensor:
        """``_logps`` (2B,) with the LM head only where a completion token is predicted; the plain forward for a model
        that takes no boolean ``logits_to_keep`` (found on the first batch, remembered)."""
        logps = masked_completion_logps(self.policy, batch, self.hparams.average_logprobs) if self._masked else None
        self._masked = logps is not None
        return logps if logps is not None else self._logps(self.policy, batch)

    def _model_fingerprint(self) -> str:
        """Hash of the reference weights (a strided sample of each base tensor) and of what changes the values.

        Each rank hashes the part of each weight it holds (`recipes.modules.sharding.local_part`: the FSDP2 shard, the
        ZeRO-3 partition, or all of it), and the ranks' digests are hashed together: nothing is gathered, and a ZeRO-3
        placeholder (an empty tensor) cannot make two different models look alike. A collective under several
        processes."""
        reshard(self.policy)  # FSDP2: hash the shards, not a root left gathered by an earlier forward
        h = hashlib.sha256()
        for name, param in self.policy.named_parameters():
            if "lora_" in name:  # adapters are disabled in the reference pass
                continue
            flat = local_part(param).detach().reshape(-1)
            h.update(f"{name}{tuple(getattr(param, 'ds_shape', param.shape))}".encode())
            h.update(flat[:: max(1, flat.numel() // 4096)].to(torch.float32, copy=True).cpu().numpy().tobytes())
        settings = repr((self.hparams.average_logprobs, getattr(self._trainer, "precision", None)))
        digests = per_rank_state(h.hexdigest())
        return hashlib.sha256((settings + "".join(map(str, digests))).encode()).hexdigest()[:16]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference_logps:
            checkpoint["reference_logps"] = dict(self.reference_logps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference_logps = dict(checkpoint.get("reference_logps", {}))

    # --- setup ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        policy = build_causal_lm(self.spec, self.tokenizer, self.hparams.max_length)
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
            self.reference = fsdp2_shard(copy.deepcopy(policy).eval().requires_grad_(False), mesh, dtype)
        self.policy = fsdp2_shard(policy, mesh, dtype)
