"""Exports that load outside this project: a reward model scores plain text in a transformers pipeline, a LoRA
adapter loads from any working directory, and tokenizer_config.json names a class transformers 4 has."""

import json
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from recipes.modules.export import TRANSFORMERS4_TOKENIZER_CLASSES
from recipes.modules.models import LoRASpec, ModelSpec
from recipes.modules.reward import RewardModule
from recipes.modules.reward_functions import SequenceClassifierReward
from recipes.modules.sft import SFTModule
from recipes.modules.tokenizer import EOS_APPENDED_FOR_SCORING, load_tokenizer
from tests.conftest import TINY_LLAMA

TEXTS = ["ab:cab", "hello world", "x", "The quick brown fox"]
PROMPTS, RESPONSES = ["ab:", "hello", "", "The quick"], ["cab", " world", "x", " brown fox"]  # joined: TEXTS


@pytest.fixture
def reward_module(byte_tokenizer):
    module = RewardModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=byte_tokenizer)
    module.configure_model()
    return module.eval()


def own_scores(module: RewardModule, texts: list[str]) -> list[float]:
    """The module's reward of each text as training feeds it: byte ids (no specials) + EOS, one row at a time."""
    tok, scores = module.tokenizer, []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            scores.append(module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item())
    return scores


def test_reward_export_scores_plain_text_in_a_pipeline(reward_module, tmp_path):
    """pipeline("text-classification") on the texts as given equals the module's score of text + EOS (1e-6), and
    differs from its score without EOS (what the folder gave before: the head read at the last letter)."""
    folder = reward_module.export_pretrained(str(tmp_path / "rm"))
    classifier = pipeline("text-classification", model=folder, function_to_apply="none", device="cpu")
    piped = [out["score"] for out in classifier(TEXTS)]
    expected = own_scores(reward_module, TEXTS)
    assert piped == pytest.approx(expected, abs=1e-6)
    tok = reward_module.tokenizer
    with torch.no_grad():
        ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
        no_eos = reward_module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
    assert abs(no_eos - expected[0]) > 1e-4
    plain = AutoTokenizer.from_pretrained(folder)
    assert plain("ab")["input_ids"] == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"),
                                        tok.eos_token_id]


def test_project_loader_sees_the_training_tokenizer(reward_module, tmp_path):
    """load_tokenizer on the folder encodes exactly as the training tokenizer (no EOS), with and without special
    tokens, so SequenceClassifierReward's prompt + response + EOS gets one EOS: its scores equal the module's."""
    folder = reward_module.export_pretrained(str(tmp_path / "rm"))
    loaded, original = load_tokenizer(folder), reward_module.tokenizer
    for text in TEXTS:
        for special in (True, False):
            assert loaded(text, add_special_tokens=special)["input_ids"] == \
                original(text, add_special_tokens=special)["input_ids"]
    assert EOS_APPENDED_FOR_SCORING not in loaded.init_kwargs
    scores = SequenceClassifierReward(folder, batch_size=2)(PROMPTS, RESPONSES)
    assert scores.tolist() == pytest.approx(own_scores(reward_module, TEXTS), abs=1e-6)
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 1


def test_export_leaves_the_live_tokenizer_alone(reward_module, tmp_path):
    """The EOS-appending tokenizer is a copy: the module's own still encodes "ab" as two ids."""
    reward_module.export_pretrained(str(tmp_path / "rm"))
    assert len(reward_module.tokenizer("ab")["input_ids"]) == 2


@pytest.mark.parametrize("kind", ["reward", "sft"])
def test_tokenizer_config_names_a_transformers4_class(kind, byte_tokenizer, tmp_path):
    """transformers 5 saves "TokenizersBackend", unknown to 4.x; the export writes a class 4.46 has."""
    cls = RewardModule if kind == "reward" else SFTModule
    module = cls(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=byte_tokenizer)
    module.configure_model()
    folder = module.export_pretrained(str(tmp_path / kind))
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        name = json.load(f)["tokenizer_class"]
    assert name == "PreTrainedTokenizerFast" and name in TRANSFORMERS4_TOKENIZER_CLASSES
    assert load_tokenizer(folder)("ab:c")["input_ids"] == byte_tokenizer("ab:c")["input_ids"]


def test_lora_adapter_loads_from_another_directory(tmp_path, byte_tokenizer, monkeypatch):
    """A base given as a relative folder is stored absolute: AutoPeftModelForCausalLM loads the adapter after a
    chdir elsewhere, with the same logits as the live model."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoConfig, AutoModelForCausalLM

    repo = tmp_path / "repo"
    repo.mkdir()
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(byte_tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(repo / "base")
    monkeypatch.chdir(repo)
    module = SFTModule(model=ModelSpec(name_or_path="base", lora=LoRASpec(r=2, target_modules=["q_proj"])),
                       tokenizer=byte_tokenizer)
    module.configure_model()
    folder = module.export_pretrained("adapter", merge_lora=False)
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == str(repo / "base")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(repo / "adapter")).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.policy.eval()(input_ids=ids).logits)


def test_hub_id_base_is_kept(tmp_path):
    """A base that is no folder here (a hub id) is written as given."""
    from recipes.modules.export import absolute_adapter_base

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    absolute_adapter_base(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "meta-llama/Llama-2-7b-hf"
