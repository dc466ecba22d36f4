"""SFTDataModule: formats, response-only masks, truncation counts, bad input errors, the resumable sampler."""

import gzip
import json
import logging

import pytest

from recipes.datamodules.collate import pad_prompt_response, truncate_pair
from recipes.datamodules.formats import alpaca_prompt, format_prompt, hh_prompt, split_hh_dialogue
from recipes.datamodules.io import DataFormatError
from recipes.datamodules.sampler import ResumableSampler
from recipes.datamodules.sft import SFTDataModule
from tests.conftest import shared_file, write_jsonl


def _dm(path, **kw):
    kw.setdefault("max_length", 128)
    return SFTDataModule(tokenizer="builtin:byte", data=str(path), val_fraction=0.0, batch_size=2, **kw)


def test_alpaca_template_with_and_without_input():
    assert alpaca_prompt("Add.", "2 3").endswith("### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n")
    assert "### Input" not in alpaca_prompt("Say hi.")


def test_hh_format_and_split():
    assert hh_prompt("Hi") == "\n\nHuman: Hi\n\nAssistant:"
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    prompt, response = split_hh_dialogue(text)
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" and response == " d"
    assert split_hh_dialogue("no assistant") is None


def test_chat_format_needs_a_template(byte_tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("hi", "chat", byte_tokenizer)


def test_response_only_mask_and_eos(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Echo.", "input": "", "output": "ab"}])
    dm = _dm(path, prompt_format="plain")
    dm.setup("fit")
    ex = dm.train_set[0]
    tok = dm.tokenizer
    assert tok.decode(ex["prompt_ids"]) == "Echo." and ex["response_ids"] == tok("ab").input_ids + [tok.eos_token_id]
    batch = pad_prompt_response([ex, ex], tok.pad_token_id)
    assert batch["completion_mask"][0].tolist() == [0] * 5 + [1] * 3


def test_truncation_is_counted_and_logged(tmp_path, caplog):
    rows = [{"instruction": "x" * 100, "output": "y" * 100}, {"instruction": "q", "output": "r"}]
    dm = _dm(write_jsonl(tmp_path / "d.jsonl", rows), prompt_format="plain", max_length=64, max_prompt_length=16)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    lengths = [len(e["prompt_ids"]) + len(e["response_ids"]) for e in dm.train_set]
    assert max(lengths) == 64 and len(dm.train_set[0]["prompt_ids"]) == 16
    assert "1 of 2 rows had the prompt truncated" in caplog.text
    assert "1 of 2 rows had the response truncated" in caplog.text


def test_a_budget_that_cuts_every_response_is_an_error_with_the_counts(tmp_path):
    rows = [{"instruction": "q", "output": "y" * 40} for _ in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"d.jsonl.*every one of its 5 rows cut by max_length=16 tokens"
                                              r".*'had the response truncated from the right \(no EOS learned\)': 5"
                                              r".*raise data.max_length"):
        _dm(path, prompt_format="plain", max_length=16, max_prompt_length=8).setup("fit")
    _dm(path, prompt_format="plain", max_length=64, max_prompt_length=8).setup("fit")  # EOS fits: no error


def test_a_budget_that_cuts_every_conversation_is_an_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 40}]}] * 3
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    dm = SFTDataModule(tokenizer="builtin:byte", data=str(path), val_fraction=0.0, batch_size=2,
                       source_format="messages", chat_template="{% for m in messages %}{{ m['content'] }}"
                       "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}",
                       max_length=16, max_prompt_length=8)
    with pytest.raises(DataFormatError, match=r"c.jsonl.*every one of its 3 rows cut by max_length=16"):
        dm.setup("fit")


def test_truncate_pair_left_prompt_right_response():
    p, r, pc, rc = truncate_pair([1, 2, 3, 4], [5, 6, 7], max_length=4, max_prompt_length=2)
    assert (p, r, pc, rc) == ([3, 4], [5, 6], True, True)


@pytest.mark.parametrize("row, field", [({"instruction": "a"}, "output"), ({"output": "b"}, "instruction"),
                                        ({"instruction": "a", "output": "  "}, "output")])
def test_bad_rows_name_file_row_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, row])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl, row 2, field '{field}'"):
        _dm(path).setup("fit")


def test_non_json_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"instruction": "a", "output": "b"}, "{not json"])
    with pytest.raises(DataFormatError, match=r"broken.jsonl, line 2: is not JSON"):
        _dm(path).setup("fit")


def test_hh_chosen_source(tmp_path):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    dm = _dm(write_jsonl(tmp_path / "hh.jsonl", [row]), source_format="hh_chosen")
    dm.setup("fit")
    assert dm.tokenizer.decode(dm.train_set[0]["response_ids"][:-1]) == " hello"
    bad = write_jsonl(tmp_path / "hhbad.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: "}])
    with pytest.raises(DataFormatError, match="row 1, field 'chosen'"):
        _dm(bad, source_format="hh_chosen").setup("fit")


def test_hh_chosen_honours_drop_empty_with_a_count(tmp_path, caplog):
    """An empty final chosen response is an error naming the row by default, and a logged, counted drop with
    ``drop_empty`` (it used to be an error either way, so SFT could not run on the real HH file)."""
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    empty = {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, empty, good])
    with pytest.raises(DataFormatError, match=r"hh.jsonl, row 2, field 'chosen': has an empty final assistant "
                                              r"response\. remove the row, or set drop_empty: true"):
        _dm(path, source_format="hh_chosen").setup("fit")
    dm = _dm(path, source_format="hh_chosen", drop_empty=True)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 2
    assert "1 of 3 rows dropped: empty 'chosen'" in caplog.text
    assert dm.counts == {f"{path}: dropped: empty 'chosen'": 1}


def test_sft_on_the_real_hh_file_drops_its_four_empty_responses(caplog):
    """The HH-RLHF harmless-base test split: 2,312 rows, 4 with an empty chosen response (0-based 86, 516, 925,
    1103; messages count from 1)."""
    path = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    kw = dict(tokenizer="builtin:byte", data=str(path), source_format="hh_chosen", max_length=256, batch_size=4,
              val_fraction=0.0)
    with pytest.raises(DataFormatError, match="row 87, field 'chosen': has an empty final assistant response"):
        SFTDataModule(**kw).setup("fit")
    dm = SFTDataModule(drop_empty=True, **kw)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) == 2312 - 4
    assert "4 of 2312 rows dropped: empty 'chosen'" in caplog.text


def test_missing_data_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="local file path"):
        _dm(tmp_path / "nope.jsonl").setup("fit")


def test_real_alpaca_rows_load(caplog):
    """The real file has two rows with an empty output (0-based 2335 and 4658; rows 2336 and 4659 in messages, which
    count from 1): an error by default, a count on request."""
    path = shared_file("alpaca/alpaca_5000.json.gz")
    with gzip.open(path, "rt") as f:
        rows = json.load(f)
    empty = [i for i, r in enumerate(rows) if not r["output"].strip()]
    assert len(rows) == 5000 and empty == [2335, 4658]
    kw = dict(tokenizer="builtin:byte", data=str(path), max_length=2048, batch_size=4, val_fraction=0.02)
    with pytest.raises(DataFormatError, match="row 2336, field 'output': is empty"):
        SFTDataModule(**kw).setup("fit")
    dm = SFTDataModule(drop_empty=True, **kw)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 4998
    assert "2 of 5000 rows dropped: empty 'output'" in caplog.text


def test_real_llama2_tokenizer_ids_and_round_trip():
    from recipes.modules.tokenizer import load_tokenizer

    tok = load_tokenizer(str(shared_file("llama2-tokenizer/tokenizer.model")))
    assert tok("Hello").input_ids[-1] == 15043 and len(tok) == 32000
    assert tok.pad_token == "<unk>" and tok.eos_token_id == 2
    text = "\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_resumable_sampler_skips_and_shards():
    data = list(range(10))
    full = list(ResumableSampler(data, seed=3))
    s = ResumableSampler(data, seed=3)
    s.skip(4)
    assert list(s) == full[4:] and list(s) == full  # the skip applies to one iteration only
    assert len(s) == 10
    r0, r1 = (list(ResumableSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1))
    assert sorted(r0 + r1) == data


def test_chat_template_format(byte_tokenizer):
    byte_tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert format_prompt("hi", "chat", byte_tokenizer) == "<|user|>hi<|assistant|>"
