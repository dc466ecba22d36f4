"""The two halves of an on-policy rollout that do not depend on the algorithm: sampling a prompt batch in chunks
(on gathered weights under FSDP2) and the no-grad passes that read the policy's log-probs and entropies, the
reference's log-probs and the critic's values off the sampled sequences. Used by `recipes.modules.ppo.PPOModule`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from recipes.modules.generation import response_logprobs, response_values
from recipes.modules.reference import Reference
from recipes.modules.sharding import unsharded
from recipes.modules.types import Generation


@torch.no_grad()
def sample_in_chunks(policy: nn.Module, sample_fn: Callable[[Tensor, Tensor], Generation], prompt_ids: Tensor,
                     prompt_mask: Tensor, chunk: int, pad_token_id: int) -> Generation:
    """``sample_fn(ids, mask)`` on ``chunk`` prompts at a time, the responses right-padded to one width.

    Under FSDP2 the policy's weights are gathered once for the whole loop (`recipes.modules.sharding.unsharded`), so
    each rank stops sampling when its own rows are done. Shapes: prompts ``(B, P)``; the result's fields ``(B, R)``.
    """
    gens = []
    with unsharded(policy):
        for i in range(0, prompt_ids.shape[0], chunk):
            gens.append(sample_fn(prompt_ids[i:i + chunk], prompt_mask[i:i + chunk]))
    width = max(g.response_ids.shape[1] for g in gens)
    pad = [width - g.response_ids.shape[1] for g in gens]
    return Generation(torch.cat([nn.functional.pad(g.response_ids, (0, p), value=pad_token_id)
                                 for g, p in zip(gens, pad)]),
                      torch.cat([nn.functional.pad(g.response_mask, (0, p)) for g, p in zip(gens, pad)]),
                      torch.cat([g.ended_with_eos for g in gens]))


@torch.no_grad()
def rollout_forwards(policy: nn.Module, critic: nn.Module, reference: Reference, input_ids: Tensor,
                     attention_mask: Tensor, prompt_length: int, chunk: int, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Old log-probs, entropies, reference log-probs and values of the response tokens, ``chunk`` rows at a time,
    every model in eval mode (restored afterwards).

    Log-probs and entropies are those of the sampling distribution of ``temperature``, ``top_k`` and ``top_p``
    (`recipes.modules.generation.filtered_logprobs`: each model's own filtered, renormalised softmax), the rule the
    PPO update must apply to the new policy too, so that the ratio starts at exactly 1. The reference is read through
    `recipes.modules.reference.Reference.logprobs`, whichever kind it is (a frozen copy, or the LoRA policy with its
    adapters disabled or a reference adapter active). Shapes: inputs ``(B, P + R)``; each output ``(B, R)``.
    """
    modes = [(m, m.training) for m in (policy, critic, reference) if isinstance(m, nn.Module)]
    for m, _ in modes:
        m.eval()
    outs, P, sampling = [], prompt_length, (temperature, top_k, top_p)  # the same rule for policy and reference
    try:
        for i in range(0, input_ids.shape[0], chunk):
            ids, att = input_ids[i:i + chunk], attention_mask[i:i + chunk]
            logprobs, entropy = response_logprobs(policy, ids, att, P, True, *sampling)
            ref_logprobs = reference.logprobs(
                lambda model, ids=ids, att=att: response_logprobs(model, ids, att, P, False, *sampling)[0])
            outs.append((logprobs, entropy, ref_logprobs, response_values(critic, ids, att, P)))
    finally:
        for m, mode in modes:
            m.train(mode)
    return tuple(torch.cat(parts) for parts in zip(*outs))
