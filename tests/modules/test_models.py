"""Model building: random configs, local from_pretrained, LoRA, 4-bit QLoRA, and clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes.modules.models import LoRASpec, ModelSpec, build_causal_lm, count_parameters
from tests.conftest import TINY_LLAMA


def test_random_model_takes_tokenizer_sizes(tiny_model, byte_tokenizer):
    assert tiny_model.get_input_embeddings().num_embeddings == len(byte_tokenizer) == 260
    assert tiny_model.config.pad_token_id == byte_tokenizer.pad_token_id


def test_from_pretrained_local_folder(tmp_path, tiny_model, byte_tokenizer):
    tiny_model.save_pretrained(tmp_path)
    loaded = build_causal_lm(ModelSpec(name_or_path=str(tmp_path)), byte_tokenizer)
    ids = torch.randint(4, 200, (1, 6))
    torch.testing.assert_close(loaded(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="local folder"):
        build_causal_lm(ModelSpec(name_or_path=str(tmp_path / "no-such-model")))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        build_causal_lm(ModelSpec(name_or_path="no-such-org/no-such-model-xyz"))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="name_or_path"):
        build_causal_lm(ModelSpec())
    with pytest.raises(ValueError, match="model_type"):
        build_causal_lm(ModelSpec(config={"hidden_size": 8}))
    with pytest.raises(ValueError, match="LoRA"):
        build_causal_lm(ModelSpec(name_or_path="x", load_in_4bit=True))
    with pytest.raises(ValueError, match="saved weights"):
        build_causal_lm(ModelSpec(config=dict(TINY_LLAMA), load_in_4bit=True, lora=LoRASpec()))


def test_lora_trains_adapters_only(tiny_spec, byte_tokenizer):
    tiny_spec.lora = LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = build_causal_lm(tiny_spec, byte_tokenizer)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_with_lora_backprops(tiny_spec, byte_tokenizer):
    tiny_spec.lora = LoRASpec(r=4, alpha=8, dropout=0.0)
    tiny_spec.gradient_checkpointing = True
    model = build_causal_lm(tiny_spec, byte_tokenizer)
    model.train()
    ids = torch.randint(4, 200, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A gets none while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_4bit_cpu_adapter_learns(tmp_path, byte_tokenizer):
    """4-bit base through bitsandbytes on CPU (out-features multiples of 32); the adapter must really change after an
    eval-mode no-grad forward (on an AVX512-BF16 CPU bitsandbytes would repack the weights for a kernel without
    autograd there: `recipes.modules.models.keep_4bit_weights_trainable`)."""
    pytest.importorskip("bitsandbytes")
    cfg = dict(TINY_LLAMA, hidden_size=64, intermediate_size=128, num_key_value_heads=4)
    base = build_causal_lm(ModelSpec(config=cfg), byte_tokenizer)
    base.save_pretrained(tmp_path)
    spec = ModelSpec(name_or_path=str(tmp_path), load_in_4bit=True, bnb_4bit_compute_dtype="float32",
                     lora=LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model = build_causal_lm(spec, byte_tokenizer)
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(4, 200, (2, 8))
    model.eval()
    with torch.no_grad():  # an eval-mode no-grad forward first, as a PPO rollout does
        model(input_ids=ids)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_export_loads_in_plain_transformers(tmp_path, tiny_spec, byte_tokenizer):
    from transformers import AutoTokenizer

    from recipes.modules.export import save_pretrained

    tiny_spec.lora = LoRASpec(r=4, alpha=8, dropout=0.0)
    model = build_causal_lm(tiny_spec, byte_tokenizer)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(4, 200, (1, 6))
    expected = model(input_ids=ids).logits
    save_pretrained(model, byte_tokenizer, str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert any("lora" in n for n, _ in model.named_parameters())  # the live model keeps its adapter
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.decode(tok("abc").input_ids) == "abc"
    save_pretrained(model, byte_tokenizer, str(tmp_path / "adapter"), merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_merged_lora_state_dict_equals_peft_merge(tiny_spec, byte_tokenizer):
    """The merge used for sharded LoRA exports (computed from a state dict, as gathered from FSDP2 shards) gives
    exactly peft's ``merge_and_unload``: with a second, inactive adapter (PPO's EMA reference) and a
    ``modules_to_save`` copy present. A DoRA adapter is not merged (None: saved as an adapter instead)."""
    import copy

    from peft import LoraConfig

    from recipes.modules.export import merged_lora_state_dict

    tiny_spec.lora = LoRASpec(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model = build_causal_lm(tiny_spec, byte_tokenizer)
    model.add_adapter("ema", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(std=0.1)
    merged = merged_lora_state_dict(model, model.state_dict())
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert (merged["lm_head.weight"] - model.base_model.model.lm_head.original_module.weight).abs().max() > 1e-3
    from peft import get_peft_model

    tiny_spec.lora = None
    dora = get_peft_model(build_causal_lm(tiny_spec, byte_tokenizer),
                          LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert merged_lora_state_dict(dora, dora.state_dict()) is None


def test_fsdp2_param_dtype_follows_trainer_precision():
    from types import SimpleNamespace

    from recipes.modules.sharding import fsdp2_param_dtype

    assert fsdp2_param_dtype(SimpleNamespace(_trainer=SimpleNamespace(precision="bf16-mixed"))) is torch.bfloat16
    for precision in ("32-true", "bf16-true"):
        assert fsdp2_param_dtype(SimpleNamespace(_trainer=SimpleNamespace(precision=precision))) is None
    assert fsdp2_param_dtype(SimpleNamespace(_trainer=None)) is None
