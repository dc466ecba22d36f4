"""RankingDataModule: sorting, ties, drops and truncation with counts, the three sources, (B, k, T) collation, bad
input named by file, row and field, exact resume."""

import logging
from types import SimpleNamespace

import pytest
import torch

from recipes.datamodules.collate import collate_ranking
from recipes.datamodules.io import DataFormatError
from recipes.datamodules.ranking import RankingDataModule, builtin_ranking_rows
from tests.conftest import shared_file, write_jsonl


def _dm(path, **kw):
    kw.setdefault("max_length", 64)
    return RankingDataModule(tokenizer="builtin:byte", data=str(path), val_fraction=0.0, batch_size=2, **kw)


def _decoded(dm, example):
    return [dm.tokenizer.decode(r[:-1]) for r in example["response_ids"]]  # without the EOS


def test_builtin_rows_follow_the_rule():
    """Score = fraction of letters in the asked case: 1 for the asked case, 0 for the other, in between for the mix."""
    for row in builtin_ranking_rows(50):
        word = row["prompt"].split()[1]
        asked = word.upper() if "capital" in row["prompt"] else word
        for response, score in zip(row["responses"], row["scores"]):
            assert score == round(sum(a == b for a, b in zip(response, asked)) / len(word), 4)
        assert min(row["scores"]) == 0.0 and max(row["scores"]) == 1.0 and len(set(row["scores"])) == 3


def test_sorted_by_score_ties_kept_in_file_order_and_counted(tmp_path, caplog):
    rows = [{"prompt": "p", "responses": ["c", "a", "b", "d"], "scores": [0.0, 2.0, 1.0, 1.0]}]
    dm = _dm(write_jsonl(tmp_path / "r.jsonl", rows))
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    (example,) = dm.train_set
    assert _decoded(dm, example) == ["a", "b", "d", "c"] and example["scores"] == [2.0, 1.0, 1.0, 0.0]
    assert dm.counts["had tied scores (kept in file order)"] == 1
    assert "1 of 1 rows had tied scores" in caplog.text


def test_rows_without_two_distinct_responses_are_dropped_with_counts(tmp_path):
    rows = [{"prompt": "p", "responses": ["x"], "scores": [1.0]},                     # one response
            {"prompt": "p", "responses": ["x", "x"], "scores": [1.0, 0.0]},           # one distinct response
            {"prompt": "p", "responses": ["x", "y"], "scores": [1.0, 1.0]},           # no score order
            {"prompt": "p", "responses": ["x", "y", "x"], "scores": [0.0, 1.0, 2.0]}]  # kept: x (2), y (1)
    dm = _dm(write_jsonl(tmp_path / "r.jsonl", rows))
    dm.setup("fit")
    assert len(dm.train_set) == 1 and _decoded(dm, dm.train_set[0]) == ["x", "y"]
    assert dm.train_set[0]["scores"] == [2.0, 1.0]
    assert dm.counts["dropped: fewer than 2 distinct responses with different scores"] == 3
    assert dm.counts["had a repeated response (the lower-scored copy was removed)"] == 2


def test_pairs_and_hh_become_k2_scored_1_and_0(tmp_path):
    pairs = _dm(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]),
                source_format="pairs")
    pairs.setup("fit")
    assert _decoded(pairs, pairs.train_set[0]) == ["good", "bad"] and pairs.train_set[0]["scores"] == [1.0, 0.0]
    history = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    hh = _dm(write_jsonl(tmp_path / "h.jsonl", [{"chosen": history + " yes", "rejected": history + " no"}]),
             source_format="hh", max_length=128)
    hh.setup("fit")
    (example,) = hh.train_set
    assert hh.tokenizer.decode(example["prompt_ids"]) == history
    assert _decoded(hh, example) == [" yes", " no"] and example["scores"] == [1.0, 0.0]


def test_prompt_cut_from_the_left_and_responses_from_the_right_are_counted(tmp_path):
    """max_length 12, max_prompt_length 6: the 10-byte prompt keeps its last 6 bytes; 6 bytes are left for each
    response + EOS, so 'abcdefghij' keeps 'abcdef' (no EOS) and 'xy' keeps 'xy' + EOS."""
    rows = [{"prompt": "0123456789", "responses": ["xy", "abcdefghij"], "scores": [1.0, 0.0]}]
    dm = _dm(write_jsonl(tmp_path / "r.jsonl", rows), max_length=12, max_prompt_length=6)
    dm.setup("fit")
    (example,) = dm.train_set
    assert dm.tokenizer.decode(example["prompt_ids"]) == "456789"
    assert [dm.tokenizer.decode(r) for r in example["response_ids"]] == ["xy</s>", "abcdef"]
    assert dm.counts["had the prompt truncated from the left"] == 1
    assert dm.counts["had a response truncated from the right (no EOS learned)"] == 1


def test_collate_pads_rows_to_the_largest_k():
    examples = [{"prompt_ids": [5, 6], "response_ids": [[7, 2], [8, 9, 2], [10, 2]], "scores": [2.0, 1.0, 0.0]},
                {"prompt_ids": [5], "response_ids": [[11, 2], [12, 2]], "scores": [1.0, 0.0]}]
    batch = collate_ranking(examples, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 3, 5) and batch["scores"].shape == (2, 3)
    assert batch["response_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["input_ids"][0, 1].tolist() == [5, 6, 8, 9, 2]
    assert batch["completion_mask"][0, 1].tolist() == [0, 0, 1, 1, 1]
    assert batch["attention_mask"][1, 2].sum() == 0 and batch["scores"][1].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("row, field, problem", [
    ({"prompt": "p", "scores": [1.0, 0.0]}, "responses", "has no value"),  # the other row has it: datasets fills None
    ({"prompt": "p", "responses": ["a", "b"]}, "scores", "has no value"),
    ({"prompt": "p", "responses": "ab", "scores": [1.0, 0.0]}, "responses", "expected a list, got str"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}, "scores", "has 1 entries for 2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, "high"]}, r"scores\[1\]", "expected a number"),
], ids=["no-responses", "no-scores", "responses-not-list", "length-mismatch", "score-not-number"])
def test_bad_ranking_rows_name_file_row_and_field(tmp_path, row, field, problem):
    good = {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl, row 2, field '{field}': {problem}"):
        _dm(path).setup("fit")


def test_non_json_row_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, "{oops"])
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 2: is not JSON"):
        _dm(path).setup("fit")


def test_hh_prompt_mismatch_names_the_row_or_is_dropped_with_a_count(tmp_path):
    ok = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: b"}
    path = write_jsonl(tmp_path / "hh.jsonl", [ok, bad])
    with pytest.raises(DataFormatError, match=r"hh.jsonl, row 2, field 'rejected': its prompt .* differs"):
        _dm(path, source_format="hh").setup("fit")
    dm = _dm(path, source_format="hh", drop_prompt_mismatch=True)
    dm.setup("fit")
    assert len(dm.train_set) == 1 and dm.counts["dropped: chosen and rejected prompts differ"] == 1


def test_real_hh_harmless_test_file_reads_as_k2():
    path = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    dm = _dm(path, source_format="hh", max_length=256, max_rows=200, drop_empty=True, drop_prompt_mismatch=True)
    dm.setup("fit")
    assert len(dm.train_set) > 150
    assert all(e["scores"] == [1.0, 0.0] and len(e["response_ids"]) == 2 for e in dm.train_set)


def test_exact_resume_skips_the_consumed_batches():
    """Consume 3 of 5 batches, save the state, restore it into a fresh module: its loader yields batches 4 and 5."""
    trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    first = RankingDataModule(max_rows=11, batch_size=2, val_fraction=0.1)
    first.trainer = trainer
    first.setup("fit")
    batches = []
    for batch in first.train_dataloader():
        batches.append(first.on_before_batch_transfer(batch, 0))
        if len(batches) == 3:
            state = first.state_dict()
    assert len(batches) == 5 and state == {"consumed_batches": 3}
    resumed = RankingDataModule(max_rows=11, batch_size=2, val_fraction=0.1)
    resumed.trainer = trainer
    resumed.setup("fit")
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == 2
    for a, b in zip(rest, batches[3:]):
        assert torch.equal(a["input_ids"], b["input_ids"])
