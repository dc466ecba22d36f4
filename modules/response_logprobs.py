"""Log-probs of sampled responses under the distribution that sampled them: temperature, top-k / top-p filtered and
renormalised (`filtered_logprobs`), with the LM head only at the positions that predict a response token; the
critic's values at the same positions. The rollout, the PPO/GRPO update and evaluation's KL all read these, so the
importance ratio and the KL are those of the sampler (`recipes.modules.generation.sample`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.modules.generation import filter_logits
from recipes.modules.policy import head_logits, logprobs_from_logits, position_ids_from_mask, scatter_rows
from recipes.modules.scalar_models import token_scores

_ROWS = 1024  # response tokens per upcast chunk after the head: bounds the float32 (rows, V) temporaries


def response_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Logits predicting each response token: ``(B, R, V)``; only the last ``R + 1`` positions reach the LM head."""
    keep = input_ids.shape[1] - prompt_length + 1
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep,
                 use_cache=False).logits[:, :-1]


def filters_active(vocab_size: int, top_k: int = 0, top_p: float = 1.0) -> bool:
    """Whether ``top_k`` / ``top_p`` remove any token of a ``vocab_size`` vocabulary (the test `filter_logits` and
    `draw_tokens` apply: ``0 < top_k < vocab_size`` or ``top_p < 1``)."""
    return 0 < top_k < vocab_size or top_p < 1.0


def sampling_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> Tensor:
    """The logits of the distribution `sample` draws from, re-derived from a model's own logits: scaled by
    ``1 / temperature`` (``0``, greedy, has no density: unscaled), then ``-inf`` outside `filter_logits`'s top-k /
    top-p set of the scaled logits, except at ``tokens``, which always stay inside.

    For the policy that sampled ``tokens`` the set already holds them, so this is exactly its filtered distribution
    (as ReaLHF recomputes it, `realhf/impl/model/interface/ppo_interface.py`, ``apply_logits_mask``). Keeping
    ``tokens`` inside covers what the policy's own set can miss: a boundary token whose full-forward logit rounds
    differently from the KV-cache one it was drawn with, a padding position, and, for another model (the reference,
    or the policy after updates), a token outside that model's set, whose log-prob would otherwise be ``-inf``
    (an infinite KL, a NaN in masked sums). The set is chosen without gradient; gradients flow to the kept logits.

    Args:
        logits: ``(..., T, V)`` next-token logits; upcast to float32 (float64 stays float64).
        tokens: ``(..., T)`` the token ids at the same positions.

    Returns:
        ``(..., T, V)`` the scaled logits with ``-inf`` outside the set.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(dtype)
    if temperature not in (0.0, 1.0):
        scaled = scaled / temperature
    if not filters_active(logits.shape[-1], top_k, top_p):
        return scaled
    with torch.no_grad():
        flat = scaled.detach().reshape(-1, scaled.shape[-1])  # filter_logits reads rows: (N, V)
        keep = torch.isfinite(filter_logits(flat, top_k, top_p)).reshape(scaled.shape)
        keep.scatter_(-1, tokens.unsqueeze(-1), True)
    return scaled.masked_fill(~keep, float("-inf"))


def filtered_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> Tensor:
    """Log-probs of ``tokens`` under the sampling distribution, ``log softmax(sampling_logits(logits))[token]``: the
    temperature-scaled, top-k / top-p filtered and renormalised softmax of each model's own logits.

    One rule for every model and every pass, so PPO's importance ratio and KL are those of the distribution that
    produced the tokens (the behaviour policy's log-probs, the reference's and the updated policy's all go through
    here with the same settings). Before the first update the policy's logits and therefore its set are the rollout's,
    so the ratio is exactly 1. Each model's own set (not the behaviour policy's, which ReaLHF stores per token: a
    ``(tokens, V)`` mask, 0.5 GB for 64 x 256 Llama-2 tokens) needs no storage, and it is the distribution that the
    updated policy would sample from with the same settings; the reference's is the distribution the reference would
    sample from with them, so the KL penalty compares the two samplers.

    With no filter and temperature 1 (or 0) this is `recipes.modules.policy.logprobs_from_logits`, unchanged to the
    bit. Computed one row at a time to bound memory, as that function is.

    Args:
        logits: ``(B, T, V)``.
        tokens: ``(B, T)`` token ids.
        temperature, top_k, top_p: the sampling settings (``top_k=0`` and ``top_p=1`` disable each filter).

    Returns:
        ``(B, T)`` float32 log-probs (float64 if the logits are float64), finite wherever the logits are.
    """
    if temperature in (0.0, 1.0) and not filters_active(logits.shape[-1], top_k, top_p):
        return logprobs_from_logits(logits, tokens)
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        kept = sampling_logits(row_logits, row_tokens, temperature, top_k, top_p)  # (T, V)
        rows.append(kept.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(kept, dim=-1))
    return torch.stack(rows)


def filtered_entropy(kept: Tensor) -> Tensor:
    """Entropy ``-sum p log p`` of ``softmax(kept)`` over the last dimension, ``0 log 0 = 0`` at the ``-inf`` logits
    outside the set. Shape: ``(..., V) -> (...)``, float32."""
    return -(kept.softmax(-1) * kept.log_softmax(-1)).nan_to_num(nan=0.0).sum(-1).float()


def response_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int,
                      with_entropy: bool = False, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens ``(B, R)`` under the sampling distribution of ``temperature``, ``top_k`` and
    ``top_p`` (`filtered_logprobs`; the defaults: the model's plain softmax) and, if asked, that distribution's
    entropy at each of them ``(B, R)`` (computed without grad). The LM head runs only at the positions that predict a
    response token (`recipes.modules.policy.head_logits`), a chunk of rows at a time after it; both outputs are 0 on
    the response padding (``attention_mask[:, P:]`` is 0 there)."""
    P = prompt_length
    scored = attention_mask[:, P:].bool()  # (B, R) the response tokens
    logits = head_logits(model, input_ids, attention_mask, F.pad(scored, (P - 1, 1)))  # (N, V): t - 1 predicts t
    tokens = input_ids[:, P:][scored]  # (N,)
    chunks = list(zip(logits.split(_ROWS), tokens.split(_ROWS)))
    logprobs = torch.cat([filtered_logprobs(c[None], t[None], temperature, top_k, top_p)[0] for c, t in chunks]
                         or [logits.new_zeros(0, dtype=torch.float32)])
    entropy = None
    if with_entropy:
        with torch.no_grad():
            plain = temperature in (0.0, 1.0) and not filters_active(logits.shape[-1], top_k, top_p)
            entropy = torch.cat([torch.distributions.Categorical(logits=c.float()).entropy() if plain else
                                 filtered_entropy(sampling_logits(c, t, temperature, top_k, top_p)) for c, t in chunks]
                                or [logits.new_zeros(0, dtype=torch.float32)])
            entropy = scatter_rows(entropy, scored)
    return scatter_rows(logprobs, scored), entropy


def response_values(critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Critic values of the states before each response token (the positions that predict them). Shape: ``(B, R)``."""
    return token_scores(critic, input_ids, attention_mask, slice(prompt_length - 1, -1))
