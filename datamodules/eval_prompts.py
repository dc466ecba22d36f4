"""Evaluation prompt sets: prompt texts with, where the source has one, the dataset's chosen response (the "vs
chosen" baseline of the paper's Table 4). HH-RLHF raw, PKU-SafeRLHF, generic pairs, Alpaca, plain prompt files.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from recipes.datamodules.formats import PromptFormat
from recipes.datamodules.io import DataFormatError, DropCounter, EmptyFieldError, first_rows
from recipes.datamodules.preference_sources import PromptMismatchError, to_preference
from recipes.datamodules.prompts import read_prompt_rows, to_prompt

log = logging.getLogger(__name__)

EvalSource = Literal["hh", "saferlhf", "generic", "alpaca", "plain"]
WITH_CHOSEN = ("hh", "saferlhf", "generic")  # pair formats: the chosen response is a baseline


@dataclass
class PromptSetSpec:
    """Where the evaluation prompts come from.

    Args:
        data: one or more files (JSON/JSONL(.gz)/Parquet, ``.txt`` one prompt per line), hub ids, or
            ``builtin:preference`` / ``builtin:prompts``.
        source_format: ``hh`` (HH-RLHF ``chosen``/``rejected`` dialogues: the history up to the last assistant turn
            is the prompt, the chosen reply the baseline), ``saferlhf`` (the chosen reply by the paper's
            safe-then-helpful rule), ``generic`` (``prompt``/``chosen``/``rejected``), ``alpaca`` or ``plain``
            (prompts only: no "chosen" baseline).
        prompt_format: how saferlhf/generic/alpaca/plain prompts are rendered (``hh``, ``alpaca``, ``chat``, ``plain``).
        split: the split of a hub dataset.
        max_rows: use the first ``max_rows`` rows of each file (None: all).
        drop_invalid: drop rows with an empty response or mismatched HH prompts, counted and logged (else: an error
            naming the row).
    """

    data: str | list[str] = field(default_factory=lambda: ["builtin:preference"])
    source_format: EvalSource = "generic"
    prompt_format: PromptFormat = "plain"
    split: str = "test"
    max_rows: int | None = None
    drop_invalid: bool = False


@dataclass
class EvalPrompts:
    """The prompt set: ``prompts[i]`` with ``chosen[i]`` (None for prompt-only sources) and its origin."""

    prompts: list[str]
    chosen: list[str] | None
    origin: list[tuple[str, int]]  # (file, row) of each prompt
    counts: dict[str, Any]


def load_eval_prompts(spec: PromptSetSpec, tokenizer=None) -> EvalPrompts:
    """Read every file of ``spec.data`` into one prompt set; errors name the file, row and field."""
    files: Sequence[str] = [spec.data] if isinstance(spec.data, str) else spec.data
    if not files:
        raise ValueError("prompts.data is empty: name at least one prompt file.")
    prompts, chosen, origin, counts = [], [], [], {"rows": 0, "kept": 0}
    for source in files:
        records = read_prompt_rows(source, spec.split)
        records = first_rows(records, spec.max_rows, source)
        counter = DropCounter(source)
        for i, record in enumerate(records):
            try:
                if spec.source_format in WITH_CHOSEN:
                    pair = to_preference(record, spec.source_format, spec.prompt_format, source, i, tokenizer)
                    prompt, reply = pair.prompt, pair.chosen
                else:
                    prompt, reply = to_prompt(record, spec.source_format, spec.prompt_format, source, i,
                                              tokenizer)[0], None
            except (EmptyFieldError, PromptMismatchError) as e:
                if not spec.drop_invalid:
                    raise
                counter.add(f"dropped: {type(e).__name__} in '{e.field}'")
                continue
            prompts.append(prompt)
            chosen.append(reply)
            origin.append((source, i))
        counter.report(len(records))
        counts["rows"] += len(records)
        for reason, n in counter.items():
            counts[f"{source}: {reason}"] = n
    counts["kept"] = len(prompts)
    if not prompts:
        raise DataFormatError(", ".join(files), None, None, f"has no usable prompt ({counts})",
                              "check prompts.source_format, or set prompts.drop_invalid: true")
    return EvalPrompts(prompts, chosen if spec.source_format in WITH_CHOSEN else None, origin, counts)


def oasst_pair(prompt: str, response: str) -> tuple[str, str]:
    """An HH-format dialogue (``\\n\\nHuman: ... \\n\\nAssistant:``) and its response in the markers OpenAssistant's
    reward models were trained on: ``<|prompter|>q<|endoftext|><|assistant|>`` and the stripped response (the
    reward model's own EOS, ``<|endoftext|>``, is appended by the scorer's ``append_eos``)."""
    parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", prompt)
    if len(parts) < 3 or parts[0].strip() or parts[-2] != "\n\nAssistant:" or parts[-1].strip():
        raise ValueError(f"text_format 'oasst' needs HH dialogues ending in '\\n\\nAssistant:'; got {prompt[:80]!r}. "
                         "Use prompts.source_format hh (or prompt_format hh), or the reward's text_format: as_is.")
    out = ""
    for marker, text in zip(parts[1::2], parts[2::2]):
        role = "<|prompter|>" if marker == "\n\nHuman:" else "<|assistant|>"
        out += role + (text.strip() + "<|endoftext|>" if text.strip() else "")
    return out, response.strip()
