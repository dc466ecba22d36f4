"""The LM head only where the loss reads it (issue #19): every module's log-probs (SFT, DPO and its reference pass,
ranking, KTO, PPO/GRPO's policy) and scalar heads (the critic's values, the reward model's scores) equal the ones
computed from the full ``(B, T, V)`` logits of every position, to 1e-6 in float32, with left and right padding;
and the head sees only the ``N`` positions that are read."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from recipes.modules.dpo import DPOModule
from recipes.modules.kto import KTOModule
from recipes.modules.models import ModelSpec, build_causal_lm
from recipes.modules.policy import completion_logprobs, position_ids_from_mask
from recipes.modules.ranking import RankingModule
from recipes.modules.reference_pass import pass_logps
from recipes.modules.response_logprobs import response_logprobs, response_values
from recipes.modules.reward import RewardModule
from recipes.modules.scalar_models import build_scalar_model, sequence_scores
from recipes.modules.sft import SFTModule
from tests.conftest import TINY_LLAMA

PAD = 0


def batch(side: str, rows: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompts of 3-9 and completions of 2-7 tokens, padded on ``side`` (right: the training collates; left: a
    prompt padded to the batch's longest, as in a rollout, then the completion, then right padding)."""
    g = torch.Generator().manual_seed(seed)
    pieces = [(torch.randint(3, 250, (int(torch.randint(3, 10, (), generator=g)),), generator=g),
               torch.randint(3, 250, (int(torch.randint(2, 8, (), generator=g)),), generator=g)) for _ in range(rows)]
    P, R = max(len(p) for p, _ in pieces), max(len(r) for _, r in pieces)
    ids = torch.full((rows, P + R), PAD)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, r) in enumerate(pieces):
        start = P - len(p) if side == "left" else 0
        ids[i, start:start + len(p) + len(r)] = torch.cat([p, r])
        att[i, start:start + len(p) + len(r)] = 1
        comp[i, start + len(p):start + len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp, "prompt_length": P}


def full_logit_token_logprobs(model, ids, att) -> torch.Tensor:
    """Independent expectation: log_softmax of every position's logits, the token at ``t`` read at ``t - 1``.
    Shape: ``(B, T - 1)``."""
    logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits.float()
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def full_logit_logprobs(model, ids, att, comp) -> torch.Tensor:
    """The per-row sum of `full_logit_token_logprobs` over the completion mask. Shape: ``(B,)``."""
    return (full_logit_token_logprobs(model, ids, att) * comp[:, 1:]).sum(-1)


def assert_sums_close(actual, expected, comp):
    """Row sums of log-probs within 1e-6 per summed token (each token's log-prob is within 1e-6; a sum of n of
    them can differ by the rounding of n additions)."""
    atol = 1e-6 * comp[:, 1:].sum(-1).clamp(min=1).to(expected.dtype)
    assert torch.all((actual - expected).abs() <= atol), (actual - expected, atol)


def built(module):
    module.configure_model()
    return module


@pytest.fixture
def spec():
    return ModelSpec(config=dict(TINY_LLAMA))


@pytest.mark.parametrize("side", ["right", "left"])
def test_completion_logprobs_equal_the_full_logits_and_the_head_sees_only_completion_positions(byte_tokenizer, side):
    model = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), byte_tokenizer)
    b = batch(side)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    logprobs, mask = completion_logprobs(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
    handle.remove()
    n = int(b["completion_mask"][:, 1:].sum())
    assert rows == [torch.Size([n, TINY_LLAMA["hidden_size"]])]  # only the N predicting positions reach the head
    with torch.no_grad():
        expected = full_logit_token_logprobs(model, b["input_ids"], b["attention_mask"])[:, -mask.shape[1]:]
    read = mask.bool()
    torch.testing.assert_close(logprobs[read], expected[read], atol=1e-6, rtol=0)  # token by token
    assert torch.all(logprobs[~read] == 0)
    logprobs.sum().backward()  # the gathered path carries gradients to the head and the body
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_module_reads_the_same_logprobs_as_the_full_logits(byte_tokenizer, spec, side):
    b = batch(side, rows=4)
    ids, att, comp = b["input_ids"], b["attention_mask"], b["completion_mask"]
    sft = built(SFTModule(model=spec, tokenizer=byte_tokenizer))
    logprobs, mask = sft(b)
    with torch.no_grad():
        expected = full_logit_token_logprobs(sft.policy, ids, att)[:, -mask.shape[1]:]
    torch.testing.assert_close(logprobs[mask.bool()], expected[mask.bool()], atol=1e-6, rtol=0)
    dpo = built(DPOModule(model=spec, tokenizer=byte_tokenizer, cache_reference=False))
    with torch.no_grad():
        expected = full_logit_logprobs(dpo.policy, ids, att, comp)
        assert_sums_close(dpo(b), expected, comp)
        assert_sums_close(dpo.reference_forward({**b, "index": torch.arange(2)}), expected, comp)  # frozen copy
        assert_sums_close(pass_logps(dpo.policy, b), expected, comp)  # the precomputed reference's pass
    kto = built(KTOModule(model=spec, tokenizer=byte_tokenizer))
    with torch.no_grad():
        assert_sums_close(kto(b), full_logit_logprobs(kto.policy, ids, att, comp), comp)
    ranking = built(RankingModule(model=spec, tokenizer=byte_tokenizer))
    k_batch = {name: b[name].view(2, 2, -1) for name in ("input_ids", "attention_mask", "completion_mask")}
    k_batch.update(scores=torch.rand(2, 2), response_mask=torch.ones(2, 2, dtype=torch.bool))
    with torch.no_grad():
        logps, _ = ranking(k_batch)
        assert_sums_close(logps.reshape(-1), full_logit_logprobs(ranking.policy, ids, att, comp), comp)


@pytest.mark.parametrize("settings", [{}, {"top_k": 5, "temperature": 0.7}])
def test_rollout_and_update_logprobs_equal_the_full_logits(byte_tokenizer, settings):
    """PPO/GRPO's response log-probs (left-padded prompts, right-padded responses) and entropies against the full
    logits, filtered as `filtered_logprobs` does row by row."""
    from recipes.modules.response_logprobs import filtered_logprobs

    model = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), byte_tokenizer)
    b = batch("left")
    ids, att, P = b["input_ids"], b["attention_mask"], b["prompt_length"]
    logprobs, entropy = response_logprobs(model, ids, att, P, True, **settings)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits[:, P - 1:-1]
        expected = filtered_logprobs(logits, ids[:, P:], **settings)
    mask = att[:, P:].bool()
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-6, rtol=0)
    assert torch.all(logprobs[~mask] == 0) and torch.all(entropy[~mask] == 0) and torch.all(entropy[mask] > 0)
    if not settings:
        plain = torch.distributions.Categorical(logits=logits.float()).entropy()
        torch.testing.assert_close(entropy[mask], plain[mask], atol=1e-6, rtol=0)


def test_peft_wrapped_policy_takes_the_gathered_head(byte_tokenizer):
    model = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), byte_tokenizer)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    lora = get_peft_model(model, config)
    b = batch("right")
    logprobs, mask = completion_logprobs(lora, b["input_ids"], b["attention_mask"], b["completion_mask"])
    with torch.no_grad():
        expected = full_logit_token_logprobs(lora, b["input_ids"], b["attention_mask"])[:, -mask.shape[1]:]
    torch.testing.assert_close(logprobs[mask.bool()].detach(), expected[mask.bool()], atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_scalar_heads_read_only_where_used_and_match_every_position(byte_tokenizer, spec, side):
    critic = build_scalar_model(ModelSpec(config=dict(TINY_LLAMA)), byte_tokenizer)
    b = batch(side)
    ids, att, P = b["input_ids"], b["attention_mask"], b["prompt_length"]
    with torch.no_grad():
        hidden = critic.model(input_ids=ids, attention_mask=att,
                              position_ids=position_ids_from_mask(att)).last_hidden_state
        every = critic.score(hidden).squeeze(-1)  # (B, T) the head at every position
        last = torch.tensor([int(row.nonzero().max()) for row in att])
        torch.testing.assert_close(sequence_scores(critic, ids, att), every[torch.arange(len(last)), last],
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(response_values(critic, ids, att, P), every[:, P - 1:-1], atol=1e-6, rtol=0)
        reward = RewardModule(model=spec, tokenizer=byte_tokenizer)
        reward.configure_model()
        torch.testing.assert_close(reward(ids, att), sequence_scores(reward.model, ids, att))
