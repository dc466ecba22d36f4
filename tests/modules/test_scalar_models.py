"""Scalar-head models: scores at the last real token, per-token values, export and reload in plain transformers."""

import torch
from transformers import AutoModelForSequenceClassification

from recipes.modules.models import LoRASpec, ModelSpec
from recipes.modules.scalar_models import build_scalar_model, last_token_index, sequence_scores, token_scores
from tests.conftest import TINY_LLAMA


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_sequence_scores_ignore_padding_and_pad_equal_eos(byte_tokenizer):
    model = build_scalar_model(ModelSpec(config=dict(TINY_LLAMA)), byte_tokenizer).eval()
    ids = torch.randint(4, 200, (1, 5))
    alone = sequence_scores(model, ids, torch.ones_like(ids))
    eos = byte_tokenizer.eos_token_id  # padding with the eos id must not move the scored position
    padded = torch.cat([ids, torch.full((1, 3), eos)], 1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(sequence_scores(model, padded, mask), alone, atol=1e-5, rtol=1e-5)
    assert token_scores(model, padded, mask).shape == (1, 8)


def test_scalar_model_from_causal_lm_folder_and_export(tmp_path, tiny_model, byte_tokenizer):
    tiny_model.save_pretrained(tmp_path / "lm")
    model = build_scalar_model(ModelSpec(name_or_path=str(tmp_path / "lm")), byte_tokenizer).eval()
    torch.testing.assert_close(model.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.randint(4, 200, (2, 6))
    torch.testing.assert_close(reloaded(input_ids=ids).logits.squeeze(-1),
                               sequence_scores(model, ids, torch.ones_like(ids)), atol=1e-5, rtol=1e-5)


def test_lora_scalar_model_trains_head_and_adapters(byte_tokenizer):
    spec = ModelSpec(config=dict(TINY_LLAMA), lora=LoRASpec(r=4, alpha=8, dropout=0.0))
    model = build_scalar_model(spec, byte_tokenizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    ids = torch.randint(4, 200, (2, 6))
    sequence_scores(model, ids, torch.ones_like(ids)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "score" in n)
