"""UnpairedDataModule: unpaired completions labelled desirable or undesirable (KTO), from ``{prompt, completion,
label}`` rows (TRL's unpaired-preference format) or converted from preference pairs (chosen -> True, rejected ->
False; chat ``messages`` pairs too), from one source or a weighted mixture. Tokenized as the other data modules
(prompt and completion apart, EOS appended, counted truncation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from recipes.datamodules.builtin import resolve_builtin
from recipes.datamodules.chat import set_chat_template
from recipes.datamodules.collate import UnpairedExample, collate_unpaired, truncate_pair
from recipes.datamodules.formats import PromptFormat, format_prompt
from recipes.datamodules.io import DataFormatError, DropCounter, first_rows, load_records, require_text, require_value
from recipes.datamodules.mixture import DataSource, as_plain, check_sources, mix_sources, resolve
from recipes.datamodules.preference_sources import parse_rows, to_preference
from recipes.datamodules.resumable import SplitLoadersMixin
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.validation import at_least, check_loader_args, check_token_budget, check_val_fraction

log = logging.getLogger(__name__)

UnpairedFormat = Literal["unpaired", "generic", "hh", "saferlhf", "messages"]


class UnpairedText(NamedTuple):
    """One labelled completion as text: ``label`` is True when the completion is desirable."""

    prompt: str
    completion: str
    label: bool


def read_label(record: Mapping[str, Any], field: str, source: str, row: int) -> bool:
    """``record[field]`` as a bool (JSON ``true``/``false``), or an error naming the file, row and field."""
    value = require_value(record, field, source, row, "each row needs label: true (desirable) or false")
    if not isinstance(value, bool):
        raise DataFormatError(source, row, field, f"expected true/false, got {value!r}",
                              "write the label as a JSON boolean (true: desirable, false: undesirable)")
    return value


def unpaired_row(record: Mapping[str, Any], source: str, row: int, prompt_format: PromptFormat = "plain",
                 tokenizer: PreTrainedTokenizerBase | None = None) -> UnpairedText:
    """``{prompt, completion, label}`` row -> the prompt rendered with ``prompt_format``, the completion, the label."""
    prompt = require_text(record, "prompt", source, row)
    completion = require_text(record, "completion", source, row)
    return UnpairedText(format_prompt(prompt, prompt_format, tokenizer), completion,
                        read_label(record, "label", source, row))


def unpaired_order(groups: Sequence[Sequence[UnpairedText]]) -> list[UnpairedText]:
    """The rows of every group, in ``len(group)`` passes over the groups: pass ``j`` takes row ``(k + j) % len`` of
    group ``k``. Converted pairs thus become chosen, rejected, chosen, ... of pairs 0, 1, 2, ..., then the other
    halves: neighbours never share a prompt (so the KL batch's "next row" of an unshuffled split is a mismatched pair)
    and every batch mixes both labels. One-row groups keep their order."""
    width = max((len(g) for g in groups), default=0)
    return [g[(k + j) % len(g)] for j in range(width) for k, g in enumerate(groups) if j < len(g)]


class UnpairedDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Unpaired, labelled completions for KTO (`recipes.modules.kto.KTOModule`).

    Args:
        tokenizer: tokenizer id or path (see `recipes.modules.tokenizer.load_tokenizer`), loaded at construction so
            the CLI can link it into the model.
        data: local JSON/JSONL(.gz)/Parquet file, hub id (read through `datasets`), or ``builtin:preference``; or a
            mixture: a list of weighted sources (`recipes.datamodules.mixture.DataSource`), each held out apart.
        source_format: ``unpaired``: ``{prompt, completion, label}`` rows (``label`` a boolean, true = desirable);
            ``generic``, ``hh``, ``saferlhf`` or ``messages``: preference pairs as `recipes.datamodules.preference.
            PreferenceDataModule` reads them, each turned into two rows, chosen (true) and rejected (false).
        prompt_format: how ``unpaired``/``generic``/``saferlhf`` prompts are rendered (``plain``, ``hh``, ``alpaca``,
            ``chat``).
        split, val_split: dataset splits read from ``data`` and ``val_data``.
        val_data: a separate validation source; without it ``val_fraction`` of the records are held out (seeded):
            of the pairs, for converted data, so a prompt's two completions stay in the same split.
        max_length: tokens per sequence (prompt + completion + EOS).
        max_prompt_length: a too-long row keeps at most this many prompt tokens (default: half of max_length).
        batch_size: rows per micro-batch per process, at least 2 (KTO's reference point pairs each prompt with
            another row's completion). A training epoch whose last batch would hold a single row leaves it out,
            with a warning (shuffled: a different row each epoch).
        max_rows: read only the first ``max_rows`` records (logged), for smoke runs.
        drop_empty: drop rows with an empty text field and log the count; by default an error naming the row.
        drop_prompt_mismatch: ``hh`` and ``messages``: drop pairs whose dialogues differ before the last assistant
            turn, counted.
        chat_template: a Jinja chat template (a file's path or its text) for the tokenizer; None: its own.
        group_by_length: batch rows of similar length together to pad less (`recipes.datamodules.sampler.
            ResumableSampler`); off by default, as it changes the order (and so the mismatched KL pairs).

    A converted pair with identical chosen and rejected texts labels one completion both ways: it is dropped and
    counted.
    """

    def __init__(
        self,
        tokenizer: str = "builtin:byte",
        data: str | list[DataSource] = "builtin:preference",
        source_format: UnpairedFormat = "generic",
        prompt_format: PromptFormat = "plain",
        split: str = "train",
        val_data: str | None = None,
        val_split: str = "train",
        val_fraction: float = 0.05,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        max_rows: int | None = None,
        drop_empty: bool = False,
        drop_prompt_mismatch: bool = False,
        seed: int = 0,
        chat_template: str | None = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.sources = check_sources("UnpairedDataModule", data, get_args(UnpairedFormat))
        data = as_plain(data, self.sources)  # saved below: plain dicts in the checkpoint
        self.save_hyperparameters()
        if source_format not in get_args(UnpairedFormat):
            raise ValueError(f"UnpairedDataModule: source_format={source_format!r} is not one of "
                             f"{', '.join(get_args(UnpairedFormat))}.")
        self.max_length, self.batch_size, self.num_workers, self.seed = max_length, batch_size, num_workers, seed
        self.group_by_length = group_by_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        check_loader_args("UnpairedDataModule", "batch_size", batch_size, num_workers, max_rows)
        at_least("UnpairedDataModule", "batch_size", batch_size, 2, "KTO's reference point pairs each prompt with "
                 "another row's completion of the batch, and a one-row batch has none")
        check_val_fraction("UnpairedDataModule", val_fraction)
        check_token_budget("UnpairedDataModule", max_length, self.max_prompt_length)
        self.tokenizer = load_tokenizer(tokenizer)
        set_chat_template(self.tokenizer, chat_template)
        self.train_set: list[UnpairedExample] = []
        self.val_set: list[UnpairedExample] = []
        self.drop_counts: dict[str, int] = {}
        self.truncation_counts: dict[str, int] = {}
        self.counts: dict[str, int] = {}  # a mixture's rows (records) per source

    # --- reading ----------------------------------------------------------------------------------------------
    def read_groups(self, source: str | DataSource, split: str = "train") -> list[list[UnpairedText]]:
        """One group per usable record of ``source`` (a path with the module's settings, or a mixture's source with
        its own): ``[row]`` for unpaired data, ``[chosen, rejected]`` for a converted pair; dropped records are
        counted and logged."""
        hp = self.hparams
        source = resolve(source, hp.source_format, split, hp.max_rows)
        path = resolve_builtin(source.path)
        records = load_records(path, split=source.split)
        records = first_rows(records, source.max_rows, path)
        if not records:
            raise DataFormatError(path, None, None, "has no rows", "point `data` at a non-empty file")

        def parse(record: Mapping[str, Any], row: int) -> list[UnpairedText]:
            if source.source_format == "unpaired":
                return [unpaired_row(record, path, row, hp.prompt_format, self.tokenizer)]
            pair = to_preference(record, source.source_format, hp.prompt_format, path, row, self.tokenizer)
            return [UnpairedText(pair.prompt, pair.chosen, True), UnpairedText(pair.prompt, pair.rejected, False)]

        groups, dropped = [], DropCounter(path)
        for _, group in parse_rows(records, parse, dropped, hp.drop_empty, hp.drop_prompt_mismatch):
            if len(group) == 2 and group[0].completion == group[1].completion:
                dropped.add("dropped: identical chosen and rejected (one completion labelled both ways)")
                continue
            groups.append(group)
        dropped.report(len(records))
        for reason, n in dropped.items():
            self.drop_counts[reason] = self.drop_counts.get(reason, 0) + n
        if not groups:
            raise DataFormatError(path, None, None, "has no usable rows after dropping (see the counts logged)")
        return groups

    def tokenize(self, rows: Sequence[UnpairedText], source: str) -> list[UnpairedExample]:
        """Tokenize prompt (with the tokenizer's special tokens) and completion (+ EOS) apart and fit each row into
        ``max_length``: the prompt is cut from the left, then the completion from the right, each cut counted."""
        if not rows:
            return []
        tok = self.tokenizer
        prompts = tok([r.prompt for r in rows], add_special_tokens=True)["input_ids"]
        completions = tok([r.completion for r in rows], add_special_tokens=False)["input_ids"]
        counter, out = DropCounter(source), []
        for p_ids, c_ids, row in zip(prompts, completions, rows):
            p_ids, c_ids, p_cut, c_cut = truncate_pair(p_ids, c_ids + [tok.eos_token_id], self.max_length,
                                                       self.max_prompt_length)
            counter.add("had the prompt truncated from the left", int(p_cut))
            counter.add("had the completion truncated from the right (no EOS learned)", int(c_cut))
            out.append(UnpairedExample(prompt_ids=p_ids, completion_ids=c_ids, label=row.label))
        counter.report(len(rows))
        for reason, n in counter.items():
            self.truncation_counts[reason] = self.truncation_counts.get(reason, 0) + n
        return out

    def setup(self, stage: str) -> None:
        if self.train_set or self.val_set:
            return
        hp = self.hparams
        if self.sources is not None:  # a mixture: each source held out apart (by record), its records weighted
            holdout = None if hp.val_data is not None else \
                (lambda groups, source: self.holdout(groups, hp.val_fraction, hp.seed, source.path))
            train, val, self.counts = mix_sources(self.sources, lambda s: self.read_groups(s, hp.split), hp.seed,
                                                  holdout)
            if hp.val_data is not None:
                val = self.read_groups(hp.val_data, hp.val_split)
        else:
            groups = self.read_groups(hp.data, hp.split)
            if hp.val_data is not None:
                train, val = groups, self.read_groups(hp.val_data, hp.val_split)
            else:
                train, val = self.holdout(groups, hp.val_fraction, hp.seed, hp.data)
        source = resolve_builtin(hp.data) if self.sources is None else "the mixture of data"
        self.train_set = self.tokenize(unpaired_order(train), source)
        self.val_set = self.tokenize(unpaired_order(val), source if hp.val_data is None else
                                     resolve_builtin(hp.val_data))
        for name, examples in (("train", self.train_set), ("validation", self.val_set)):
            for i, example in enumerate(examples):
                example["index"] = i
            desirable = sum(bool(e["label"]) for e in examples)
            log.info("Unpaired data, %s: %d rows, %d desirable / %d undesirable", name, len(examples), desirable,
                     len(examples) - desirable)

    # --- loaders ----------------------------------------------------------------------------------------------
    def collate(self, examples: Sequence[UnpairedExample]) -> dict[str, torch.Tensor]:
        return collate_unpaired(examples, self.tokenizer.pad_token_id)

    def example_length(self, example: UnpairedExample) -> int:
        return len(example["prompt_ids"]) + len(example["completion_ids"])

    def batch_cells(self, examples: Sequence[UnpairedExample]) -> tuple[int, int]:
        """The rows and the mismatched KL rows (row ``i``'s prompt, row ``i + 1``'s completion), each padded apart."""
        n, tokens = len(examples), sum(self.example_length(e) for e in examples)
        kl_width = max(len(e["prompt_ids"]) + len(examples[(i + 1) % n]["completion_ids"])
                       for i, e in enumerate(examples))
        return 2 * tokens, n * (max(self.example_length(e) for e in examples) + kl_width)

    def train_dataloader(self) -> DataLoader:
        """The resumable shuffled loader; a last batch of one row (which has no mismatched completion) is left out."""
        trainer = self.trainer
        shard = -(-len(self.train_set) // (trainer.world_size if trainer is not None else 1))  # rows per rank
        lone = shard > 1 and shard % self.batch_size == 1
        if lone:
            log.warning("Unpaired data: the last training batch of each epoch would hold 1 row, which has no other "
                        "row's completion for KTO's reference point; it is left out (%d of %d rows per rank and "
                        "epoch, a different one each epoch)", 1, shard)
        return self.resumable_loader(self.train_set, self.collate, drop_last=lone)
