"""RankingDataModule: k >= 2 scored responses per prompt (RRHF, PRO), batched as ``(B, k, T)``.

Sources: generic ``{prompt, responses, scores}`` rows, raw HH-RLHF pairs and ``{prompt, chosen, rejected}`` rows (as
k = 2 with scores 1 and 0), and ``builtin:ranking``, a small learnable set written on demand; one source or a
weighted mixture. Responses are sorted by
score (descending, ties in file order); drops, ties and truncations are counted and logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader

from recipes.datamodules.builtin import BUILTIN_PREFIX, resolve_builtin
from recipes.datamodules.collate import RankingExample, collate_ranking, truncate_pair
from recipes.datamodules.formats import PromptFormat, format_prompt
from recipes.datamodules.io import DataFormatError, DropCounter, first_rows, load_records, require_text, require_value
from recipes.datamodules.mixture import DataSource, as_plain, check_sources, mix_sources, resolve
from recipes.datamodules.preference_sources import generic_pair, hh_pair, parse_rows
from recipes.datamodules.resumable import SplitLoadersMixin
from recipes.modules.cache import cache_dir
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.validation import check_loader_args, check_val_fraction

log = logging.getLogger(__name__)

RankingFormat = Literal["ranking", "hh", "pairs"]
BUILTIN_RANKING = "builtin:ranking"


class RankingText(NamedTuple):
    prompt: str
    responses: list[str]
    scores: list[float]


def builtin_ranking_rows(n: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows of k = 3: "Write <word> in capital|small letters." answered in the asked case, in a mix of cases,
    and in the other case; the score is the fraction of letters in the asked case (1, between, 0), so the order
    depends on the prompt and is learnable letter by letter."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        upper = rng.random() < 0.5
        flipped = set(rng.sample(range(len(word)), rng.randint(1, len(word) - 1)))
        asked = word.upper() if upper else word
        mixed = "".join(c.swapcase() if i in flipped else c for i, c in enumerate(asked))
        responses = [asked, mixed, asked.swapcase()]
        scores = [1.0, round(1 - len(flipped) / len(word), 4), 0.0]
        order = rng.sample(range(3), 3)  # stored unsorted: the data module sorts
        rows.append({"prompt": f"Write {word} in {'capital' if upper else 'small'} letters.\n",
                     "responses": [responses[i] for i in order], "scores": [scores[i] for i in order]})
    return rows


def _resolve(source: str) -> str:
    if source != BUILTIN_RANKING:
        return resolve_builtin(source) if source.startswith(BUILTIN_PREFIX) else source
    path = cache_dir() / "ranking.jsonl"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in builtin_ranking_rows()), encoding="utf-8")
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    return str(path)


def ranking_row(record: Mapping[str, Any], source: str, row: int, prompt_format: PromptFormat = "plain",
                tokenizer=None) -> RankingText:
    """Generic ``{prompt, responses: [str], scores: [float]}`` row -> texts, or a `DataFormatError` naming the field."""
    prompt = require_text(record, "prompt", source, row)
    needs = "ranking rows need prompt, responses (a list of texts) and scores (a list of numbers, one per response)"
    for field in ("responses", "scores"):
        value = require_value(record, field, source, row, needs)
        if not isinstance(value, list):
            raise DataFormatError(source, row, field, f"expected a list, got {type(value).__name__}", needs)
    responses, scores = record["responses"], record["scores"]
    if len(responses) != len(scores):
        raise DataFormatError(source, row, "scores", f"has {len(scores)} entries for {len(responses)} responses",
                              "give exactly one score per response")
    for i, (text, score) in enumerate(zip(responses, scores)):
        if not isinstance(text, str):
            raise DataFormatError(source, row, f"responses[{i}]", f"expected text, got {type(text).__name__}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
            raise DataFormatError(source, row, f"scores[{i}]", f"expected a number, got {score!r}")
    return RankingText(format_prompt(prompt, prompt_format, tokenizer), list(responses), [float(s) for s in scores])


def to_ranking(record: Mapping[str, Any], source_format: RankingFormat, prompt_format: PromptFormat, source: str,
               row: int, tokenizer=None) -> RankingText:
    """Dispatch one raw record; pairs become k = 2 with the chosen response scored 1 and the rejected one 0."""
    if source_format == "ranking":
        return ranking_row(record, source, row, prompt_format, tokenizer)
    if source_format in ("hh", "pairs"):
        pair = hh_pair(record, source, row) if source_format == "hh" else \
            generic_pair(record, source, row, prompt_format, tokenizer)
        return RankingText(pair.prompt, [pair.chosen, pair.rejected], [1.0, 0.0])
    raise ValueError(f"Unknown ranking source_format {source_format!r}; choose ranking, hh or pairs.")


def sort_and_dedupe(text: RankingText, counter: DropCounter) -> RankingText | None:
    """Sort by score (descending, stable), keep the best-scored copy of repeated responses; None (counted) when
    fewer than 2 distinct responses or fewer than 2 distinct scores remain."""
    order = sorted(range(len(text.scores)), key=lambda i: -text.scores[i])  # sorted() is stable
    seen, responses, scores = set(), [], []
    for i in order:
        if text.responses[i] in seen:
            counter.add("had a repeated response (the lower-scored copy was removed)")
            continue
        seen.add(text.responses[i])
        responses.append(text.responses[i])
        scores.append(text.scores[i])
    if len(responses) < 2 or len(set(scores)) < 2:
        counter.add("dropped: fewer than 2 distinct responses with different scores")
        return None
    counter.add("had tied scores (kept in file order)", int(len(set(scores)) < len(scores)))
    return RankingText(text.prompt, responses, scores)


class RankingDataModule(SplitLoadersMixin, L.LightningDataModule):
    """Ranked responses per prompt for RRHF and PRO.

    Args:
        tokenizer: tokenizer id or path (`recipes.modules.tokenizer.load_tokenizer`); linked into the model by the CLI.
        data: local JSON/JSONL(.gz)/Parquet file, hub id, or ``builtin:ranking``; or a mixture: a list of weighted
            sources (`recipes.datamodules.mixture.DataSource`), each held out apart.
        source_format: ``ranking`` (``prompt``, ``responses``, ``scores``), ``hh`` (raw HH-RLHF ``chosen``/``rejected``
            dialogues, split at the last ``\\n\\nAssistant:``) or ``pairs`` (``prompt``, ``chosen``, ``rejected``).
        prompt_format: how ``ranking``/``pairs`` prompts are rendered; HH rows keep their dialogue format.
        split, val_split: dataset splits read from ``data`` and ``val_data``.
        val_data: a separate validation source; without it ``val_fraction`` of the rows are held out (seeded).
        max_length: tokens per sequence (prompt + one response + EOS).
        max_prompt_length: a too-long row keeps at most this many prompt tokens, cut from the left (default: half).
        batch_size: prompts per micro-batch (the forward sees up to ``k * batch_size`` sequences).
        max_rows: read only the first ``max_rows`` rows (logged).
        drop_empty: drop rows with an empty text field, counted; by default an error naming the row.
        drop_prompt_mismatch: drop HH pairs whose two dialogues differ before the last assistant turn, counted.
        group_by_length: batch prompts of similar length (prompt + longest response) together to pad less
            (`recipes.datamodules.sampler.ResumableSampler`); off by default, as it changes the order.
    """

    def __init__(self, tokenizer: str = "builtin:byte", data: str | list[DataSource] = BUILTIN_RANKING,
                 source_format: RankingFormat = "ranking", prompt_format: PromptFormat = "plain",
                 split: str = "train", val_data: str | None = None, val_split: str = "train",
                 val_fraction: float = 0.05, max_length: int = 512, max_prompt_length: int | None = None,
                 batch_size: int = 8, num_workers: int = 0, max_rows: int | None = None, drop_empty: bool = False,
                 drop_prompt_mismatch: bool = False, seed: int = 0, group_by_length: bool = False) -> None:
        super().__init__()
        self.sources = check_sources("RankingDataModule", data, get_args(RankingFormat))
        data = as_plain(data, self.sources)  # saved below: plain dicts in the checkpoint
        self.save_hyperparameters()
        self.max_length, self.batch_size, self.num_workers, self.seed = max_length, batch_size, num_workers, seed
        self.group_by_length = group_by_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        if not 0 < self.max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be in (0, max_length={max_length}).")
        check_loader_args("RankingDataModule", "batch_size", batch_size, num_workers, max_rows)
        check_val_fraction("RankingDataModule", val_fraction)
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_set: list[RankingExample] = []
        self.val_set: list[RankingExample] = []
        self.counts: dict[str, int] = {}

    def read(self, source: str | DataSource, split: str = "train") -> list[RankingText]:
        """Parse, sort and dedupe every record of ``source`` (a path with the module's settings, or a mixture's
        source with its own); drops and ties are counted and logged."""
        hp = self.hparams
        source = resolve(source, hp.source_format, split, hp.max_rows)
        path = _resolve(source.path)
        records = load_records(path, split=source.split)
        records = first_rows(records, source.max_rows, path)
        counter, out = DropCounter(path), []

        def parse(record: dict[str, Any], row: int) -> RankingText:
            return to_ranking(record, source.source_format, hp.prompt_format, path, row, self.tokenizer)

        for _, text in parse_rows(records, parse, counter, hp.drop_empty, hp.drop_prompt_mismatch):
            if (text := sort_and_dedupe(text, counter)) is not None:
                out.append(text)
        counter.report(len(records))
        self.counts.update(counter.items())
        if not out:
            raise DataFormatError(path, None, None, "has no usable rows (see the counts logged)",
                                  "each row needs at least 2 different responses with different scores")
        return out

    def tokenize(self, texts: Sequence[RankingText], source: str) -> list[RankingExample]:
        """Tokenize; the prompt is cut from the left to fit the longest response, responses from the right."""
        tok, counter, out = self.tokenizer, DropCounter(source), []
        prompts = tok([t.prompt for t in texts], add_special_tokens=True)["input_ids"]
        for p_ids, text in zip(prompts, texts):
            r_ids = [ids + [tok.eos_token_id] for ids in tok(text.responses, add_special_tokens=False)["input_ids"]]
            p_ids, _, p_cut, _ = truncate_pair(p_ids, max(r_ids, key=len), self.max_length, self.max_prompt_length)
            room = self.max_length - len(p_ids)
            counter.add("had the prompt truncated from the left", int(p_cut))
            counter.add("had a response truncated from the right (no EOS learned)",
                        int(any(len(r) > room for r in r_ids)))
            kept, scores = [], []
            for r, score in zip(r_ids, text.scores):  # already sorted: the best-scored copy is kept
                if r[:room] not in kept:
                    kept.append(r[:room])
                    scores.append(score)
            counter.add("lost a response identical to another after truncation", int(len(kept) < len(r_ids)))
            if len(kept) < 2 or len(set(scores)) < 2:
                counter.add("dropped: fewer than 2 distinct responses with different scores after truncation")
                continue
            out.append(RankingExample(prompt_ids=p_ids, response_ids=kept, scores=scores))
        counter.report(len(texts))
        self.counts.update(counter.items())
        if not out:
            raise DataFormatError(source, None, None, f"has no row left after fitting {len(texts)} rows into "
                                  f"max_length={self.max_length} tokens: {dict(counter.items())}",
                                  "raise data.max_length so that the responses still differ")
        return out

    def setup(self, stage: str) -> None:
        if self.train_set or self.val_set:
            return
        hp = self.hparams
        if self.sources is not None:  # a mixture: each source held out apart, its training rows weighted
            holdout = None if hp.val_data is not None else \
                (lambda rows, source: self.holdout(rows, hp.val_fraction, hp.seed, source.path))
            self.train_set, self.val_set, counts = mix_sources(
                self.sources, lambda s: self.tokenize(self.read(s, hp.split), _resolve(s.path)), hp.seed, holdout)
            self.counts.update(counts)
            if hp.val_data is not None:
                self.val_set = self.tokenize(self.read(hp.val_data, hp.val_split), _resolve(hp.val_data))
            log.info("Ranking data: %d train / %d validation prompts", len(self.train_set), len(self.val_set))
            return
        examples = self.tokenize(self.read(hp.data, hp.split), _resolve(hp.data))
        if hp.val_data is not None:
            self.train_set = examples
            self.val_set = self.tokenize(self.read(hp.val_data, hp.val_split), _resolve(hp.val_data))
        else:
            self.train_set, self.val_set = self.holdout(examples, hp.val_fraction, hp.seed, hp.data)
        log.info("Ranking data: %d train / %d validation prompts", len(self.train_set), len(self.val_set))

    def collate(self, examples: Sequence[RankingExample]) -> dict[str, torch.Tensor]:
        return collate_ranking(examples, self.tokenizer.pad_token_id)

    def example_length(self, example: RankingExample) -> int:
        return len(example["prompt_ids"]) + max(len(r) for r in example["response_ids"])

    def batch_cells(self, examples: Sequence[RankingExample]) -> tuple[int, int]:
        """``(B, k, T)`` cells: k the batch's most responses, T its longest sequence."""
        tokens = sum(len(e["prompt_ids"]) + len(r) for e in examples for r in e["response_ids"])
        k = max(len(e["response_ids"]) for e in examples)
        return tokens, len(examples) * k * max(self.example_length(e) for e in examples)

    def test_dataloader(self) -> DataLoader:
        """The held-out split (set ``val_data`` to a separate test file to evaluate on it)."""
        return self.val_dataloader()
