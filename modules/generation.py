"""Rollout helpers: sampling with a KV cache (temperature, top-k, top-p, stop tokens) and the no-grad forwards that
read response log-probs, entropies and critic values off a prompt + response batch. No training code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modules.policy import logprobs_from_logits, position_ids_from_mask
from modules.scalar_models import token_scores
from modules.types import Generation


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to ``-inf`` every logit outside the ``top_k`` largest and outside the smallest set whose probability
    reaches ``top_p`` (nucleus; the most likely token always stays). ``top_k=0`` / ``top_p=1`` disable each.
    Shape: ``(B, V)``."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
           eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> Generation:
    """Sample up to ``max_new_tokens`` tokens after left-padded prompts, reusing the KV cache.

    Positions come from the attention mask, so a left-padded row generates what the unpadded row would. Sampling
    draws from ``generator`` (checkpointable, for exact resume). ``temperature=0`` is greedy. The model runs in eval
    mode (no dropout) and is put back in its previous mode afterwards. Generation stops when every row has emitted
    a stop token; tokens after a row's stop token are ``pad_token_id`` with mask 0.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not).
        input_ids, attention_mask: ``(B, P)`` left-padded prompts.
        eos_token_id: the stop token id(s); the stop token is kept in the response and its mask.

    Returns:
        A `modules.types.Generation`.
    """
    was_training = model.training
    model.eval()
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                         device=input_ids.device)
    batch = input_ids.shape[0]
    mask = attention_mask.long()
    positions = position_ids_from_mask(mask)
    next_positions = positions[:, -1:] + 1  # (B, 1)
    tokens, done = [], torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    try:
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # (B, V)
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            tokens.append(token)
            lengths += (~done).long()
            done = done | torch.isin(token, stops)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_positions,
                        past_key_values=out.past_key_values, use_cache=True)
            next_positions = next_positions + 1
    finally:
        model.train(was_training)
    response_ids = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = (torch.arange(response_ids.shape[1], device=input_ids.device)[None] < lengths[:, None]).long()
    return Generation(response_ids, response_mask, done)


def response_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Logits predicting each response token: ``(B, R, V)``; only the last ``R + 1`` positions reach the LM head."""
    keep = input_ids.shape[1] - prompt_length + 1
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep,
                 use_cache=False).logits[:, :-1]


def response_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens ``(B, R)`` and, if asked, the policy's entropy at each of them ``(B, R)``
    (computed without grad, one row at a time to bound memory)."""
    logits = response_logits(model, input_ids, attention_mask, prompt_length)
    logprobs = logprobs_from_logits(logits, input_ids[:, prompt_length:])
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.stack([torch.distributions.Categorical(logits=row.float()).entropy() for row in logits])
    return logprobs, entropy


def response_values(critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Critic values of the states before each response token (the positions that predict them). Shape: ``(B, R)``."""
    return token_scores(critic, input_ids, attention_mask)[:, prompt_length - 1:-1]
