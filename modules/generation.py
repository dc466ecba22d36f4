"""Rollout helpers: sampling with a preallocated KV cache (temperature, top-k, top-p, stop tokens), the log-probs of
that sampling distribution, and the forwards that read response log-probs, entropies and critic values off a prompt +
response batch. No training code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from recipes.modules.policy import logprobs_from_logits, position_ids_from_mask
from recipes.modules.scalar_models import token_scores
from recipes.modules.types import Generation

# transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` to ``cache`` (the old name
# still works with a deprecation warning); use whichever the installed version names.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to ``-inf`` every logit outside the ``top_k`` largest and outside the smallest set whose probability
    reaches ``top_p`` (nucleus; the most likely token always stays). ``top_k=0`` / ``top_p=1`` disable each.
    Shape: ``(B, V)``. `sample` draws from this distribution without materializing it (see `draw_tokens`)."""
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


def draw_tokens(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One token per row from ``softmax(filter_logits(logits / temperature, top_k, top_p))``, by inverse CDF.

    One uniform per row is located in the float64 cumulative sum of the unnormalized probabilities, so a draw costs
    a cumsum and a binary search instead of ``torch.multinomial``'s one exponential variate per vocabulary entry
    (about a tenth of the PPO benchmark's generation time, profiled on one thread). With ``top_k`` only the ``k``
    largest logits are exponentiated; with ``top_p`` the kept tokens are a prefix of the sorted ones, so one cumsum
    serves both the nucleus cut and the draw. Ties at the top-k / top-p boundary may resolve differently from
    `filter_logits`.

    Args:
        logits: ``(B, V)`` next-token logits (any float dtype; computed in float32, accumulated in float64).

    Returns:
        ``(tokens, mass)``: ``(B,)`` token ids, and ``(B,)`` the unnormalized mass the draw was made from, which is
        not positive and finite where the row had no usable distribution (NaN or all ``-inf`` logits).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    index = None  # candidate ids, when the candidates are a sorted subset of the vocabulary
    if 0 < top_k < logits.shape[-1]:
        logits, index = logits.topk(top_k, dim=-1)  # (B, k), sorted descending
    elif top_p < 1.0:
        logits, index = logits.sort(dim=-1, descending=True)
    weights = (logits - logits.amax(-1, keepdim=True)).exp().double()  # unnormalized probabilities, largest 1
    cum = weights.cumsum(-1)  # (B, K); float64 so that tail tokens keep their share
    mass = cum[:, -1:].contiguous()  # (B, 1)
    if top_p < 1.0:  # keep the prefix whose preceding mass is below top_p (the first token always: mass before 0)
        keep = ((cum - weights) < top_p * mass).sum(-1, keepdim=True).clamp(min=1)
        mass = cum.gather(-1, keep - 1)
    u = torch.rand(mass.shape, dtype=torch.float64, device=logits.device, generator=generator) * mass
    pick = torch.searchsorted(cum, u, right=True)  # first position whose cumulative mass exceeds u
    pick = torch.minimum(pick, torch.searchsorted(cum, mass))  # u * mass may round up to mass: last positive token
    if index is not None:
        pick = index.gather(-1, pick)
    return pick.squeeze(-1), mass.squeeze(-1)


class GrowingKVLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in one buffer sized for prompt + all new tokens at the prefill.

    A step writes its column in place and returns a view of the filled part, so attention still sees only the
    tokens so far (like `DynamicLayer`), but nothing is copied: `DynamicLayer` concatenates the whole cache every
    step, O(T^2) copying (``torch.cat`` was 18% of the PPO benchmark's generation time, profiled on one thread).
    Peak memory is the cache at full length, which `DynamicLayer` also reaches (plus a transient copy) when a
    generation runs to ``max_new_tokens``.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, _ = key_states.shape
        self._keys = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
        self._values = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"GrowingKVLayer: {end} tokens exceed the preallocated {self.capacity}.")
        self._keys[:, :, self.length:end].copy_(key_states)
        self._values[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def preallocated_cache(model: nn.Module, capacity: int) -> DynamicCache | None:
    """A `DynamicCache` of `GrowingKVLayer`s for a model whose layers all use plain full attention; None (the model
    builds its own cache) for sliding-window, linear-attention or KV-sharing layers, or a model without a config."""
    config = getattr(model, "config", None)
    if not hasattr(config, "get_text_config"):
        return None
    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [GrowingKVLayer(capacity) for _ in cache.layers]
    return cache


@torch.no_grad()
def sample(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
           eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, generator: torch.Generator | None = None) -> Generation:
    """Sample up to ``max_new_tokens`` tokens after left-padded prompts, reusing the KV cache.

    Positions come from the attention mask, so a left-padded row generates what the unpadded row would. Sampling
    draws from ``generator`` (checkpointable, for exact resume) through `draw_tokens`. ``temperature=0`` is greedy.
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards. Generation stops when
    every row has emitted a stop token; tokens after a row's stop token are ``pad_token_id`` with mask 0.

    Per step the loop does one decoding forward, one draw and one host sync (the all-stopped test); the KV cache
    (`preallocated_cache`), the attention mask and the output ids are allocated once for the whole generation.

    Args:
        model: a Hugging Face causal LM (peft-wrapped or not).
        input_ids, attention_mask: ``(B, P)`` left-padded prompts.
        eos_token_id: the stop token id(s); the stop token is kept in the response and its mask.

    Returns:
        A `recipes.modules.types.Generation`.
    """
    if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: need max_new_tokens >= 1, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_k}, {top_p}. Fix these sampling settings.")
    was_training = model.training
    model.eval()
    device, (batch, prompt_length) = input_ids.device, input_ids.shape
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    mask = attention_mask.new_ones(batch, prompt_length + max_new_tokens)  # step t reads the first P + t columns
    mask[:, :prompt_length] = attention_mask
    positions = position_ids_from_mask(attention_mask)
    next_positions = positions[:, -1:] + 1  # (B, 1)
    response_ids = input_ids.new_full((batch, max_new_tokens), pad_token_id)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    steps = 0
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{CACHE: preallocated_cache(model, prompt_length + max_new_tokens)})
        while True:
            logits = out.logits[:, -1]  # (B, V)
            if temperature == 0:
                token, usable = logits.argmax(-1), torch.ones_like(done)
            else:
                token, mass = draw_tokens(logits, temperature, top_k, top_p, generator)
                usable = (mass > 0) & (mass < float("inf"))  # False for NaN
            token = token.masked_fill(done, pad_token_id)
            response_ids[:, steps] = token
            lengths += ~done
            done |= torch.isin(token, stops)
            steps += 1
            finished, broken = torch.stack([done.all(), ~usable.all()]).tolist()  # the step's one host sync
            if broken:
                rows = (~usable).nonzero().flatten().tolist()
                raise ValueError(f"sample: at new token {steps}, rows {rows} have no token to sample from (NaN or "
                                 "all -inf logits). Check the model's outputs and the top_k / top_p settings.")
            if finished or steps == max_new_tokens:  # no forward for a token that will not be sampled
                break
            out = model(input_ids=token[:, None], attention_mask=mask[:, :prompt_length + steps],
                        position_ids=next_positions, use_cache=True, **{CACHE: getattr(out, CACHE)})
            next_positions = next_positions + 1
    finally:
        model.train(was_training)
    response_ids = response_ids[:, :steps].contiguous()  # (B, R)
    response_mask = (torch.arange(steps, device=device)[None] < lengths[:, None]).long()
    return Generation(response_ids, response_mask, done)


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
    entropy at each of them ``(B, R)`` (computed without grad, one row at a time to bound memory)."""
    logits = response_logits(model, input_ids, attention_mask, prompt_length)
    tokens = input_ids[:, prompt_length:]
    logprobs = filtered_logprobs(logits, tokens, temperature, top_k, top_p)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            if temperature in (0.0, 1.0) and not filters_active(logits.shape[-1], top_k, top_p):
                entropy = torch.stack([torch.distributions.Categorical(logits=row.float()).entropy() for row in logits])
            else:
                entropy = torch.stack([filtered_entropy(sampling_logits(row, row_tokens, temperature, top_k, top_p))
                                       for row, row_tokens in zip(logits, tokens)])
    return logprobs, entropy


def response_values(critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """Critic values of the states before each response token (the positions that predict them). Shape: ``(B, R)``."""
    return token_scores(critic, input_ids, attention_mask)[:, prompt_length - 1:-1]
