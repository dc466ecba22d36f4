"""Training, PPO scoring and evaluation see the same token ids for the same text: the ids PreferenceDataModule builds
for (prompt, chosen) are the ids SequenceClassifierReward feeds its model, on the real Llama-2 tokenizer, for every
source format (issue #16). Skips cleanly when ../shared/data is absent."""

import pytest

from recipes.datamodules.preference import PreferenceDataModule
from recipes.modules import scalar_models
from recipes.modules.models import ModelSpec
from recipes.modules.reward_functions import SequenceClassifierReward
from recipes.modules.scalar_models import build_scalar_model
from tests.conftest import REPO, TINY_LLAMA, shared_file, write_jsonl

GENERIC = [{"prompt": "How do I boil an egg?", "chosen": "Put it in boiling water.", "rejected": "Eggs exist."},
           {"prompt": "Name a colour.", "chosen": "\nBlue, for one.", "rejected": "  Red"},
           {"prompt": "Say hi.", "chosen": " Hi there!", "rejected": "No."}]


@pytest.fixture
def llama_folder():
    return str(shared_file("llama2-tokenizer/tokenizer.model").parent)


@pytest.fixture
def reward_folder(tmp_path, llama_folder):
    """A tiny random reward model exported with the Llama-2 tokenizer, as RewardModule's export writes it."""
    from recipes.modules.tokenizer import load_tokenizer

    tok = load_tokenizer(llama_folder)
    model = build_scalar_model(ModelSpec(config=dict(TINY_LLAMA)), tok)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    return str(tmp_path / "rm")


def fed_ids(monkeypatch, reward, prompts, responses):
    """The id rows SequenceClassifierReward's model receives (padding removed by the attention mask)."""
    rows, score = [], scalar_models.sequence_scores

    def recording(model, input_ids, attention_mask):
        rows.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return score(model, input_ids, attention_mask)

    monkeypatch.setattr(scalar_models, "sequence_scores", recording)
    reward(prompts, responses)
    return rows


def sources(tmp_path):
    """(source_format, prompt_format, file, extra args): real HH-RLHF rows, the PKU-SafeRLHF fixture, generic rows."""
    hh = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    generic = str(write_jsonl(tmp_path / "generic.jsonl", GENERIC))
    saferlhf = str(REPO / "tests" / "fixtures" / "saferlhf" / "pairs.jsonl")
    return {"hh": ("hh", "hh", str(hh), {"max_rows": 40, "drop_empty": True, "drop_prompt_mismatch": True}),
            "saferlhf": ("saferlhf", "hh", saferlhf, {}),
            "generic-hh": ("generic", "hh", generic, {}),
            "generic-alpaca": ("generic", "alpaca", generic, {}),
            "generic-plain": ("generic", "plain", generic, {})}


@pytest.mark.parametrize("name", ["hh", "saferlhf", "generic-hh", "generic-alpaca", "generic-plain"])
def test_reward_model_sees_the_training_ids(tmp_path, monkeypatch, llama_folder, reward_folder, name):
    source_format, prompt_format, path, extra = sources(tmp_path)[name]
    dm = PreferenceDataModule(tokenizer=llama_folder, data=path, source_format=source_format,
                              prompt_format=prompt_format, max_length=1024, max_prompt_length=512, **extra)
    pairs, margins = dm.read_pairs(path)
    examples = dm.tokenize(pairs, margins, path)
    assert len(examples) == len(pairs) >= 3  # nothing dropped after tokenizing, so rows align
    assert not dm.truncation_counts  # nor truncated: both sides hold whole texts
    trained = [e["prompt_ids"] + e["chosen_ids"] for e in examples]  # chosen_ids end with EOS
    reward = SequenceClassifierReward(reward_folder, batch_size=2)
    assert fed_ids(monkeypatch, reward, [p.prompt for p in pairs], [p.chosen for p in pairs]) == trained
    # the bug this guards against: the joined text tokenizes differently where a response starts without a space
    if name in ("saferlhf", "generic-hh", "generic-alpaca"):
        tok = dm.tokenizer
        joined = [tok(p.prompt + p.chosen)["input_ids"] + [tok.eos_token_id] for p in pairs]
        assert joined != trained


def test_ppo_scores_decoded_responses_with_the_training_ids(tmp_path, monkeypatch, llama_folder, reward_folder):
    """PPO decodes the sampled ids (special tokens skipped, as `score_responses` does) before scoring. Llama's
    decoder drops a response's leading space ("Put" for the trained " Put"), and the reward model still sees the
    training ids: the response is tokenized on its own, where a leading space and none give the same ids."""
    rows = [{"prompt": "How do I boil an egg?", "chosen": " Put it in boiling water.", "rejected": " No."},
            {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."}]
    path = str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    dm = PreferenceDataModule(tokenizer=llama_folder, data=path, source_format="generic", prompt_format="hh")
    pairs, margins = dm.read_pairs(path)
    examples = dm.tokenize(pairs, margins, path)
    decoded = dm.tokenizer.batch_decode([e["chosen_ids"] for e in examples], skip_special_tokens=True)
    assert decoded == ["Put it in boiling water.", "Hi there, friend!"]  # no leading space after decoding
    reward = SequenceClassifierReward(reward_folder)
    fed = fed_ids(monkeypatch, reward, [p.prompt for p in pairs], decoded)
    assert fed == [e["prompt_ids"] + e["chosen_ids"] for e in examples]
    first = dm.tokenizer.convert_ids_to_tokens(fed[0][len(examples[0]["prompt_ids"])])
    assert first == "▁Put"  # a word start, as in training; the joined "Assistant:Put" would give "Put"
