"""SFTDataModule: Alpaca-style instruction sets, the chosen side of HH-RLHF, prompt/response pairs, or chat
conversations (``messages``, multi-turn), from one source or a weighted mixture of several.

Rows are read through `datasets` (local JSON/JSONL/Parquet or a hub id), rendered with a prompt format, tokenized
once, and batched with the loss on response tokens only (on a conversation's assistant turns only). Truncations are
counted and logged; bad rows raise an error naming the file, row and field.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal, get_args

import lightning as L
from torch.utils.data import DataLoader

from recipes.datamodules.builtin import resolve_builtin
from recipes.datamodules.chat import check_messages, render_pieces, set_chat_template, tokenize_pieces
from recipes.datamodules.collate import CausalLMBatch, TokenizedExample, pad_prompt_response, truncate_pair
from recipes.datamodules.formats import HUMAN, PromptFormat, alpaca_prompt, format_prompt, split_hh_dialogue
from recipes.datamodules.io import (
    DataFormatError,
    DropCounter,
    EmptyFieldError,
    first_rows,
    load_records,
    optional_text,
    require_text,
    require_value,
)
from recipes.datamodules.mixture import DataSource, as_plain, check_sources, mix_sources, resolve
from recipes.datamodules.preference_sources import saferlhf_safe_responses
from recipes.datamodules.resumable import SplitLoadersMixin
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.validation import check_loader_args, check_token_budget, check_val_fraction

log = logging.getLogger(__name__)

SourceFormat = Literal["alpaca", "hh_chosen", "prompt_response", "saferlhf_safe", "messages"]


def to_prompt_response(record: dict[str, Any], source_format: SourceFormat, prompt_format: PromptFormat,
                       source: str, row: int, tokenizer=None) -> tuple[str, str]:
    """One raw record -> (prompt text, response text), or a `DataFormatError` naming the row and field."""
    if source_format == "alpaca":
        instruction = require_text(record, "instruction", source, row)
        extra = optional_text(record, "input", source, row)
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
        if not parts[1].strip():  # an EmptyFieldError: `drop_empty` drops such rows with a count
            raise EmptyFieldError(source, row, "chosen", "has an empty final assistant response",
                                  "remove the row, or set drop_empty: true to drop such rows with a count")
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
        data: local file, hub id, or ``builtin:sft``; or a mixture: a list of sources with weights (and their own
            format, split, max_rows; `recipes.datamodules.mixture.DataSource`), each held out apart (``val_fraction``
            of each) and weighted (the fraction of its rows used per epoch), counted per source in ``counts``.
        source_format: ``alpaca`` (instruction/input/output), ``hh_chosen`` (the chosen dialogue of an HH-RLHF
            pair), ``prompt_response``, ``saferlhf_safe`` (PKU-SafeRLHF rows: one example per response marked
            safe, the paper's SFT-on-safe step; rows with no safe response are dropped and counted), or ``messages``
            (``{"messages": [{"role", "content"}, ...]}`` conversations rendered with the chat template; the loss is
            on the assistant turns only, their EOS included; `recipes.datamodules.chat`).
        prompt_format: how prompts are rendered (``alpaca``, ``hh``, ``chat``, ``plain``); HH rows keep their own,
            ``messages`` rows the chat template.
        chat_template: a Jinja chat template (a file's path or its text) for the tokenizer; None: its own.
        val_data: a separate validation file; without it ``val_fraction`` of the rows are held out (seeded).
        max_length: tokens per example; longer rows are truncated (prompt from the left, then response from the
            right) and counted.
        max_prompt_length: the prompt keeps at most this many tokens when a row is too long (default: half).
        batch_size: micro-batch size per process.
        max_rows: use only the first ``max_rows`` rows (counted in the log), for smoke runs.
        drop_empty: drop rows with an empty required field (``hh_chosen``: an empty final assistant response) and
            log the count (real Alpaca has two such rows, the real HH-RLHF harmless-base test split four); by default
            such a row is an error naming the file, row and field.
        group_by_length: batch examples of similar length together (megabatches sorted by length,
            `recipes.datamodules.sampler.ResumableSampler`) to pad less; off by default, as it changes the order.
    """

    def __init__(
        self,
        tokenizer: str = "builtin:byte",
        data: str | list[DataSource] = "builtin:sft",
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
        chat_template: str | None = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.sources = check_sources("SFTDataModule", data, get_args(SourceFormat))
        data = as_plain(data, self.sources)  # saved below: plain dicts in the checkpoint
        self.save_hyperparameters()
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        check_loader_args("SFTDataModule", "batch_size", batch_size, num_workers, max_rows)
        check_val_fraction("SFTDataModule", val_fraction)
        check_token_budget("SFTDataModule", max_length, self.max_prompt_length)
        self.tokenizer = load_tokenizer(tokenizer)
        set_chat_template(self.tokenizer, chat_template)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.group_by_length = group_by_length
        self.counts: dict[str, int] = {}  # rows dropped or truncated, by reason and source (also logged)
        self.train_set: list[TokenizedExample] = []
        self.val_set: list[TokenizedExample] = []

    # --- data preparation -------------------------------------------------------------------------------------
    def _read(self, source: str | DataSource) -> list[TokenizedExample]:
        """The examples of one source (a path with the module's settings, or a mixture's source with its own)."""
        hp = self.hparams
        source = resolve(source, hp.source_format, hp.split, hp.max_rows)
        path = resolve_builtin(source.path)
        records = load_records(path, split=source.split)
        records = first_rows(records, source.max_rows, path)
        if not records:
            raise DataFormatError(path, None, None, "has no rows", "point `data` at a non-empty file")
        if source.source_format == "messages":
            return self._conversations(records, path)
        pairs, rows, dropped = [], [], DropCounter(path)
        for i, record in enumerate(records):
            try:
                if source.source_format == "saferlhf_safe":
                    safe = saferlhf_safe_responses(record, path, i, hp.prompt_format, self.tokenizer)
                    dropped.add("dropped: no response marked safe", int(not safe))
                    pairs.extend(safe)
                    rows.extend([i] * len(safe))
                    continue
                pairs.append(to_prompt_response(record, source.source_format, hp.prompt_format, path, i,
                                                self.tokenizer))
                rows.append(i)
            except EmptyFieldError as e:
                if not hp.drop_empty:
                    raise
                dropped.add(f"dropped: empty '{e.field}'")
        dropped.report(len(records))
        self.counts.update({f"{path}: {reason}": n for reason, n in dropped.items()})
        if not pairs:
            raise DataFormatError(path, None, None, "has no usable rows after dropping empty ones")
        return self._tokenize(pairs, path, rows)

    def _tokenize(self, pairs: list[tuple[str, str]], source: str, rows: list[int]) -> list[TokenizedExample]:
        """Tokenize (prompt, response) pairs; ``rows`` holds each pair's row in ``source`` (for error messages)."""
        tok = self.tokenizer
        prompts = tok([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
        responses = tok([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        counter = DropCounter(f"{source}")
        out: list[TokenizedExample] = []
        for row, p_ids, r_ids in zip(rows, prompts, responses):
            if not r_ids:
                raise DataFormatError(source, row, "response", "tokenizes to nothing", "remove the row")
            p_ids, r_ids, p_cut, r_cut = truncate_pair(p_ids, r_ids + [tok.eos_token_id], self.max_length,
                                                       self.max_prompt_length)
            counter.add("had the prompt truncated from the left", int(p_cut))
            counter.add("had the response truncated from the right (no EOS learned)", int(r_cut))
            out.append(TokenizedExample(prompt_ids=p_ids, response_ids=r_ids))
        counter.report(len(out))
        self.counts.update({f"{source}: {reason}": n for reason, n in counter.items()})
        self._check_some_complete(source, counter, len(out),
                                  "had the response truncated from the right (no EOS learned)")
        return out

    def _check_some_complete(self, source: str, counter: DropCounter, n: int, reason: str) -> None:
        """A budget that cuts every response teaches no example where to stop: an error with the counts, not a
        warning (the run would train a model that never emits EOS)."""
        if n and dict(counter.items()).get(reason, 0) == n:
            raise DataFormatError(source, None, None,
                                  f"has every one of its {n} rows cut by max_length={self.max_length} tokens "
                                  f"(max_prompt_length={self.max_prompt_length}): {dict(counter.items())}",
                                  "raise data.max_length (or lower max_prompt_length) so that at least some "
                                  "responses keep their EOS")

    def _conversations(self, records: list[dict[str, Any]], path: str) -> list[TokenizedExample]:
        """``messages`` rows -> examples whose prompt is the conversation before its first answer and whose response
        is the rest, with ``loss_mask`` 1 on the assistant pieces (their EOS included) only. Text after the last
        answer carries no loss and is left out (a conversation ending in another turn is counted); a conversation
        over ``max_length`` is cut as any row (prompt from the left, the rest from the right), counted."""
        hp, tok = self.hparams, self.tokenizer
        dropped, counter, out = DropCounter(path), DropCounter(path), []
        for i, record in enumerate(records):
            value = require_value(record, "messages", path, i, 'a messages row is {"messages": [{"role": ..., '
                                  '"content": ...}, ...]} with at least one assistant message')
            messages = check_messages(value, path, i, "messages")
            answers = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
            if not answers:
                raise DataFormatError(path, i, "messages", "has no assistant message: nothing to learn",
                                      "add the assistant's answer (a conversation without one is a prompt)")
            empty = [j for j in answers if not messages[j]["content"].strip()]
            if empty:
                if not hp.drop_empty:
                    raise EmptyFieldError(path, i, f"messages[{empty[0]}].content", "is an empty answer",
                                          "remove the row, or set drop_empty: true to drop such rows with a count")
                dropped.add("dropped: an empty assistant message")
                continue
            pieces = render_pieces(tok, messages, path, i)
            last = max(k for k, piece in enumerate(pieces) if piece.assistant)
            counter.add("had messages after the last assistant message (no loss on them: left out)",
                        int(answers[-1] < len(messages) - 1))
            ids, mask = tokenize_pieces(tok, pieces[:last + 1])
            first = mask.index(1)
            p_ids, r_ids, p_cut, r_cut = truncate_pair(ids[:first], ids[first:], self.max_length,
                                                       self.max_prompt_length)
            counter.add("had the prompt truncated from the left", int(p_cut))
            counter.add("had the conversation truncated from the right (its last EOS not learned)", int(r_cut))
            out.append(TokenizedExample(prompt_ids=p_ids, response_ids=r_ids, loss_mask=mask[first:][:len(r_ids)]))
        dropped.report(len(records))
        counter.report(len(out))
        self.counts.update({f"{path}: {reason}": n for c in (dropped, counter) for reason, n in c.items()})
        if not out:
            raise DataFormatError(path, None, None, "has no usable rows after dropping empty ones")
        self._check_some_complete(path, counter, len(out),
                                  "had the conversation truncated from the right (its last EOS not learned)")
        return out

    def setup(self, stage: str) -> None:
        if self.train_set or self.val_set:
            return
        hp = self.hparams
        if self.sources is not None:  # a mixture: each source held out apart, its training rows weighted
            holdout = None if hp.val_data is not None else \
                (lambda rows, source: self.holdout(rows, hp.val_fraction, hp.seed, source.path))
            self.train_set, self.val_set, counts = mix_sources(self.sources, self._read, hp.seed, holdout)
            self.counts.update(counts)
            if hp.val_data is not None:
                self.val_set = self._read(hp.val_data)
        else:
            examples = self._read(hp.data)
            if hp.val_data is not None:
                self.train_set, self.val_set = examples, self._read(hp.val_data)
            else:
                self.train_set, self.val_set = self.holdout(examples, hp.val_fraction, hp.seed, hp.data)
        log.info("SFT data: %d train / %d validation examples", len(self.train_set), len(self.val_set))

    # --- loaders ----------------------------------------------------------------------------------------------
    def collate(self, examples: list[TokenizedExample]) -> CausalLMBatch:
        return pad_prompt_response(examples, self.tokenizer.pad_token_id)

    def example_length(self, example: TokenizedExample) -> int:
        return len(example["prompt_ids"]) + len(example["response_ids"])

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
