"""The cache folder shared by built-in data and the precomputed DPO reference, and the hash that keys cached pairs."""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("RLHF_RECIPES_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rlhf-recipes"))
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(examples: Sequence[Mapping[str, list[int]]]) -> str:
    """A short hash of the tokenized pairs (keys the on-disk cache of reference log-probs)."""
    h = hashlib.sha256()
    for e in examples:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(array("q", e[key]).tobytes() + b"|")
    return h.hexdigest()[:16]
