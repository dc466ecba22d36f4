"""Policy helpers against naive computations."""

import pytest
import torch

from recipes.modules.adapters import reference_context
from recipes.modules.policy import completion_logprobs, logprobs_from_logits, position_ids_from_mask, sequence_logprobs


def test_logprobs_from_logits_equals_log_softmax_gather():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    naive = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), naive)


def test_logprobs_from_bf16_logits_upcasts():
    logits = torch.randn(2, 4, 7).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 4))
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    naive = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, naive)


def test_sequence_logprobs_sum_and_mean():
    """Row 0: -1 - 2 = -3 over 2 tokens (mean -1.5); row 1: -4 over 1 token."""
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-9.0, -9.0, -4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(sequence_logprobs(lp, mask), torch.tensor([-3.0, -4.0]))
    torch.testing.assert_close(sequence_logprobs(lp, mask, average=True), torch.tensor([-1.5, -4.0]))


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_completion_logprobs_match_full_forward(tiny_model):
    ids = torch.randint(4, 200, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    comp = torch.zeros_like(ids)
    comp[0, 4:] = 1
    comp[1, 5:7] = 1
    lp, mask = completion_logprobs(tiny_model, ids, attn, comp)
    full = tiny_model(input_ids=ids, attention_mask=attn).logits.log_softmax(-1)
    naive = full[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    first = 4  # first column holding a completion token
    assert lp.shape == (2, ids.shape[1] - first)
    torch.testing.assert_close(lp * mask, naive[:, first - 1:] * mask, atol=1e-5, rtol=1e-5)
    assert mask.tolist() == comp[:, first:].tolist()


def test_left_padding_gives_unpadded_logprobs(tiny_model):
    ids = torch.randint(4, 200, (1, 6))
    comp = torch.tensor([[0, 0, 0, 1, 1, 1]])
    lp, _ = completion_logprobs(tiny_model, ids, torch.ones_like(ids), comp)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    lp_pad, _ = completion_logprobs(tiny_model, padded, attn, torch.cat([torch.zeros(1, 3, dtype=torch.long), comp], 1))
    torch.testing.assert_close(lp_pad, lp, atol=1e-5, rtol=1e-5)


def _plain_model(peft_model, spec, tokenizer, merge: str | None):
    """The same network without peft, built independently: a fresh model of ``spec``'s config holding the peft
    model's base weights, plus ``scaling * B @ A`` of adapter ``merge`` added to each adapted linear weight."""
    from peft.tuners.lora import LoraLayer

    from recipes.modules.models import build_causal_lm

    plain = build_causal_lm(type(spec)(config=dict(spec.config)), tokenizer).eval()
    prefix = "base_model.model."
    weights = {k.removeprefix(prefix).replace(".base_layer.", "."): v for k, v in peft_model.state_dict().items()
               if "lora_" not in k}
    plain.load_state_dict(weights, strict=True)
    if merge is not None:
        with torch.no_grad():
            for name, module in peft_model.named_modules():
                if isinstance(module, LoraLayer):
                    delta = module.lora_B[merge].weight @ module.lora_A[merge].weight * module.scaling[merge]
                    plain.get_submodule(name.removeprefix(prefix)).weight.add_(delta)
    return plain


def test_reference_context_disables_lora(tiny_spec, byte_tokenizer):
    """Inside ``reference_context`` the LoRA model computes exactly the base network's logits, outside it the
    network with ``W + (alpha / r) B A`` on every adapted linear; both expected logits come from models built
    without peft."""
    from recipes.modules.models import LoRASpec, build_causal_lm

    tiny_spec.lora = LoRASpec(r=4, alpha=8, dropout=0.0)
    model = build_causal_lm(tiny_spec, byte_tokenizer).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained adapter changes the output
    ids = torch.randint(4, 200, (1, 5))
    plain_spec = type(tiny_spec)(config=dict(tiny_spec.config))
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with reference_context(model):
            base = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        expected_base = _plain_model(model, plain_spec, byte_tokenizer, None)(input_ids=ids).logits
        expected_adapted = _plain_model(model, plain_spec, byte_tokenizer, "default")(input_ids=ids).logits
    torch.testing.assert_close(base, expected_base, rtol=0, atol=1e-5)
    torch.testing.assert_close(with_adapter, expected_adapted, rtol=1e-4, atol=1e-4)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter is not a no-op, so the two checks differ
    assert torch.equal(after, with_adapter)  # the adapter is back on after the context
    with pytest.raises(TypeError, match="needs a peft"):
        with reference_context(build_causal_lm(plain_spec, byte_tokenizer)):
            pass


def test_reference_context_named_adapter_restores_training_state(tiny_spec, byte_tokenizer):
    from recipes.modules.models import LoRASpec, build_causal_lm

    tiny_spec.lora = LoRASpec(r=4, alpha=8, dropout=0.0)
    model = build_causal_lm(tiny_spec, byte_tokenizer)
    model.add_adapter("ref", model.peft_config["default"])
    for name, p in model.named_parameters():
        if "lora_B.ref" in name:
            torch.nn.init.normal_(p)
    ids = torch.randint(4, 200, (1, 5))
    with torch.no_grad():
        default = model(input_ids=ids).logits
        with reference_context(model, "ref"):
            ref = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(default, ref) and torch.equal(default, again)
    assert model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
