"""The two halves of an on-policy rollout that do not depend on the algorithm: sampling a prompt batch in chunks
(on gathered weights under FSDP2) and the no-grad passes that read the policy's log-probs and entropies, the
reference's log-probs and the critic's values off the sampled sequences, and the repetition of each prompt for groups of
samples. Used by `recipes.modules.on_policy.OnPolicyModule` (PPO, GRPO, RLOO)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from recipes.modules.reference import Reference
from recipes.modules.response_logprobs import response_logprobs, response_values
from recipes.modules.sharding import unsharded
from recipes.modules.types import Generation, PromptBatch, longest_response


def repeat_prompts(batch: PromptBatch, k: int) -> PromptBatch:
    """Each prompt ``k`` times, a prompt's copies adjacent (rows ``i*k ... i*k + k - 1``: one group), with its text
    and metadata; ``k == 1`` returns ``batch`` itself. Shapes: ``(B, P) -> (B*k, P)``."""
    if k == 1:
        return batch
    metadata = batch.get("metadata")
    return {**batch, "input_ids": batch["input_ids"].repeat_interleave(k, 0),
            "attention_mask": batch["attention_mask"].repeat_interleave(k, 0),
            "prompts": [p for p in batch["prompts"] for _ in range(k)],
            "metadata": None if metadata is None else [m for m in metadata for _ in range(k)]}


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
            start = min(int(prompt_mask[i:i + chunk].any(0).int().argmax()), prompt_ids.shape[1] - 1)
            gens.append(sample_fn(prompt_ids[i:i + chunk, start:], prompt_mask[i:i + chunk, start:]))  # no pad column
    width = max(g.response_ids.shape[1] for g in gens)
    pad = [width - g.response_ids.shape[1] for g in gens]
    return Generation(torch.cat([nn.functional.pad(g.response_ids, (0, p), value=pad_token_id)
                                 for g, p in zip(gens, pad)]),
                      torch.cat([nn.functional.pad(g.response_mask, (0, p)) for g, p in zip(gens, pad)]),
                      torch.cat([g.ended_with_eos for g in gens]))


@torch.no_grad()
def rollout_forwards(policy: nn.Module, critic: nn.Module | None, reference: Reference | None, input_ids: Tensor,
                     attention_mask: Tensor, prompt_length: int, chunk: int, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Old log-probs, entropies, reference log-probs and values of the response tokens, ``chunk`` rows at a time,
    every model in eval mode (restored afterwards); without a ``critic`` (or ``reference``) its output is None.

    Log-probs and entropies are those of the sampling distribution of ``temperature``, ``top_k`` and ``top_p``
    (`recipes.modules.response_logprobs.filtered_logprobs`: each model's own filtered, renormalised softmax), the
    rule the PPO update must apply to the new policy too, so that the ratio starts at exactly 1. The reference is read through
    `recipes.modules.reference.Reference.logprobs`, whichever kind it is (a frozen copy, or the LoRA policy with its
    adapters disabled or a reference adapter active). Shapes: inputs ``(B, P + R)``; each output ``(B, R)``.
    """
    modes = [(m, m.training) for m in (policy, critic, reference) if isinstance(m, nn.Module)]
    for m, _ in modes:
        m.eval()
    outs, P, sampling = [], prompt_length, (temperature, top_k, top_p)  # the same rule for policy and reference
    try:
        for i in range(0, input_ids.shape[0], chunk):
            keep = longest_response(attention_mask[i:i + chunk], P)  # no pad tail in the forwards (exact)
            ids, att = input_ids[i:i + chunk, :P + keep], attention_mask[i:i + chunk, :P + keep]
            logprobs, entropy = response_logprobs(policy, ids, att, P, True, *sampling)
            ref_logprobs = None if reference is None else reference.logprobs(
                lambda model, ids=ids, att=att: response_logprobs(model, ids, att, P, False, *sampling)[0])
            values = None if critic is None else response_values(critic, ids, att, P)
            width = input_ids.shape[1] - P  # back to the rollout's R columns (0 on the padding)
            outs.append(tuple(None if x is None else nn.functional.pad(x, (0, width - keep))
                              for x in (logprobs, entropy, ref_logprobs, values)))
    finally:
        for m, mode in modes:
            m.train(mode)
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))
