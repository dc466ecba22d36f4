"""PromptDataModule: prompts for RL rollouts (HH-RLHF, PKU-SafeRLHF, Alpaca instructions, plain prompt files, chat
conversations), from one source or a weighted mixture, tokenized once and served left-padded, ``rollout_batch_size``
per batch, with an exactly resumable order.
"""

from __future__ import annotations

import logging
import random
from functools import partial
from typing import Any, Literal, get_args

import lightning as L
from torch.utils.data import DataLoader

from recipes.datamodules.builtin import resolve_builtin
from recipes.datamodules.chat import chat_prompt, check_messages, set_chat_template, split_last_turn
from recipes.datamodules.code import code_prompt_records
from recipes.datamodules.collate import pad_prompts
from recipes.datamodules.formats import HUMAN, PromptFormat, alpaca_prompt, format_prompt, split_hh_dialogue
from recipes.datamodules.io import (
    DataFormatError,
    DropCounter,
    EmptyFieldError,
    first_rows,
    load_records,
    optional_text,
    read_text_lines,
    require_text,
    require_value,
)
from recipes.datamodules.mixture import DataSource, as_plain, check_sources, mix_sources, resolve
from recipes.datamodules.resumable import ResumableLoaderMixin
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.validation import at_least, check_loader_args

log = logging.getLogger(__name__)

PromptSource = Literal["hh", "saferlhf", "alpaca", "plain", "code", "messages"]
BUILTIN_PROMPTS = "builtin:prompts"


def builtin_prompt_rows(n: int = 512, seed: int = 0) -> list[dict[str, str]]:
    """``n`` short prompts (``Say something about <word>:``) for the tiny CPU configs; rewards ignore their content."""
    rng = random.Random(seed)
    return [{"prompt": "Say something about " + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5)))
             + ":"} for _ in range(n)]


def read_prompt_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Records of a JSON/JSONL/Parquet file or hub id, or of a ``.txt`` file with one prompt per non-empty line."""
    if path == BUILTIN_PROMPTS:
        return builtin_prompt_rows()
    if path.endswith(".txt"):  # read as UTF-8; a byte that is not is an error naming its line
        return [{"prompt": line} for _, line in read_text_lines(path)]
    return load_records(resolve_builtin(path), split=split)


def to_prompt(record: dict[str, Any], source_format: PromptSource, prompt_format: PromptFormat, source: str,
              row: int, tokenizer=None) -> tuple[str, dict[str, Any]]:
    """One raw record -> (prompt text, metadata for the reward), or a `DataFormatError` naming the row and field."""
    if source_format == "hh":
        dialogue = require_text(record, "chosen", source, row)
        parts = split_hh_dialogue(dialogue)
        if parts is None or not dialogue.lstrip("\n").startswith(HUMAN.strip()):
            raise DataFormatError(source, row, "chosen", "is not an HH dialogue ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
        return parts[0], {}  # the dialogue history up to the last assistant turn; the responses are not used
    if source_format == "alpaca":
        instruction = require_text(record, "instruction", source, row)
        extra = optional_text(record, "input", source, row)
        if prompt_format == "alpaca":
            return alpaca_prompt(instruction, extra), {}
        return format_prompt(f"{instruction}\n\n{extra}" if extra.strip() else instruction, prompt_format,
                             tokenizer), {}
    if source_format == "code":  # a code problem (recipes.datamodules.code): its unit tests go to the reward
        return format_prompt(require_text(record, "prompt", source, row), prompt_format, tokenizer), dict(record)
    if source_format == "messages":  # the other fields go to the reward, as for plain rows
        return messages_prompt(record, source, row, tokenizer), {k: v for k, v in record.items() if k != "messages"}
    if source_format in ("saferlhf", "plain"):
        text = require_text(record, "prompt", source, row)
        meta = {k: v for k, v in record.items() if k != "prompt"}
        return format_prompt(text, prompt_format, tokenizer), meta
    raise ValueError(f"Unknown source_format {source_format!r}; choose one of hh, saferlhf, alpaca, plain, code, "
                     "messages.")


def messages_prompt(record: dict[str, Any], source: str, row: int, tokenizer=None) -> str:
    """A ``{"messages": [...]}`` row's prompt through the chat template: a conversation ending with a user (or
    system) turn is rendered with the generation prompt (`recipes.datamodules.chat.chat_prompt`); one ending with
    an answer gives the prompt of that answer, as the preference data reads it (`recipes.datamodules.chat.
    split_last_turn`; the answer is not used), so an SFT conversation file serves as prompts too."""
    if tokenizer is None:
        raise ValueError("source_format 'messages' needs the tokenizer (its chat template renders the rows).")
    value = require_value(record, "messages", source, row, 'a messages row is {"messages": [{"role": "user", '
                          '"content": ...}, ...]}')
    messages = check_messages(value, source, row, "messages")
    if messages[-1]["role"] == "assistant":
        return split_last_turn(tokenizer, messages, source, row, "messages")[0]
    return chat_prompt(tokenizer, messages, source, row)


class PromptDataModule(ResumableLoaderMixin, L.LightningDataModule):
    """Prompts for PPO rollouts: one batch is one rollout of ``rollout_batch_size`` left-padded prompts.

    Prompts longer than ``max_prompt_length`` tokens are dropped (``long_prompts: drop``) or cut from the left
    (``truncate``), and either is counted and logged; a file with no usable prompt is an error with the counts.

    Args:
        tokenizer: tokenizer id or path (see `recipes.modules.tokenizer.load_tokenizer`); linked into the model.
        data: local file (JSON/JSONL/Parquet, or ``.txt`` with one prompt per line), hub id, ``builtin:prompts``, or
            ``builtin:code_synthesis`` (with ``source_format: code``); or a mixture: a list of weighted sources
            (`recipes.datamodules.mixture.DataSource`, each with its own format, split, max_rows), counted per
            source in ``counts``.
        source_format: ``hh`` (the dialogue of an HH-RLHF ``chosen`` field up to its last assistant turn),
            ``saferlhf`` (PKU-SafeRLHF ``prompt``), ``alpaca`` (``instruction``/``input``) or ``plain`` (``prompt``;
            the row's other fields go to the reward as metadata) or ``code`` (a HumanEval / APPS / CodeContests
            file or ``builtin:code_synthesis``, read by `recipes.datamodules.code.load_problems`; the problem with its
            unit tests goes to the reward as metadata, for `recipes.modules.code.reward.UnitTestReward`) or
            ``messages`` (``{"messages": [...]}`` chat conversations, rendered with the chat template and its
            generation prompt; `messages_prompt`).
        prompt_format: how a single-turn request is rendered (``hh``, ``alpaca``, ``chat``, ``plain``).
        max_length: prompt + response token budget (linked into the model).
        max_prompt_length: prompt token budget (default: ``max_length`` // 2).
        long_prompts: ``drop`` or ``truncate`` (from the left) prompts over the budget.
        rollout_batch_size: prompts per PPO iteration, per process.
        max_rows: use only the first ``max_rows`` rows.
        val_data: held-out prompts for the on-policy modules' ``validation_step`` (sampled, scored, KL to the
            reference; every ``trainer.val_check_interval`` iterations), read like ``data``; None: no validation.
        val_split: the split of ``val_data`` (None: ``split``).
        val_rows: use only the first ``val_rows`` held-out prompts.
        chat_template: a Jinja chat template (a file's path or its text) for the tokenizer; None: its own.
        group_by_length: put prompts of similar length in the same rollout, so the left-padded generation pads less
            (`recipes.datamodules.sampler.ResumableSampler`); off by default, as it changes the order.
    """

    def __init__(
        self,
        tokenizer: str = "builtin:byte",
        data: str | list[DataSource] = BUILTIN_PROMPTS,
        source_format: PromptSource = "plain",
        prompt_format: PromptFormat = "plain",
        split: str = "train",
        max_length: int = 512,
        max_prompt_length: int | None = None,
        long_prompts: Literal["drop", "truncate"] = "drop",
        rollout_batch_size: int = 64,
        num_workers: int = 0,
        max_rows: int | None = None,
        drop_empty: bool = False,
        seed: int = 0,
        val_data: str | None = None,
        val_split: str | None = None,
        val_rows: int | None = None,
        chat_template: str | None = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.sources = check_sources("PromptDataModule", data, get_args(PromptSource))
        data = as_plain(data, self.sources)  # saved below: plain dicts in the checkpoint
        self.save_hyperparameters()
        self.max_length, self.group_by_length = max_length, group_by_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        check_loader_args("PromptDataModule", "rollout_batch_size", rollout_batch_size, num_workers, max_rows)
        at_least("PromptDataModule", "max_prompt_length", self.max_prompt_length, 1, "Raise max_prompt_length (or "
                 "max_length, whose half is the default)")
        self.tokenizer = load_tokenizer(tokenizer)
        set_chat_template(self.tokenizer, chat_template)
        self.train_set: list[dict[str, Any]] = []
        self.val_set: list[dict[str, Any]] = []
        if val_data is not None:
            self.val_dataloader = self.held_out_loader
        self.counts: dict[str, int] = {}

    def _read(self, source: str | DataSource, split: str | None = None,
              max_rows: int | None = None) -> list[dict[str, Any]]:
        """The usable prompts of ``source`` (``split``, first ``max_rows``; defaults: the training settings; a
        mixture's source brings its own)."""
        hp, tok = self.hparams, self.tokenizer
        settings = resolve(source, hp.source_format, split if split is not None else hp.split,
                           max_rows if max_rows is not None else hp.max_rows)
        source, split, source_format = settings.path, settings.split, settings.source_format
        records = (code_prompt_records(source, split) if source_format == "code"
                   else read_prompt_rows(source, split))
        records = first_rows(records, settings.max_rows, source)
        if not records:
            raise DataFormatError(source, None, None, "has no prompts (0 rows)", "point `data` at a non-empty file")
        counter, rows = DropCounter(source), []
        for i, record in enumerate(records):
            try:
                prompt, meta = to_prompt(record, source_format, hp.prompt_format, source, i, tok)
            except EmptyFieldError as e:
                if not hp.drop_empty:
                    raise
                counter.add(f"dropped: empty '{e.field}'")
                continue
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
            if len(ids) > self.max_prompt_length:
                if hp.long_prompts == "drop":
                    counter.add(f"dropped: longer than max_prompt_length={self.max_prompt_length} tokens")
                    continue
                counter.add(f"truncated from the left to max_prompt_length={self.max_prompt_length} tokens")
                ids = ids[-self.max_prompt_length:]
            rows.append({"input_ids": ids, "prompt": prompt, "metadata": meta})
        counter.report(len(records))
        self.counts = {"rows": len(records), "kept": len(rows), **dict(counter.items())}
        if not rows:
            raise DataFormatError(source, None, None, f"has no usable prompt: {self.counts}",
                                  "raise data.max_prompt_length (or max_length), or set long_prompts: truncate")
        return rows

    def setup(self, stage: str) -> None:
        if not self.train_set:
            self.train_set = self._read(self.hparams.data) if self.sources is None else self._mixture()
            if len(self.train_set) < self.hparams.rollout_batch_size:
                name = self.hparams.data if self.sources is None else "the mixture of data"
                raise DataFormatError(name, None, None, f"has {len(self.train_set)} usable prompts, "
                                      f"fewer than one rollout (rollout_batch_size={self.hparams.rollout_batch_size})",
                                      "add prompts or lower data.rollout_batch_size")
            log.info("Prompt data: %d prompts (%s)", len(self.train_set), self.counts)
        if self.hparams.val_data is not None and not self.val_set:
            train_counts = self.counts
            self.val_set = self._read(self.hparams.val_data, self.hparams.val_split, self.hparams.val_rows)
            self.counts, self.val_counts = train_counts, self.counts
            log.info("Held-out prompts: %d (%s)", len(self.val_set), self.val_counts)

    def _mixture(self) -> list[dict[str, Any]]:
        """A mixture's weighted prompts; ``counts`` holds each source's counts under its path, and its rows read and
        used per epoch."""
        per_source: dict[str, int] = {}

        def read(source: DataSource) -> list[dict[str, Any]]:
            rows = self._read(source)
            per_source.update({f"{source.path}: {key}": n for key, n in self.counts.items()})
            return rows

        rows, _, counts = mix_sources(self.sources, read, self.hparams.seed)
        self.counts = {**per_source, **counts}
        return rows

    def train_dataloader(self) -> DataLoader:
        # drop_last: every rollout has exactly rollout_batch_size prompts, so minibatch sizes never change
        return self.resumable_loader(self.train_set, partial(pad_prompts, pad_token_id=self.tokenizer.pad_token_id),
                                     batch_size=self.hparams.rollout_batch_size, seed=self.hparams.seed,
                                     num_workers=self.hparams.num_workers, drop_last=True)

    def example_length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def held_out_loader(self) -> DataLoader:
        """The held-out prompts in order, ``rollout_batch_size`` at a time: the ``val_dataloader`` when ``val_data``
        is set (without it the module has none, so Lightning runs no validation loop)."""
        return DataLoader(self.val_set, batch_size=self.hparams.rollout_batch_size, shuffle=False,
                          collate_fn=partial(pad_prompts, pad_token_id=self.tokenizer.pad_token_id),
                          num_workers=self.hparams.num_workers)
