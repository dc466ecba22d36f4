"""PreferenceDataModule: (prompt, chosen, rejected) pairs from HH-RLHF, PKU-SafeRLHF, generic or conversational
(chat ``messages``) JSONL/Parquet files, from one source or a weighted mixture of several.

One code path for every source: a format adapter (`recipes.datamodules.preference_sources`) turns each record into
texts, which are tokenized once, truncated to the budget with counts, and batched as one concatenated ``(2B, T)`` batch
(chosen rows first, then rejected) for a single forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader

from recipes.datamodules.builtin import resolve_builtin
from recipes.datamodules.chat import set_chat_template
from recipes.datamodules.collate import PreferenceExample, collate_preference, pad_prompt_response, truncate_pair
from recipes.datamodules.formats import PromptFormat, format_prompt
from recipes.datamodules.io import DataFormatError, DropCounter, first_rows, load_records, require_text
from recipes.datamodules.mixture import DataSource, as_plain, check_sources, mix_sources, resolve
from recipes.datamodules.preference_sources import (
    PreferenceFormat,
    PreferenceText,
    parse_rows,
    read_margin,
    to_preference,
)
from recipes.datamodules.resumable import SplitLoadersMixin
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.validation import check_loader_args, check_val_fraction

log = logging.getLogger(__name__)


class PreferenceDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Pairwise preference data for DPO and reward models.

    Args:
        tokenizer: tokenizer id or path (see `recipes.modules.tokenizer.load_tokenizer`), loaded at construction so the
            CLI can link it into the model.
        data: local JSON/JSONL(.gz)/Parquet file, hub id (read through `datasets`), or ``builtin:preference``; or a
            mixture: a list of weighted sources (`recipes.datamodules.mixture.DataSource`), each held out apart.
        source_format: ``hh`` (raw HH-RLHF ``chosen``/``rejected`` dialogues), ``saferlhf`` (PKU-SafeRLHF, paper's
            rule), ``generic`` (``prompt``/``chosen``/``rejected``) or ``messages`` (``chosen``/``rejected`` chat
            message lists, whole conversations or the answers to a ``prompt`` list, rendered with the chat
            template); see `recipes.datamodules.preference_sources`.
        prompt_format: how ``saferlhf``/``generic`` prompts are rendered (``plain``, ``hh``, ``alpaca``, ``chat``).
        chat_template: a Jinja chat template (a file's path or its text) for the tokenizer; None: its own.
        split, val_split: dataset splits read from ``data`` and ``val_data`` (hub ids have train/test).
        val_data: a separate validation source; without it ``val_fraction`` of the pairs are held out (seeded).
        predict_data: a file of ``{prompt, response}`` rows for ``predict`` (reward-model scoring).
        max_length: tokens per sequence (prompt + one response + EOS).
        max_prompt_length: a too-long pair keeps at most this many prompt tokens (default: half of max_length).
        batch_size: pairs per micro-batch per process (the forward sees ``2 * batch_size`` sequences).
        max_rows: read only the first ``max_rows`` rows (logged), for smoke runs.
        drop_empty: drop pairs with an empty response and log the count (real HH-RLHF has some); by default an error.
        drop_prompt_mismatch: drop HH pairs whose two dialogues differ before the last assistant turn, with a count;
            by default an error naming the row.
        margin_field: a numeric column holding a per-pair reward margin, passed to the reward loss.
        group_by_length: batch pairs of similar length (prompt + longer response) together to pad less
            (`recipes.datamodules.sampler.ResumableSampler`); off by default, as it changes the order.

    Identical chosen and rejected responses (as text, or after truncation) carry no preference: they are always
    dropped and counted.
    """

    def __init__(
        self,
        tokenizer: str = "builtin:byte",
        data: str | list[DataSource] = "builtin:preference",
        source_format: PreferenceFormat = "generic",
        prompt_format: PromptFormat = "plain",
        split: str = "train",
        val_data: str | None = None,
        val_split: str = "train",
        val_fraction: float = 0.05,
        predict_data: str | None = None,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        max_rows: int | None = None,
        drop_empty: bool = False,
        drop_prompt_mismatch: bool = False,
        margin_field: str | None = None,
        seed: int = 0,
        chat_template: str | None = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.sources = check_sources("PreferenceDataModule", data, get_args(PreferenceFormat))
        data = as_plain(data, self.sources)  # saved below: plain dicts in the checkpoint
        self.save_hyperparameters()
        self.max_length, self.batch_size, self.num_workers, self.seed = max_length, batch_size, num_workers, seed
        self.group_by_length = group_by_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        if not 0 < self.max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be in (0, max_length={max_length}).")
        check_loader_args("PreferenceDataModule", "batch_size", batch_size, num_workers, max_rows)
        check_val_fraction("PreferenceDataModule", val_fraction)
        self.tokenizer = load_tokenizer(tokenizer)
        set_chat_template(self.tokenizer, chat_template)
        self.counts: dict[str, int] = {}  # a mixture's rows per source, drops and truncations by source
        self.train_set: list[PreferenceExample] = []
        self.val_set: list[PreferenceExample] = []
        self.predict_set: list[dict[str, list[int]]] = []

    # --- reading ----------------------------------------------------------------------------------------------
    def _records(self, source: str, split: str, max_rows: int | None = None) -> tuple[str, list[dict[str, Any]]]:
        path = resolve_builtin(source)
        records = load_records(path, split=split)
        records = first_rows(records, max_rows if max_rows is not None else self.hparams.max_rows, path)
        if not records:
            raise DataFormatError(path, None, None, "has no rows", "point `data` at a non-empty file")
        return path, records

    def read_pairs(self, source: str | DataSource,
                   split: str = "train") -> tuple[list[PreferenceText], list[float | None]]:
        """Parse every record of ``source`` (a path with the module's settings, or a mixture's source with its own)
        into text pairs (and margins), dropping with counts where configured."""
        hp = self.hparams
        source = resolve(source, hp.source_format, split, hp.max_rows)
        path, records = self._records(source.path, source.split, source.max_rows)
        pairs, margins, dropped = [], [], DropCounter(path)

        def parse(record: dict[str, Any], row: int) -> PreferenceText:
            return to_preference(record, source.source_format, hp.prompt_format, path, row, self.tokenizer)

        for i, pair in parse_rows(records, parse, dropped, hp.drop_empty, hp.drop_prompt_mismatch):
            if pair.chosen == pair.rejected:
                dropped.add("dropped: identical chosen and rejected")
                continue
            pairs.append(pair)
            margins.append(read_margin(records[i], hp.margin_field, path, i) if hp.margin_field else None)
        dropped.report(len(records))
        self.drop_counts = dict(dropped.items())
        self.counts.update({f"{path}: {reason}": n for reason, n in dropped.items()})
        if not pairs:
            raise DataFormatError(path, None, None, "has no usable pairs after dropping (see the counts logged)")
        return pairs, margins

    def tokenize(self, pairs: Sequence[PreferenceText], margins: Sequence[float | None],
                 source: str) -> list[PreferenceExample]:
        """Tokenize pairs; fit each into ``max_length`` (prompt cut from the left, responses from the right)."""
        tok = self.tokenizer
        prompts = tok([p.prompt for p in pairs], add_special_tokens=True)["input_ids"]
        chosen = tok([p.chosen for p in pairs], add_special_tokens=False)["input_ids"]
        rejected = tok([p.rejected for p in pairs], add_special_tokens=False)["input_ids"]
        counter, out = DropCounter(source), []
        for p_ids, c_ids, r_ids, margin in zip(prompts, chosen, rejected, margins):
            c_ids, r_ids = c_ids + [tok.eos_token_id], r_ids + [tok.eos_token_id]
            longer = c_ids if len(c_ids) >= len(r_ids) else r_ids
            p_ids, _, p_cut, _ = truncate_pair(p_ids, longer, self.max_length, self.max_prompt_length)
            room = self.max_length - len(p_ids)
            counter.add("had the prompt truncated from the left", int(p_cut))
            counter.add("had a response truncated from the right (no EOS learned)",
                        int(len(c_ids) > room or len(r_ids) > room))
            c_ids, r_ids = c_ids[:room], r_ids[:room]
            if c_ids == r_ids:
                counter.add("dropped: chosen and rejected identical after truncation")
                continue
            example = PreferenceExample(prompt_ids=p_ids, chosen_ids=c_ids, rejected_ids=r_ids)
            if margin is not None:
                example["margin"] = margin
            out.append(example)
        counter.report(len(pairs))
        self.truncation_counts = dict(counter.items())
        self.counts.update({f"{source}: {reason}": n for reason, n in counter.items()})
        if not out:
            raise DataFormatError(source, None, None, f"has no pair left after fitting {len(pairs)} pairs into "
                                  f"max_length={self.max_length} tokens: {self.truncation_counts}",
                                  "raise data.max_length so that chosen and rejected still differ")
        return out

    def _read(self, source: str | DataSource, split: str) -> list[PreferenceExample]:
        pairs, margins = self.read_pairs(source, split)
        return self.tokenize(pairs, margins, resolve_builtin(source if isinstance(source, str) else source.path))

    def _read_predict(self, source: str) -> list[dict[str, list[int]]]:
        path, records = self._records(source, "train")
        texts = [(format_prompt(require_text(r, "prompt", path, i), self.hparams.prompt_format, self.tokenizer),
                  require_text(r, "response", path, i)) for i, r in enumerate(records)]
        prompts = self.tokenizer([p for p, _ in texts], add_special_tokens=True)["input_ids"]
        responses = self.tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"]
        out = []
        for p_ids, r_ids in zip(prompts, responses):
            p_ids, r_ids, _, _ = truncate_pair(p_ids, r_ids + [self.tokenizer.eos_token_id], self.max_length,
                                               self.max_prompt_length)
            out.append({"prompt_ids": p_ids, "response_ids": r_ids})
        return out

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "predict":
            if hp.predict_data is None:
                raise ValueError("predict needs data.predict_data: a file of {prompt, response} rows to score.")
            self.predict_set = self.predict_set or self._read_predict(hp.predict_data)
            return
        if self.train_set or self.val_set:
            return
        if self.sources is not None:  # a mixture: each source held out apart, its training pairs weighted
            holdout = None if hp.val_data is not None else \
                (lambda pairs, source: self.holdout(pairs, hp.val_fraction, hp.seed, source.path))
            self.train_set, self.val_set, counts = mix_sources(self.sources, lambda s: self._read(s, hp.split),
                                                               hp.seed, holdout)
            self.counts.update(counts)
            if hp.val_data is not None:
                self.val_set = self._read(hp.val_data, hp.val_split)
        else:
            examples = self._read(hp.data, hp.split)
            if hp.val_data is not None:
                self.train_set, self.val_set = examples, self._read(hp.val_data, hp.val_split)
            else:
                self.train_set, self.val_set = self.holdout(examples, hp.val_fraction, hp.seed, hp.data)
        for split in (self.train_set, self.val_set):
            for i, example in enumerate(split):
                example["index"] = i
        log.info("Preference data: %d train / %d validation pairs", len(self.train_set), len(self.val_set))

    # --- loaders ----------------------------------------------------------------------------------------------
    def collate(self, examples: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
        return collate_preference(examples, self.tokenizer.pad_token_id)

    def example_length(self, example: PreferenceExample) -> int:
        return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))

    def batch_cells(self, examples: Sequence[PreferenceExample]) -> tuple[int, int]:
        """Two rows (chosen, rejected) per pair, as wide as the longest sequence of the batch."""
        tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
        return tokens, 2 * len(examples) * max(self.example_length(e) for e in examples)

    def test_dataloader(self) -> DataLoader:
        """The held-out split, as in validation (set ``val_data`` to a separate test file to evaluate on it)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_set, batch_size=self.batch_size, shuffle=False,
                          collate_fn=partial(pad_prompt_response, pad_token_id=self.tokenizer.pad_token_id))
