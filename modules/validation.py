"""Domain checks of settings, run at construction (before data or models load) or when the model is built; each error
names the owner, the argument, the bad value and what to do. A value of None always passes (the type says if allowed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from recipes.modules.models import ModelSpec


def _refuse(owner: str, name: str, value: Any, rule: str, fix: str) -> None:
    raise ValueError(f"{owner}: {name}={value!r} {rule}. {fix}".rstrip(". ") + ".")


def positive(owner: str, name: str, value: float | None, fix: str = "") -> None:
    """``0 < value < inf``."""
    if value is not None and not (math.isfinite(value) and value > 0):
        _refuse(owner, name, value, "must be a finite number > 0", fix)


def at_least(owner: str, name: str, value: float | None, minimum: float, fix: str = "") -> None:
    """``minimum <= value < inf``."""
    if value is not None and not (math.isfinite(value) and value >= minimum):
        _refuse(owner, name, value, f"must be >= {minimum}", fix)


def within(owner: str, name: str, value: float | None, low: float, high: float, fix: str = "",
           low_open: bool = False, high_open: bool = False) -> None:
    """``value`` in the interval from ``low`` to ``high``, each end closed unless marked open."""
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _refuse(owner, name, value, f"must be in {interval}", fix)


def check_loader_args(owner: str, batch_name: str, batch_size: int, num_workers: int, max_rows: int | None) -> None:
    """A data module's batch size (>= 1), worker count (>= 0) and row limit (>= 1 when set)."""
    at_least(owner, batch_name, batch_size, 1, f"Each batch needs at least one row; set data.{batch_name} >= 1")
    at_least(owner, "num_workers", num_workers, 0, "Use 0 to load in the main process")
    at_least(owner, "max_rows", max_rows, 1, "Use null to read every row")


def check_val_fraction(owner: str, val_fraction: float) -> None:
    """``0 <= val_fraction < 1``: 1 holds out every row and trains on none."""
    within(owner, "val_fraction", val_fraction, 0.0, 1.0, "1 would hold out every row and train on none; use e.g. "
           "0.05, 0 for no validation, or a separate val_data file", high_open=True)


def check_token_budget(owner: str, max_length: int, max_prompt_length: int) -> None:
    """``0 < max_prompt_length < max_length``: a cut prompt leaves at least one token of the budget to the response."""
    at_least(owner, "max_length", max_length, 2, "The budget holds the prompt and at least one response token")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"{owner}: max_prompt_length ({max_prompt_length}) must be in (0, max_length={max_length}): a "
                         "prompt cut to max_prompt_length must leave the response at least one token. Lower "
                         "max_prompt_length or raise max_length.")


PPO_AT_LEAST_ONE = ("max_new_tokens", "ppo_epochs", "generation_batch_size", "mini_batch_size", "micro_batch_size",
                    "samples_per_prompt")
PPO_POSITIVE = ("reward_clip", "max_grad_norm", "target_kl")


def check_rollout_settings(hp: Mapping[str, Any], owner: str) -> None:
    """The sampling and update settings every on-policy module shares (`recipes.modules.on_policy.OnPolicyModule`);
    the minibatch sizes against the rollout are checked by `check_minibatches` once the rollout size is known."""
    for name in PPO_AT_LEAST_ONE:
        at_least(owner, name, hp[name], 1, "Use an integer >= 1 (null, where allowed, for the default)")
    for name in PPO_POSITIVE:
        positive(owner, name, hp[name], "Use null to turn it off")
    at_least(owner, "temperature", hp["temperature"], 0.0, "0 samples greedily, 1 from the policy itself")
    at_least(owner, "top_k", hp["top_k"], 0, "0 turns the top-k filter off")
    within(owner, "top_p", hp["top_p"], 0.0, 1.0, "1 turns the top-p filter off", low_open=True)
    micro, mini = hp["micro_batch_size"], hp["mini_batch_size"]
    if micro is not None and mini is not None and micro > mini:
        _refuse(owner, "micro_batch_size", micro, f"is larger than mini_batch_size={mini} and would silently be "
                "shrunk to it", "Use micro_batch_size <= mini_batch_size")


def check_ppo_settings(hp: Mapping[str, Any], owner: str = "PPOModule") -> None:
    """PPO's sampling, KL, GAE and update settings (`recipes.modules.ppo.PPOModule`)."""
    check_rollout_settings(hp, owner)
    at_least(owner, "kl_coef", hp["kl_coef"], 0.0, "0 turns the KL penalty off; a negative coefficient rewards "
             "drifting away from the reference")
    for name in ("gamma", "lam"):
        within(owner, name, hp[name], 0.0, 1.0, "GAE's discount and lambda are fractions (the paper uses 1)")


def check_minibatches(mini_batch_size: int | None, micro_batch_size: int | None, rollout: int, source: str,
                      owner: str = "PPOModule") -> None:
    """``mini_batch_size`` divides the ``rollout`` batch (every minibatch the same size) and ``micro_batch_size`` is
    at most the minibatch; ``source`` names where the rollout size comes from."""
    if mini_batch_size is not None and (mini_batch_size > rollout or rollout % mini_batch_size):
        problem = "is larger than" if mini_batch_size > rollout else "does not divide"
        _refuse(owner, "mini_batch_size", mini_batch_size, f"{problem} the rollout of {rollout} rows ({source}); the "
                "minibatches would silently be smaller", f"Use a divisor of {rollout}, or null for one minibatch of "
                "the whole rollout")
    minibatch = mini_batch_size or rollout
    if micro_batch_size is not None and micro_batch_size > minibatch:
        _refuse(owner, "micro_batch_size", micro_batch_size, f"is larger than the minibatch of {minibatch} rows "
                f"({source}) and would silently be shrunk to it", f"Use at most {minibatch}, or null")


def declared_vocab_size(spec: ModelSpec) -> int | None:
    """The vocabulary a model spec declares before any resize: ``spec.config['vocab_size']``, or the one in a local
    folder's ``config.json``; None when neither says."""
    if spec.name_or_path is None:
        return (spec.config or {}).get("vocab_size")
    path = os.path.join(os.path.expanduser(spec.name_or_path), "config.json")
    if not os.path.isfile(path):
        return None  # a hub id: the build reads (or fails to read) it
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return saved.get("vocab_size", saved.get("text_config", {}).get("vocab_size"))


def check_vocabulary(owner: str, network: nn.Module, spec: ModelSpec,
                     tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Refuse a model built from ``spec`` that cannot embed every token id of ``tokenizer``: fewer embedding rows than
    ``len(tokenizer)``, or a declared vocabulary (`declared_vocab_size`) smaller than the tokenizer's own
    (``tokenizer.vocab_size``, without added tokens). Resizing for tokens added to the model's own tokenizer (a pad
    token) stays allowed."""
    if tokenizer is None or not hasattr(network, "get_input_embeddings"):
        return
    rows, declared = network.get_input_embeddings().num_embeddings, declared_vocab_size(spec)
    smallest = min(rows, declared if declared is not None else rows)
    if rows < len(tokenizer) or smallest < tokenizer.vocab_size:
        raise ValueError(f"{owner}: the model's vocabulary ({smallest} tokens) is smaller than the tokenizer's "
                         f"({len(tokenizer)} tokens): token ids {smallest}..{len(tokenizer) - 1} have no embedding "
                         "row of their own. Use the tokenizer the model was trained with, or for a random model "
                         "leave vocab_size out of model.config (it defaults to the tokenizer's).")
