"""Sampling with a preallocated KV cache (temperature, top-k, top-p, stop tokens). The log-probs of that sampling
distribution, read off a prompt + response batch, are in `recipes.modules.response_logprobs`. No training code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from recipes.modules.policy import position_ids_from_mask
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
