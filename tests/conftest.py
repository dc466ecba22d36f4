"""Shared fixtures: a tiny random Llama built from a config, the built-in byte tokenizer, small data, a quiet Trainer."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub in tests: a missing model must fail fast, not retry
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RLHF_SHARED_DATA", REPO.parent / "shared" / "data"))

TINY_LLAMA = {  # 2 layers, hidden 32: a forward pass takes milliseconds
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or a clean skip when the shared folder is absent."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"shared data {path} is absent")
    return path


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path_factory, monkeypatch):
    """Seed every test and keep built-in data out of the user's cache."""
    L.seed_everything(1234, verbose=False)
    monkeypatch.setenv("RLHF_RECIPES_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and immune to oversubscription on 2 shared cores


@pytest.fixture
def byte_tokenizer():
    from recipes.modules.tokenizer import load_tokenizer

    return load_tokenizer("builtin:byte")


@pytest.fixture
def tiny_spec():
    from recipes.modules.models import ModelSpec

    return ModelSpec(config=dict(TINY_LLAMA))


@pytest.fixture
def tiny_model(tiny_spec, byte_tokenizer):
    from recipes.modules.models import build_causal_lm

    return build_causal_lm(tiny_spec, byte_tokenizer)


def quiet_trainer(**kwargs) -> L.Trainer:
    """A Trainer that prints nothing and writes nothing unless asked."""
    defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                    devices=1, enable_checkpointing=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_llama2(tmp_path_factory):
    """Folders ``sft`` (causal LM) and ``rm`` (one-label sequence classifier): tiny random Llamas with the Llama-2
    vocabulary, each saved with the real Llama-2 tokenizer from ../shared/data (skips when it is absent)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from recipes.modules.tokenizer import load_tokenizer

    tok_dir = shared_file("llama2-tokenizer/tokenizer.model").parent
    tok = load_tokenizer(str(tok_dir))
    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024,
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("tiny_llama2")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).save_pretrained(root / "sft")
    AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**cfg, num_labels=1)).save_pretrained(
        root / "rm")
    for folder in ("sft", "rm"):
        tok.save_pretrained(root / folder)
    return root
