"""The reference as one object (modules/reference.py): each kind answers `logprobs` like the model it stands for,
`reset_to` makes it the policy, `lerp_` is the exact EMA step on every weight it holds (only adapter factors with
LoRA), the frozen copy keeps its checkpoint keys, and a table refuses to be averaged."""

import copy

import pytest
import torch

from recipes.modules.models import LoRASpec, ModelSpec, build_causal_lm, prepare_for_training
from recipes.modules.reference import AdapterReference, FrozenCopy, PrecomputedTable, Reference
from tests.conftest import TINY_LLAMA

LORA = ModelSpec(config=dict(TINY_LLAMA), lora=LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
IDS = torch.tensor([[5, 17, 42, 9, 63, 7], [11, 3, 88, 21, 4, 50]])  # (2, 6)


def next_token_logprobs(model):
    """log p(x_{t+1} | x_{<=t}) for every position of IDS, by a plain forward and log_softmax: (2, 5)."""
    logits = model(input_ids=IDS).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, IDS[:, 1:, None]).squeeze(-1)


@pytest.fixture
def base(byte_tokenizer):
    return build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), byte_tokenizer).eval()


@pytest.fixture
def lora_policy(base):
    """``base`` (deep-copied) with a LoRA adapter whose B factors are non-zero, so the adapter changes the outputs."""
    policy = prepare_for_training(copy.deepcopy(base), LORA).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.cos(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    return policy


def dyadic(policy, offset):
    """Set every parameter to small multiples of 1/4 (exact in float32, so lerp and the closed form agree bit for
    bit): ``(i mod 8) / 4 + offset`` for the i-th element."""
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_((torch.arange(p.numel()) % 8).view_as(p) / 4 + offset)


def test_frozen_copy_is_the_copied_module_and_scores_like_a_no_grad_forward(base):
    reference = FrozenCopy.freeze(copy.deepcopy(base))
    assert isinstance(reference, Reference) and isinstance(reference, torch.nn.Module)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    with torch.no_grad():
        expected = next_token_logprobs(base)
    got = reference.logprobs(next_token_logprobs)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_frozen_copy_keeps_the_checkpoint_keys_of_a_plain_copy(base):
    """A checkpoint written when the copy was a plain module registered as ``reference`` loads strictly, and the keys
    are ``reference.`` + the policy's parameter names."""
    old, new = torch.nn.Module(), torch.nn.Module()
    old.reference = copy.deepcopy(base)
    new.reference = FrozenCopy.freeze(copy.deepcopy(base))
    assert list(new.state_dict()) == [f"reference.{name}" for name in base.state_dict()]
    dyadic(old.reference, 1.0)
    new.load_state_dict(old.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(new.reference.parameters(), old.reference.parameters()))


def test_frozen_copy_lerp_is_the_exact_ema_step(base):
    """ref element (i mod 8)/4, policy element (i mod 8)/4 - 3; with eta 0.25 every element becomes
    0.75 ref + 0.25 policy = ref - 0.75 (e.g. 0.5 -> -0.25), on every parameter."""
    reference, policy = FrozenCopy.freeze(copy.deepcopy(base)), copy.deepcopy(base)
    dyadic(reference, 0.0)
    dyadic(policy, -3.0)
    before = {n: p.clone() for n, p in reference.named_parameters()}
    reference.lerp_(policy, 0.25)
    for name, p in reference.named_parameters():
        expected = 0.75 * before[name] + 0.25 * dict(policy.named_parameters())[name]
        assert torch.equal(p, expected) and torch.equal(p, before[name] - 0.75), name


def test_frozen_copy_reset_to_scores_like_the_policy(base):
    reference, policy = FrozenCopy.freeze(copy.deepcopy(base)), copy.deepcopy(base)
    dyadic(policy, 0.01)
    with torch.no_grad():
        expected = next_token_logprobs(policy)
    assert not torch.allclose(reference.logprobs(next_token_logprobs), expected)
    reference.reset_to(policy)
    torch.testing.assert_close(reference.logprobs(next_token_logprobs), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reference.parameters())  # still frozen


def test_adapter_disabled_reference_scores_like_the_base_model(base, lora_policy):
    reference = AdapterReference(lora_policy)
    with torch.no_grad():
        expected, adapted = next_token_logprobs(base), next_token_logprobs(lora_policy)
    assert (expected - adapted).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(reference.logprobs(next_token_logprobs), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="use_adapter"):  # the base model cannot move on its own
        reference.lerp_(lora_policy, 0.5)
    with pytest.raises(TypeError, match="use_adapter"):
        reference.reset_to(lora_policy)


def test_named_adapter_reset_to_scores_like_the_policy_and_leaves_it_active_and_trainable(lora_policy):
    reference = AdapterReference(lora_policy)
    reference.use_adapter("ref")  # a fresh adapter: B = 0, so it scores like the base model until reset
    with torch.no_grad():
        expected = next_token_logprobs(lora_policy)
    reference.reset_to(lora_policy)
    torch.testing.assert_close(reference.logprobs(next_token_logprobs), expected, rtol=0, atol=0)
    assert lora_policy.active_adapter == "default"
    params = dict(lora_policy.named_parameters())
    assert all(p.requires_grad for n, p in params.items() if ".default." in n)
    assert not any(p.requires_grad for n, p in params.items() if ".ref." in n)
    next_token_logprobs(lora_policy).sum().backward()  # the policy still trains through its own adapter
    assert all(p.grad is not None for n, p in params.items() if ".lora_A.default." in n)
    assert all(p.grad is None for n, p in params.items() if ".ref." in n or ".lora_" not in n)


def test_named_adapter_lerp_moves_only_the_adapter_factors(lora_policy):
    """Reference adapter factors at (i mod 8)/4, the policy's at (i mod 8)/4 + 1: after lerp_(0.25) each reference
    factor is 0.75 ref + 0.25 policy = ref + 0.25; base weights and the policy's own adapter are untouched."""
    reference = AdapterReference(lora_policy)
    reference.use_adapter("ema")
    with torch.no_grad():
        for name, p in lora_policy.named_parameters():
            if ".lora_" in name:
                p.copy_((torch.arange(p.numel()) % 8).view_as(p) / 4 + (1.0 if ".default." in name else 0.0))
    before = {n: p.detach().clone() for n, p in lora_policy.named_parameters()}
    reference.lerp_(lora_policy, 0.25)
    for name, p in lora_policy.named_parameters():
        if ".lora_" in name and ".ema." in name:
            policy_factor = before[name.replace(".ema.", ".default.")]
            assert torch.equal(p, 0.75 * before[name] + 0.25 * policy_factor), name
            assert torch.equal(p, before[name] + 0.25), name
        else:
            assert torch.equal(p, before[name]), name
    assert len(reference.parameter_pairs(lora_policy)) == 8  # A and B of q_proj and v_proj in 2 layers


def test_precomputed_table_reads_rows_in_batch_order_and_refuses_lerp(base):
    """Table rows [chosen, rejected]: [[1, 2], [3, 4], [5, 6]]; a batch of pairs 2 and 0 concatenates chosen rows,
    then rejected rows: [5, 1, 6, 2]. The first read computes the table from ``source``; `reset_to` recomputes."""
    calls = []

    def compute(policy, data):
        calls.append(data)
        return {"train": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]) * len(calls)}

    table = PrecomputedTable(compute, lambda: (base, "first data"))
    got = table.logprobs(lambda model: pytest.fail("a table runs no model"), torch.tensor([2, 0]), "train")
    assert torch.equal(got, torch.tensor([5.0, 1.0, 6.0, 2.0])) and calls == ["first data"]
    table.reset_to(base, "round 2")
    assert calls == ["first data", "round 2"]
    assert torch.equal(table.logprobs(None, torch.tensor([1])), torch.tensor([6.0, 8.0]))
    with pytest.raises(TypeError, match="table of log-probs"):
        table.lerp_(base, 0.1)
    with pytest.raises(ValueError, match="index"):
        table.logprobs(next_token_logprobs)


def test_precomputed_reset_to_refuses_a_lora_policy(lora_policy):
    table = PrecomputedTable(lambda policy, data: pytest.fail("computed"), lambda: pytest.fail("read"))
    with pytest.raises(ValueError, match="base model"):
        table.reset_to(lora_policy, None)
