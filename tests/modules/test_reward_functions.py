"""prompt_response_ids: prompt and response tokenized apart, as in training; the byte tokenizer's ids are those of
the joined text (so the study's learned rewards are unchanged), the Llama-2 ones are not."""

import pytest
import torch

from recipes.modules.reward_functions import SequenceClassifierReward, prompt_response_ids
from tests.conftest import TINY_LLAMA, shared_file


def test_byte_tokenizer_ids_equal_the_joined_text_ones(byte_tokenizer):
    tok = byte_tokenizer
    prompts, responses = ["say hello", "q:", ""], [" world", "Put it", "x"]
    joined = [tok(p + r)["input_ids"] + [tok.eos_token_id] for p, r in zip(prompts, responses)]
    assert prompt_response_ids(tok, prompts, responses) == joined
    assert prompt_response_ids(tok, prompts, responses, append_eos=False) == [row[:-1] for row in joined]


def test_llama_ids_keep_the_response_a_word_start():
    """"Assistant:" then "Put it": the prompt's own ids (with whatever special tokens the tokenizer adds), then
    ▁Put ▁it (ids 12065, 372) and EOS (2); the joined text glues "Put" to the colon instead."""
    from recipes.modules.tokenizer import load_tokenizer

    tok = load_tokenizer(str(shared_file("llama2-tokenizer/tokenizer.model").parent))
    prompt = "\n\nHuman: hi\n\nAssistant:"
    (row,) = prompt_response_ids(tok, [prompt], ["Put it"])
    assert row == tok(prompt)["input_ids"] + [12065, 372, 2]
    assert tok.convert_ids_to_tokens(row[-3:]) == ["▁Put", "▁it", "</s>"]
    joined = tok(prompt + "Put it")["input_ids"]
    assert tok.convert_ids_to_tokens(joined[-2:]) == ["Put", "▁it"]


def test_reward_scores_with_the_byte_tokenizer_are_unchanged(byte_tokenizer, tmp_path):
    """The scores equal the reward model's output on the joined text's ids (what it computed before issue #16)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from recipes.modules.scalar_models import sequence_scores

    cfg = AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(byte_tokenizer), num_labels=1,
                               pad_token_id=byte_tokenizer.pad_token_id)
    rm = AutoModelForSequenceClassification.from_config(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    byte_tokenizer.save_pretrained(tmp_path / "rm")
    prompts, responses = ["ab", "a longer prompt", "c"], ["x", "yy", " z z z z"]
    scores = SequenceClassifierReward(str(tmp_path / "rm"), batch_size=1)(prompts, responses)  # unpadded rows
    for score, p, r in zip(scores, prompts, responses):
        ids = torch.tensor([byte_tokenizer(p + r)["input_ids"] + [byte_tokenizer.eos_token_id]])
        assert torch.equal(score, sequence_scores(rm, ids, torch.ones_like(ids))[0])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        SequenceClassifierReward(str(tmp_path / "rm"))(["a", "b"], ["c"])
