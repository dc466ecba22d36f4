"""With top-k / top-p sampling, PPO's behaviour log-probs, reference log-probs and update log-probs all come from the
filtered, renormalised distribution (`recipes.modules.response_logprobs.filtered_logprobs`), so the importance ratio is
exactly 1 before the policy changes and the KL compares the filtered samplers (issue #16)."""

import pytest
import torch

from recipes.modules.generation import filter_logits, sample
from recipes.modules.losses import PPOPolicyLoss
from recipes.modules.models import ModelSpec, build_causal_lm
from recipes.modules.reference import FrozenCopy
from recipes.modules.response_logprobs import response_logits, response_logprobs
from recipes.modules.rollout import rollout_forwards
from recipes.modules.scalar_models import build_scalar_model
from tests.conftest import TINY_LLAMA

SETTINGS = [{"top_k": 5}, {"top_p": 0.6}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}]


def rollout(tokenizer, settings):
    """A tiny policy, its frozen copy as reference and a critic; 4 prompts sampled with ``settings``."""
    policy = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), tokenizer)
    critic = build_scalar_model(ModelSpec(config=dict(TINY_LLAMA)), tokenizer)
    reference = FrozenCopy.freeze(build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), tokenizer))
    reference.load_state_dict(policy.state_dict())
    enc = tokenizer(["hello", "a longer prompt", "b", "q?"], return_tensors="pt", padding=True, padding_side="left")
    gen = sample(policy, enc.input_ids, enc.attention_mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id,
                 generator=torch.Generator().manual_seed(0), **settings)
    ids = torch.cat([enc.input_ids, gen.response_ids], 1)
    att = torch.cat([enc.attention_mask, gen.response_mask], 1)
    return policy, critic, reference, ids, att, enc.input_ids.shape[1], gen.response_mask.bool()


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_first_update_sees_ratio_one_and_the_old_unfiltered_path_would_not(byte_tokenizer, settings):
    policy, critic, reference, ids, att, P, mask = rollout(byte_tokenizer, settings)
    old, entropy, ref, _ = rollout_forwards(policy, critic, reference, ids, att, P, 2, **settings)
    policy.train()  # as in PPOModule._update (dropout is 0 in the tiny config)
    new, _ = response_logprobs(policy, ids, att, P, **settings)  # the update's forward, with grad
    assert new.requires_grad
    assert torch.equal(new, old) and torch.equal(torch.exp(new - old)[mask], torch.ones(int(mask.sum())))
    _, approx_kl, clipfrac = PPOPolicyLoss(0.2)(new, old, torch.randn(old.shape), mask.float())
    assert approx_kl.item() == 0.0 and clipfrac.item() == 0.0
    assert torch.equal(ref, old)  # the reference is the same weights: KL exactly 0, not a filtering artefact
    assert torch.isfinite(old).all() and torch.isfinite(ref).all() and torch.isfinite(entropy).all()
    # the unfiltered softmax, which the rollout used before, spreads mass outside the set: log-probs lower by
    # -log(mass of the set) > 0, so its ratio against the filtered behaviour log-probs is not 1
    plain, _ = response_logprobs(policy, ids, att, P)
    if "temperature" not in settings:  # (at another temperature the plain softmax is not even the same shape)
        assert (plain[mask] <= old[mask] + 1e-6).all()
    assert (old - plain)[mask].abs().mean() > 0.05


@pytest.mark.parametrize("settings", SETTINGS)
def test_every_sampled_token_is_inside_the_filtered_set_of_the_full_forward(byte_tokenizer, settings):
    """The sampler (KV cache, `draw_tokens`) and the rollout forward (one full pass, `filter_logits`) agree on the set:
    no sampled token needed to be put back into it."""
    policy, _, _, ids, att, P, mask = rollout(byte_tokenizer, settings)
    with torch.no_grad():
        logits = response_logits(policy.eval(), ids, att, P) / settings.get("temperature", 1.0)  # (B, R, V)
    filtered = filter_logits(logits.flatten(0, 1), settings.get("top_k", 0), settings.get("top_p", 1.0))
    picked = filtered.gather(-1, ids[:, P:].reshape(-1, 1)).view(mask.shape)
    assert torch.isfinite(picked[mask]).all()


def test_the_reference_scores_a_token_outside_its_own_set_finitely(byte_tokenizer):
    """After the policy drifts, a token the policy sampled may lie outside the reference's top-k: its reference
    log-prob is that of the reference's set plus the token (finite), not -inf; the policy's stays that of its set."""
    settings = {"top_k": 3}
    policy, critic, reference, ids, att, P, mask = rollout(byte_tokenizer, settings)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p))  # a reference far from the policy
    _, _, ref, _ = rollout_forwards(policy, critic, reference, ids, att, P, 4, **settings)
    with torch.no_grad():
        ref_logits = response_logits(reference, ids, att, P).float()  # (B, R, V)
    outside = (ref_logits.gather(-1, ids[:, P:, None]).squeeze(-1) < ref_logits.topk(3, -1).values[..., -1]) & mask
    assert outside.any()  # the case this test is about occurs
    assert torch.isfinite(ref).all()
    # by hand at one such position: log softmax over the reference's top 3 logits and the token's own
    b, t = outside.nonzero()[0].tolist()
    row, token = ref_logits[b, t], ids[b, P + t]
    expected = row[token] - torch.logsumexp(torch.cat([row.topk(3).values, row[token, None]]), 0)
    torch.testing.assert_close(ref[b, t], expected)


def test_ppo_module_logs_ratio_one_on_its_first_minibatch_with_filters_on(byte_tokenizer):
    """Through PPOModule and a Trainer: top-k 5 and top-p 0.9 at temperature 0.8, one epoch of one minibatch (so the
    only update is the first): the logged approx KL and clip fraction are exactly 0 (the ratio is exactly 1)."""
    from recipes.datamodules.prompts import PromptDataModule
    from recipes.modules.ppo import PPOModule
    from recipes.modules.reward_functions import CharacterFractionReward
    from tests.conftest import quiet_trainer

    torch.set_num_threads(1)
    module = PPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), critic=ModelSpec(config=dict(TINY_LLAMA)),
                       reward=CharacterFractionReward(),
                       tokenizer=byte_tokenizer, max_new_tokens=6, temperature=0.8, top_k=5, top_p=0.9, ppo_epochs=1)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, PromptDataModule(rollout_batch_size=4, max_length=64))
    assert trainer.callback_metrics["ppo/approx_kl"] == 0 and trainer.callback_metrics["ppo/clipfrac"] == 0
