"""Every collate function and example type of the data modules: padding tokenized examples into batches with attention
and completion masks (masks come from lengths, not ids)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

import torch

from recipes.modules.types import PromptBatch


class TokenizedExample(TypedDict):
    """A tokenized SFT example. ``loss_mask`` (a chat conversation's, one entry per response token): 1 on the tokens
    the loss reads (the assistant's), 0 on the other turns in between; absent, the loss reads every response token."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: NotRequired[list[int]]


class CausalLMBatch(TypedDict):
    """A right-padded batch of prompt + response sequences.

    Shapes: all ``(B, T)``. ``completion_mask`` is 1 on response tokens (the targets of the loss), 0 on prompt and
    padding tokens (and on the response tokens an example's ``loss_mask`` marks 0).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor


def pad_prompt_response(examples: Sequence[TokenizedExample], pad_token_id: int,
                        pad_to_multiple_of: int = 1) -> CausalLMBatch:
    """Concatenate prompt and response per row and right-pad to the longest row (rounded up to a multiple); the
    completion mask covers each response, or where it has one, its ``loss_mask``."""
    lengths = [len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples]
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        p, n = len(e["prompt_ids"]), lengths[i]
        input_ids[i, :n] = torch.tensor(e["prompt_ids"] + e["response_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, p:n] = torch.tensor(e["loss_mask"], dtype=torch.long) if "loss_mask" in e else 1
    return CausalLMBatch(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)


def truncate_pair(prompt_ids: list[int], response_ids: list[int], max_length: int,
                  max_prompt_length: int) -> tuple[list[int], list[int], bool, bool]:
    """Fit prompt + response into ``max_length``: the prompt loses tokens from the left (down to
    ``max_prompt_length``), then the response from the right. Returns both and whether each was cut."""
    prompt_cut = response_cut = False
    if len(prompt_ids) + len(response_ids) > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids, prompt_cut = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if len(response_ids) > room:
        response_ids, response_cut = response_ids[:room], True
    return prompt_ids, response_ids, prompt_cut, response_cut


class PreferenceExample(TypedDict, total=False):
    """A tokenized pair. ``index`` is the position in its split (keys precomputed reference log-probs)."""

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float


def collate_preference(examples: Sequence[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected sequences into one batch, chosen rows first.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on response tokens): ``(2B, T)``;
    ``index``: ``(B,)``; ``margin``: ``(B,)`` when the examples carry one.
    """
    rows = [{"prompt_ids": e["prompt_ids"], "response_ids": e["chosen_ids"]} for e in examples]
    rows += [{"prompt_ids": e["prompt_ids"], "response_ids": e["rejected_ids"]} for e in examples]
    batch: dict[str, torch.Tensor] = dict(pad_prompt_response(rows, pad_token_id))
    batch["index"] = torch.tensor([e.get("index", -1) for e in examples], dtype=torch.long)
    if examples and "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def pad_prompts(rows: list[dict[str, Any]], pad_token_id: int) -> PromptBatch:
    """Left-pad tokenized prompts so every response starts at the same column. Shapes: ``(B, P)``."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, width - n:] = torch.tensor(r["input_ids"], dtype=torch.long)
        attention_mask[i, width - n:] = 1
    return PromptBatch(input_ids=input_ids, attention_mask=attention_mask, prompts=[r["prompt"] for r in rows],
                       metadata=[r["metadata"] for r in rows])


class RankingExample(TypedDict):
    prompt_ids: list[int]
    response_ids: list[list[int]]  # sorted by score, descending
    scores: list[float]


def collate_ranking(examples: Sequence[RankingExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every (prompt + response) to one width and every row to the batch's largest k.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask``: ``(B, k, T)``; ``scores``: ``(B, k)``;
    ``response_mask``: ``(B, k)``, 1 on real responses and 0 on padding slots (all-zero sequences, score 0).
    """
    k = max(len(e["response_ids"]) for e in examples)
    width = max(len(e["prompt_ids"]) + len(r) for e in examples for r in e["response_ids"])
    input_ids = torch.full((len(examples), k, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), k, width), dtype=torch.long)
    completion_mask = torch.zeros_like(attention_mask)
    scores = torch.zeros((len(examples), k), dtype=torch.float32)
    response_mask = torch.zeros((len(examples), k), dtype=torch.bool)
    for b, e in enumerate(examples):
        p = len(e["prompt_ids"])
        for j, (r_ids, score) in enumerate(zip(e["response_ids"], e["scores"])):
            n = p + len(r_ids)
            input_ids[b, j, :n] = torch.tensor(e["prompt_ids"] + r_ids, dtype=torch.long)
            attention_mask[b, j, :n] = 1
            completion_mask[b, j, p:n] = 1
            scores[b, j], response_mask[b, j] = score, True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "scores": scores, "response_mask": response_mask}


class UnpairedExample(TypedDict, total=False):
    """A tokenized unpaired completion (KTO). ``label`` is True for a desirable completion; ``index`` is the
    position in its split."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


def collate_unpaired(examples: Sequence[UnpairedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each row's prompt + completion, and the mismatched KL batch: row ``i``'s prompt with row
    ``(i + 1) % B``'s completion (the completions shifted by one within the batch; a one-row batch pairs the row with
    its own completion), from which KTO estimates its reference point ``z0``.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask``: ``(B, T)``; ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_completion_mask``: ``(B, T')``; ``label``: ``(B,)`` bool; ``index``: ``(B,)``.
    """
    rows = [{"prompt_ids": e["prompt_ids"], "response_ids": e["completion_ids"]} for e in examples]
    mismatched = [{"prompt_ids": e["prompt_ids"], "response_ids": examples[(i + 1) % len(examples)]["completion_ids"]}
                  for i, e in enumerate(examples)]
    batch: dict[str, torch.Tensor] = dict(pad_prompt_response(rows, pad_token_id))
    batch.update({f"kl_{key}": value for key, value in pad_prompt_response(mismatched, pad_token_id).items()})
    batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    batch["index"] = torch.tensor([e.get("index", -1) for e in examples], dtype=torch.long)
    return batch
