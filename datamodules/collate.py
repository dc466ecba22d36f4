"""Padding tokenized examples into batches with attention and completion masks (masks come from lengths, not ids)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch


class TokenizedExample(TypedDict):
    prompt_ids: list[int]
    response_ids: list[int]


class CausalLMBatch(TypedDict):
    """A right-padded batch of prompt + response sequences.

    Shapes: all ``(B, T)``. ``completion_mask`` is 1 on response tokens (the targets of the loss), 0 on prompt and
    padding tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor


def pad_prompt_response(examples: Sequence[TokenizedExample], pad_token_id: int,
                        pad_to_multiple_of: int = 1) -> CausalLMBatch:
    """Concatenate prompt and response per row and right-pad to the longest row (rounded up to a multiple)."""
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
        completion_mask[i, p:n] = 1
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
