"""Shared policy helpers: memory-light token log-probs, completion-only forwards, masked sums, reference context.

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


def completion_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the completion tokens, with logits computed only from the first completion column.

    Token ``t`` is predicted by the logits at ``t - 1``. With ``c`` the first column where any row has a
    completion token, only the last ``T - c + 1`` positions go through the LM head (``logits_to_keep``), so prompt
    positions never build a full-vocabulary output.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not).
        input_ids, attention_mask, completion_mask: ``(B, T)``.

    Returns:
        ``(logprobs, mask)``, both ``(B, T - c)``: the log-prob of each token from column ``c`` on, and the
        completion mask over the same columns (zero on prompt and padding).
    """
    has_completion = completion_mask.any(0).nonzero()
    first = int(has_completion[0]) if len(has_completion) else input_ids.shape[1] - 1
    first = max(first, 1)
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep,
                   use_cache=False).logits[:, :-1]  # (B, T - c, V)
    targets = input_ids[:, first:]
    return logprobs_from_logits(logits, targets), completion_mask[:, first:]


def masked_completion_logps(model: nn.Module, batch: dict[str, Tensor], average: bool = False) -> Tensor | None:
    """Summed (or mean) completion log-probs of every row, ``(B,)``, computing logits only at the positions that
    predict a completion token: no prompt or padding position reaches the LM head (`completion_logprobs` keeps a
    rectangle from the first completion column on). For no-grad passes (DPO's precomputed reference).

    Returns None for a model that does not take a boolean ``logits_to_keep`` mask (transformers' ``(B, T)`` form);
    the caller falls back to `completion_logprobs`.
    """
    targets = batch["completion_mask"][:, 1:].bool()  # (B, T-1): tokens 1.. scored, as in completion_logprobs
    predictors = F.pad(targets, (0, 1))  # (B, T): position t - 1 predicts token t
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids_from_mask(batch["attention_mask"]), logits_to_keep=predictors,
                   use_cache=False).logits  # (N, V), N completion tokens of the batch
    n = int(targets.sum())
    if logits.dim() != 2 or logits.shape[0] != n:
        return None
    labels = batch["input_ids"][:, 1:][targets]  # (N,)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # as logprobs_from_logits
    token = torch.cat([(c := chunk.to(dtype)).gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(c, -1)
                       for chunk, y in zip(logits.split(4096), labels.split(4096))])  # one upcast chunk at a time
    rows = targets.nonzero()[:, 0]  # (N,) the row of each token, row-major like the mask selection
    total = torch.zeros(targets.shape[0], dtype=token.dtype, device=token.device).index_add_(0, rows, token)
    return total / targets.sum(-1).clamp(min=1) if average else total
