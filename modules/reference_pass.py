"""The precomputed DPO reference pass: log-probs of every preference pair under the starting policy (adapters
disabled), each rank computing a strided shard, cached on disk by rank 0 under model and data fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from recipes.modules.adapters import reference_context
from recipes.modules.cache import cache_dir, fingerprint
from recipes.modules.distributed import per_rank_state
from recipes.modules.models import is_peft
from recipes.modules.policy import masked_completion_logps
from recipes.modules.sharding import local_part, reshard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferencePass:
    """How the pass runs (`recipes.modules.dpo.DPOModule` builds it from its hyperparameters).

    Args:
        average: mean instead of sum of token log-probs per response, as the loss reads them.
        batch_size: pairs per no-grad forward; None: the data's batch size.
        cache: whether rank 0 reads and writes the cache file.
        cache_folder: the cache's folder; None: ``reference_logps`` under `recipes.modules.cache.cache_dir`.
    """

    average: bool = False
    batch_size: int | None = None
    cache: bool = True
    cache_folder: str | None = None


@torch.no_grad()
def precompute_tables(policy: nn.Module, data: Any, settings: ReferencePass, trainer: Any = None,
                      device: torch.device | None = None) -> dict[str, Tensor]:
    """``{split: (N, 2)}`` [chosen, rejected] log-probs of the ``train_set`` and ``val_set`` of ``data`` (a
    `recipes.datamodules.preference.PreferenceDataModule`) under ``policy`` in eval mode, adapters disabled, read
    from the cache when it holds them. With a ``trainer`` of several processes every rank must call it."""
    if data is None or not hasattr(data, "train_set"):
        raise RuntimeError("reference_mode 'precomputed' needs a data module with train_set, val_set, collate "
                           "and batch_size (recipes.datamodules.preference.PreferenceDataModule).")
    device = device if device is not None else next(policy.parameters()).device
    was_training, tables = policy.training, {}
    model_key = model_fingerprint(policy, settings.average, getattr(trainer, "precision", None))  # once: a collective
    policy.eval()  # no dropout in the reference pass
    try:
        for split, examples in (("train", data.train_set), ("val", data.val_set)):
            if examples:
                key = f"{model_key}-{fingerprint(examples)}"
                tables[split] = load_or_compute(policy, key, examples, data.collate, data.batch_size, settings,
                                                trainer, device)
    finally:
        policy.train(was_training)
    return tables


def load_or_compute(policy: nn.Module, key: str, examples: list, collate: Any, batch_size: int,
                    settings: ReferencePass, trainer: Any, device: torch.device) -> Tensor:
    """The ``(N, 2)`` table of ``examples``: read by rank 0 from the cache file of ``key`` and broadcast, or computed
    in strided shards (equal forward counts on every rank, since FSDP forwards are collective), all-gathered, and
    written by rank 0 (to a temporary file, then atomically replaced)."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    path = None
    if settings.cache:
        folder = settings.cache_folder or str(cache_dir() / "reference_logps")
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
    size = settings.batch_size or batch_size
    values = []
    quiet = rank != 0 or (trainer is not None and trainer.progress_bar_callback is None)
    for start in tqdm(range(0, len(shard), size), desc=f"Reference log-probs ({len(examples)} pairs)",
                      disable=quiet, leave=False):
        batch = collate([examples[i] for i in shard[start:start + size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with reference_context(policy) if is_peft(policy) else contextlib.nullcontext():
            logps = pass_logps(policy, batch, settings.average)  # (2b,)
        values.append(logps.view(2, -1).T.float())  # (b, 2)
    local, index = torch.cat(values), torch.tensor(shard, device=device)
    if world > 1:
        local = trainer.strategy.all_gather(local).reshape(-1, 2)
        index = trainer.strategy.all_gather(index).reshape(-1)
    table = torch.empty(len(examples), 2)
    table[index.cpu()] = local.cpu()
    if rank == 0 and path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(table, path + f".tmp{os.getpid()}")
        os.replace(path + f".tmp{os.getpid()}", path)
    log.info("Reference log-probs computed for %d pairs (%d per rank)%s", len(examples), per_rank,
             f", cached at {path}" if path and rank == 0 else "")
    return table


def pass_logps(policy: nn.Module, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """Summed (or mean) completion log-probs of every row, ``(2B,)``, with the LM head only where a completion
    token is predicted (`recipes.modules.policy.masked_completion_logps`)."""
    return masked_completion_logps(policy, batch, average)


def model_fingerprint(policy: nn.Module, average: bool = False, precision: Any = None) -> str:
    """Hash of the reference weights (a strided sample of each base tensor) and of what changes the values.

    Each rank hashes the part of each weight it holds (`recipes.modules.sharding.local_part`: the FSDP2 shard, the
    ZeRO-3 partition, or all of it), and the ranks' digests are hashed together: nothing is gathered, and a ZeRO-3
    placeholder (an empty tensor) cannot make two different models look alike. A collective under several
    processes."""
    reshard(policy)  # FSDP2: hash the shards, not a root left gathered by an earlier forward
    h = hashlib.sha256()
    for name, param in policy.named_parameters():
        if "lora_" in name:  # adapters are disabled in the reference pass
            continue
        flat = local_part(param).detach().reshape(-1)
        h.update(f"{name}{tuple(getattr(param, 'ds_shape', param.shape))}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].to(torch.float32, copy=True).cpu().numpy().tobytes())
    settings = repr((average, precision))
    digests = per_rank_state(h.hexdigest())
    return hashlib.sha256((settings + "".join(map(str, digests))).encode()).hexdigest()[:16]
