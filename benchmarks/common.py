"""Shared benchmark helpers: the tiny Llama of the DPO/PPO/SFT benchmarks, the floors' gathered-head log-probs, peak-RSS
measurement in child processes and the ratio line."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
from collections.abc import Callable
from typing import Any

BENCH_LLAMA = {  # the issues' benchmark model: hidden 256, 4 layers, 4 heads, intermediate 688, vocab 4096
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def hidden_at(model: Any, input_ids: Any, attention_mask: Any, targets: Any) -> Any:
    """The base model's last hidden states at the positions that predict the tokens marked in ``targets``
    (position ``t - 1`` predicts token ``t``), row-major. ``model`` is a transformers ``*ForCausalLM`` or
    ``*ForSequenceClassification`` (``.model`` is its backbone); positions ignore left padding.

    Shapes: ``input_ids``, ``attention_mask``, ``targets`` (bool) ``(B, T)``; the result ``(N, H)``, N marked tokens
    (``targets[:, 0]`` is never predicted and must be False)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=False).last_hidden_state  # (B, T, H)
    return hidden[:, :-1][targets[:, 1:]]  # (N, H)


def gathered_logprobs(model: Any, input_ids: Any, attention_mask: Any, targets: Any,
                      with_entropy: bool = False) -> tuple[Any, Any]:
    """Log-probs of the tokens marked in ``targets``, the LM head applied only at the positions that predict them:
    ``lm_head(hidden_at(...))``, then ``logit_y - logsumexp``. Returns ``(logprobs, entropy)``, each ``(N,)`` float32,
    row-major (``entropy`` of each predicting distribution, without grad; None unless ``with_entropy``)."""
    import torch

    logits = model.lm_head(hidden_at(model, input_ids, attention_mask, targets)).float()  # (N, V)
    labels = input_ids[:, 1:][targets[:, 1:]]  # (N,)
    lse = torch.logsumexp(logits, -1)
    logprobs = logits.gather(-1, labels[:, None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = lse - (logits.softmax(-1) * logits).sum(-1)  # H = logsumexp - E_p[logit]
    return logprobs, entropy


def row_sums(token_values: Any, targets: Any) -> Any:
    """Per-row sums of row-major token values ``(N,)`` over the ``targets`` mask ``(B, T)`` (its column 0 unused)."""
    import torch

    rows = targets[:, 1:].nonzero()[:, 0]
    return torch.zeros(targets.shape[0], dtype=token_values.dtype).index_add_(0, rows, token_values)  # (B,)


def _child(fn: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    import lightning  # noqa: F401  imported before the baseline by both sides: ~200 MB of RSS that is no training's
    import torch
    import transformers  # noqa: F401

    import recipes.modules.dpo  # noqa: F401
    import recipes.modules.ppo  # noqa: F401
    import recipes.modules.sft  # noqa: F401

    torch.set_num_threads(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn(*args)
    result["peak_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    queue.put(json.dumps(result))


# glibc's malloc keeps freed blocks below its (self-raising) mmap threshold cached in its heap, so the peak resident set
# of two identical runs differed by up to 50 MB (issue #19). With the threshold fixed at 128 KiB every tensor is its own
# mapping and leaves the resident set when freed: the peak is the live peak. Such runs are slower and never timed.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_isolated(fn: Callable[..., dict], *args: Any, live_memory: bool = False) -> dict:
    """Run ``fn(*args)`` in a fresh process so its peak memory is its own; returns fn's dict plus ``peak_rss_mb``
    (growth of the child's peak resident set over its state after importing torch, transformers, lightning and the
    project's DPO/PPO/SFT modules, so that neither side is charged for imports the other does not make). With
    ``live_memory`` the child runs under `LIVE_MEMORY_ENV`: its peak is the live tensors' peak, its times are not
    comparable with other runs'."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    saved = {key: os.environ.get(key) for key in LIVE_MEMORY_ENV}
    if live_memory:
        os.environ.update(LIVE_MEMORY_ENV)  # a spawned child reads the environment at its start
    try:
        proc.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    while True:  # a child that dies (an import error, a crash) never answers: say so instead of waiting forever
        try:
            out = json.loads(queue.get(timeout=5))
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the benchmark child running {fn.__name__} died (exit code {proc.exitcode}); "
                                   "its traceback is printed above") from None
    proc.join()
    return out


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages (the machine is shared: print them before and after a run)."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def ratio_line(name: str, value: float, floor: float, unit: str) -> str:
    return f"{name:<28} {value:10.3f} {unit:<6} floor {floor:10.3f} {unit:<6} ratio {value / floor:6.3f}x"
