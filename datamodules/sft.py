"""SFTDataModule: Alpaca-style instruction sets, the chosen side of HH-RLHF, or prompt/response pairs.

Rows are read through `datasets` (local JSON/JSONL/Parquet or a hub id), rendered with a prompt format, tokenized
once, and batched with the loss on response tokens only. Truncations are counted and logged; bad rows raise an
error naming the file, row and field.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from recipes.datamodules.builtin import resolve_builtin
from recipes.datamodules.collate import CausalLMBatch, TokenizedExample, pad_prompt_response, truncate_pair
from recipes.datamodules.formats import HUMAN, PromptFormat, alpaca_prompt, format_prompt, split_hh_dialogue
from recipes.datamodules.io import DataFormatError, DropCounter, EmptyFieldError, first_rows, load_records, require_text
from recipes.datamodules.preference_sources import saferlhf_safe_responses
from recipes.datamodules.resumable import SplitLoadersMixin
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.validation import check_loader_args, check_token_budget, check_val_fraction

log = logging.getLogger(__name__)

SourceFormat = Literal["alpaca", "hh_chosen", "prompt_response", "saferlhf_safe"]


def to_prompt_response(record: dict[str, Any], source_format: SourceFormat, prompt_format: PromptFormat,
                       source: str, row: int, tokenizer=None) -> tuple[str, str]:
    """One raw record -> (prompt text, response text), or a `DataFormatError` naming the row and field."""
    if source_format == "alpaca":
        instruction = require_text(record, "instruction", source, row)
        extra = record.get("input") or ""
        response = require_text(record, "output", source, row)
        if prompt_format == "alpaca":
            prompt = alpaca_prompt(instruction, extra)
        else:
            prompt = format_prompt(f"{instruction}\n\n{extra}" if extra.strip() else instruction, prompt_format,
                                   tokenizer)
        return prompt, response
    if source_format == "hh_chosen":
        dialogue = require_text(record, "chosen", source, row)
        parts = split_hh_dialogue(dialogue)
        if parts is None or not dialogue.lstrip("\n").startswith(HUMAN.strip()):
            raise DataFormatError(source, row, "chosen", "is not an HH dialogue ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
        if not parts[1].strip():
            raise DataFormatError(source, row, "chosen", "has an empty final assistant response",
                                  "remove the row")
        return parts
    if source_format == "prompt_response":
        prompt = require_text(record, "prompt", source, row)
        return format_prompt(prompt, prompt_format, tokenizer), require_text(record, "response", source, row)
    raise ValueError(f"Unknown source_format {source_format!r}")


class SFTDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Supervised fine-tuning data with response-only loss.

    Args:
        tokenizer: tokenizer id or path (see `recipes.modules.tokenizer.load_tokenizer`); loaded at construction so the
            CLI can link it into the model.
        data: local file, hub id, or ``builtin:sft``.
        source_format: ``alpaca`` (instruction/input/output), ``hh_chosen`` (the chosen dialogue of an HH-RLHF
            pair), ``prompt_response``, or ``saferlhf_safe`` (PKU-SafeRLHF rows: one example per response marked
            safe, the paper's SFT-on-safe step; rows with no safe response are dropped and counted).
        prompt_format: how prompts are rendered (``alpaca``, ``hh``, ``chat``, ``plain``); HH rows keep their own.
        val_data: a separate validation file; without it ``val_fraction`` of the rows are held out (seeded).
        max_length: tokens per example; longer rows are truncated (prompt from the left, then response from the
            right) and counted.
        max_prompt_length: the prompt keeps at most this many tokens when a row is too long (default: half).
        batch_size: micro-batch size per process.
        max_rows: use only the first ``max_rows`` rows (counted in the log), for smoke runs.
        drop_empty: drop rows with an empty required field and log the count (real Alpaca has one); by default
            such a row is an error naming the file, row and field.
    """

    def __init__(
        self,
        tokenizer: str = "builtin:byte",
        data: str = "builtin:sft",
        source_format: SourceFormat = "alpaca",
        prompt_format: PromptFormat = "alpaca",
        split: str = "train",
        val_data: str | None = None,
        val_fraction: float = 0.05,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        max_rows: int | None = None,
        drop_empty: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        check_loader_args("SFTDataModule", "batch_size", batch_size, num_workers, max_rows)
        check_val_fraction("SFTDataModule", val_fraction)
        check_token_budget("SFTDataModule", max_length, self.max_prompt_length)
        self.tokenizer = load_tokenizer(tokenizer)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.counts: dict[str, int] = {}  # rows truncated, by reason and source (also logged)
        self.train_set: list[TokenizedExample] = []
        self.val_set: list[TokenizedExample] = []

    # --- data preparation -------------------------------------------------------------------------------------
    def _read(self, source: str) -> list[TokenizedExample]:
        hp = self.hparams
        path = resolve_builtin(source)
        records = load_records(path, split=hp.split)
        records = first_rows(records, hp.max_rows, path)
        if not records:
            raise DataFormatError(path, None, None, "has no rows", "point `data` at a non-empty file")
        pairs, dropped = [], DropCounter(path)
        for i, record in enumerate(records):
            try:
                if hp.source_format == "saferlhf_safe":
                    safe = saferlhf_safe_responses(record, path, i, hp.prompt_format, self.tokenizer)
                    dropped.add("dropped: no response marked safe", int(not safe))
                    pairs.extend(safe)
                    continue
                pairs.append(to_prompt_response(record, hp.source_format, hp.prompt_format, path, i, self.tokenizer))
            except EmptyFieldError as e:
                if not hp.drop_empty:
                    raise
                dropped.add(f"dropped: empty '{e.field}'")
        dropped.report(len(records))
        if not pairs:
            raise DataFormatError(path, None, None, "has no usable rows after dropping empty ones")
        return self._tokenize(pairs, path)

    def _tokenize(self, pairs: list[tuple[str, str]], source: str) -> list[TokenizedExample]:
        tok = self.tokenizer
        prompts = tok([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
        responses = tok([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        counter = DropCounter(f"{source}")
        out: list[TokenizedExample] = []
        for i, (p_ids, r_ids) in enumerate(zip(prompts, responses)):
            if not r_ids:
                raise DataFormatError(source, i, "response", "tokenizes to nothing", "remove the row")
            p_ids, r_ids, p_cut, r_cut = truncate_pair(p_ids, r_ids + [tok.eos_token_id], self.max_length,
                                                       self.max_prompt_length)
            counter.add("had the prompt truncated from the left", int(p_cut))
            counter.add("had the response truncated from the right (no EOS learned)", int(r_cut))
            out.append(TokenizedExample(prompt_ids=p_ids, response_ids=r_ids))
        counter.report(len(out))
        self.counts.update({f"{source}: {reason}": n for reason, n in counter.items()})
        return out

    def setup(self, stage: str) -> None:
        if self.train_set or self.val_set:
            return
        hp = self.hparams
        examples = self._read(hp.data)
        if hp.val_data is not None:
            self.train_set, self.val_set = examples, self._read(hp.val_data)
        else:
            self.train_set, self.val_set = self.holdout(examples, hp.val_fraction, hp.seed, hp.data)
        log.info("SFT data: %d train / %d validation examples", len(self.train_set), len(self.val_set))

    # --- loaders ----------------------------------------------------------------------------------------------
    def collate(self, examples: list[TokenizedExample]) -> CausalLMBatch:
        return pad_prompt_response(examples, self.tokenizer.pad_token_id)

    def test_dataloader(self) -> DataLoader:
        """The held-out split (set ``val_data`` to a separate test file to evaluate on it)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out prompts alone, left-padded for generation (`recipes.modules.types.PromptBatch`)."""
        from recipes.datamodules.collate import pad_prompts

        tok = self.tokenizer
        rows = [{"input_ids": e["prompt_ids"], "prompt": tok.decode(e["prompt_ids"], skip_special_tokens=True),
                 "metadata": {}} for e in self.val_set]
        return DataLoader(rows, batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=partial(pad_prompts, pad_token_id=tok.pad_token_id))
