"""Shared benchmark helpers: the tiny Llama of the DPO/PPO benchmarks, peak-RSS measurement in child processes."""

from __future__ import annotations

import json
import multiprocessing as mp
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


def _child(fn: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn(*args)
    result["peak_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    queue.put(json.dumps(result))


def run_isolated(fn: Callable[..., dict], *args: Any) -> dict:
    """Run ``fn(*args)`` in a fresh process so its peak memory is its own; returns fn's dict plus ``peak_rss_mb``
    (growth of the child's peak resident set over its state after imports)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    out = json.loads(queue.get())
    proc.join()
    return out


def ratio_line(name: str, value: float, floor: float, unit: str) -> str:
    return f"{name:<28} {value:10.3f} {unit:<6} floor {floor:10.3f} {unit:<6} ratio {value / floor:6.3f}x"
