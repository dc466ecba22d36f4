"""Shared policy helpers: the LM head applied only where the loss reads it, memory-light token log-probs, masked sums.

Written once; SFT, DPO, the reward model and PPO all call these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under ``logits`` without materializing a full-vocabulary log-softmax.

    ``log p(y) = logit_y - logsumexp(logits)``, computed row by row so the peak extra memory is one row's
    ``(T, V)`` temporary rather than the batch's. Low-precision logits are upcast per row to float32.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` token ids.

    Returns:
        ``(B, T)`` float32 log-probs (float64 if the logits are float64).
    """
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row_logits = row_logits.to(out_dtype)
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def masked_sum(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    return (values * mask).sum(dim)


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean) of token log-probs over a completion mask. Shape: ``(B, T) -> (B,)``."""
    total = masked_sum(token_logprobs, mask.to(token_logprobs.dtype))
    return total / mask.sum(-1).clamp(min=1) if average else total


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that ignore left padding, so a padded row gets the same outputs as the unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def head_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, predictors: Tensor) -> Tensor:
    """Next-token logits at the ``True`` positions of ``predictors`` only, ``(N, V)`` in row-major order: the body
    runs on the whole batch, the hidden states are gathered at those positions, and only they reach the LM head
    (transformers' boolean ``logits_to_keep``). Padding-invariant: positions come from the attention mask.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not; under FSDP2 / ZeRO-3 the head runs as its own module,
            so sharding is unchanged).
        input_ids, attention_mask: ``(B, T)``.
        predictors: ``(B, T)`` bool, the positions whose next-token distribution is read.

    Returns:
        ``(N, V)`` logits, ``N = predictors.sum()``.
    """
    predictors = predictors.bool()
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=predictors,
                   use_cache=False).logits
    if logits.dim() == 3 and logits.shape[:2] == predictors.shape:  # a model that keeps every position
        return logits[predictors]
    if logits.dim() != 2 or logits.shape[0] != int(predictors.sum()):
        raise TypeError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a boolean "
                        f"logits_to_keep of shape {tuple(predictors.shape)}: a causal LM must return the (N, V) "
                        "logits of the True positions (transformers >= 5) or the (B, T, V) logits of every position")
    return logits


def token_logprobs(logits: Tensor, tokens: Tensor, chunk: int = 4096) -> Tensor:
    """``log softmax(logits)[token]`` of each row, ``(N, V), (N,) -> (N,)``, upcast to float32 (float64 stays)
    ``chunk`` rows at a time, so the peak extra memory is one chunk's ``(chunk, V)`` temporary."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.cat([(c := rows.to(dtype)).gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(c, -1)
                      for rows, y in zip(logits.split(chunk), tokens.split(chunk))]) if len(tokens) else \
        logits.new_zeros(0, dtype=dtype)


def scatter_rows(values: Tensor, mask: Tensor) -> Tensor:
    """The ``(N,)`` values of the ``True`` positions of ``mask`` placed back into a zero ``(B, T)`` tensor
    (row-major, as boolean indexing reads them); differentiable in ``values``."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def completion_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the completion tokens, with the LM head applied only where a completion token is
    predicted (`head_logits`): no prompt or padding position builds a full-vocabulary output.

    Token ``t`` is predicted by the position ``t - 1``. With ``c`` the first column where any row has a completion
    token, the result covers columns ``c ..``: the log-prob of each completion token, zero elsewhere.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not).
        input_ids, attention_mask, completion_mask: ``(B, T)``.

    Returns:
        ``(logprobs, mask)``, both ``(B, T - c)``: the log-prob of each completion token from column ``c`` on (0 on
        prompt and padding), and the completion mask over the same columns.
    """
    has_completion = completion_mask.any(0).nonzero()
    first = int(has_completion[0]) if len(has_completion) else input_ids.shape[1] - 1
    first = max(first, 1)
    targets = completion_mask[:, first:].bool()  # (B, T - c): the tokens scored
    predictors = F.pad(targets, (first - 1, 1))  # (B, T): position t - 1 predicts token t
    logits = head_logits(model, input_ids, attention_mask, predictors)  # (N, V)
    logprobs = token_logprobs(logits, input_ids[:, first:][targets])  # (N,)
    return scatter_rows(logprobs, targets), completion_mask[:, first:]


def masked_completion_logps(model: nn.Module, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """Summed (or mean) completion log-probs of every row of a collated batch, ``(B,)`` (`completion_logprobs`)."""
    logprobs, mask = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return sequence_logprobs(logprobs, mask, average=average)
