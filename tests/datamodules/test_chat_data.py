"""Chat ``messages`` through the data modules, on the real Llama-2 tokenizer with the fixture's Llama-2 chat template:
SFT learns the assistant turns only, a preference row and a prompt row read the ids SFT learned for the same
conversation (and PPO's reward scoring rebuilds them), SFT and DPO train, and bad rows name the file, row and field."""

import json

import pytest
import torch

from recipes.datamodules.collate import collate_preference, pad_prompt_response
from recipes.datamodules.io import DataFormatError
from recipes.datamodules.preference import PreferenceDataModule
from recipes.datamodules.prompts import PromptDataModule
from recipes.datamodules.sft import SFTDataModule
from recipes.datamodules.unpaired import UnpairedDataModule
from recipes.modules.reward_functions import prompt_response_ids
from tests.conftest import REPO, TINY_LLAMA, quiet_trainer, shared_file, write_jsonl

FIXTURES = REPO / "tests" / "fixtures" / "chat"
TEMPLATE = str(FIXTURES / "llama2_chat_template.jinja")
SFT_ROWS = [json.loads(line) for line in (FIXTURES / "sft_messages.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def llama2():
    """The real Llama-2 tokenizer folder (a bare SentencePiece model; loaded as the project loads it)."""
    return str(shared_file("llama2-tokenizer/tokenizer.model").parent)


def _sft(llama2, data, **kw):
    kw.setdefault("max_length", 256)
    return SFTDataModule(tokenizer=llama2, data=str(data), source_format="messages", chat_template=TEMPLATE,
                         val_fraction=0.0, batch_size=2, **kw)


def _preference(llama2, data, **kw):
    kw.setdefault("max_length", 256)
    return PreferenceDataModule(tokenizer=llama2, data=str(data), source_format="messages", chat_template=TEMPLATE,
                                val_fraction=0.0, batch_size=2, **kw)


def _prompts(llama2, data, **kw):
    return PromptDataModule(tokenizer=llama2, data=str(data), source_format="messages", chat_template=TEMPLATE,
                            rollout_batch_size=1, max_length=256, **kw)


def _pairs_of(conversations):
    """Preference rows whose chosen side is each conversation and whose rejected side answers its last turn 'No.'"""
    return [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "No."}]} for c in conversations]


def test_the_collated_mask_is_one_on_the_assistant_tokens_and_their_eos_only(llama2):
    """Row 1 of the fixture: system + 'Hi there' -> 'Hello!', 'Name a colour.' -> 'Blue.'. The template writes each
    answer as ' ' + content + ' ' + '</s>'; SentencePiece writes the leading space as the word-start mark, so the
    masked tokens are exactly '▁Hello', '!', '▁', '</s>' and '▁Blue', '.', '▁', '</s>'; every other token (the system
    prompt, both user turns, the second turn's '<s>', padding) is 0."""
    dm = _sft(llama2, FIXTURES / "sft_messages.jsonl")
    dm.setup("fit")
    tok = dm.tokenizer
    batch = pad_prompt_response(dm.train_set[:2], tok.pad_token_id)
    ids, mask = batch["input_ids"][0], batch["completion_mask"][0]
    assert tok.convert_ids_to_tokens(ids[mask == 1].tolist()) == \
        ["▁Hello", "!", "▁", "</s>", "▁Blue", ".", "▁", "</s>"]
    context = tok.decode(ids[(mask == 0) & (batch["attention_mask"][0] == 1)].tolist())
    assert context == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]<s>[INST] Name a colour. [/INST]"
    assert tok.convert_ids_to_tokens(batch["input_ids"][1][batch["completion_mask"][1] == 1].tolist()) == \
        ["▁", "4", "▁", "</s>"]  # '4' is a digit: Llama-2 writes the space before it as its own '▁'
    # a row without a loss mask (every other format) still collates its whole response
    plain = pad_prompt_response([{"prompt_ids": [5, 6], "response_ids": [7, 8]}], 0)
    assert plain["completion_mask"].tolist() == [[0, 0, 1, 1]]


def test_a_preference_row_reads_the_ids_sft_learns_for_the_conversation(llama2, tmp_path):
    """For every fixture conversation, prompt + chosen ids of its preference row are the SFT example's ids, the
    chosen ids its last answer (+ EOS); PPO's reward scoring (prompt_response_ids on the texts) rebuilds them."""
    sft = _sft(llama2, FIXTURES / "sft_messages.jsonl")
    sft.setup("fit")
    pref = _preference(llama2, write_jsonl(tmp_path / "pairs.jsonl", _pairs_of([r["messages"] for r in SFT_ROWS])))
    pref.setup("fit")
    assert len(sft.train_set) == len(pref.train_set) == 4
    for s, p in zip(sft.train_set, pref.train_set):
        assert p["prompt_ids"] + p["chosen_ids"] == s["prompt_ids"] + s["response_ids"]
        assert s["loss_mask"][-len(p["chosen_ids"]):] == [1] * len(p["chosen_ids"])
    tok = pref.tokenizer
    texts = pref.read_pairs(str(tmp_path / "pairs.jsonl"))[0]
    assert texts[0].chosen == " Blue. " and texts[0].rejected == " No. "
    scored = prompt_response_ids(tok, [t.prompt for t in texts], [t.chosen for t in texts])
    assert scored == [p["prompt_ids"] + p["chosen_ids"] for p in pref.train_set]


def test_the_prompt_module_reads_the_preference_prompt_ids(llama2, tmp_path):
    """A conversation up to its last user turn (and the same conversation with its answer) as a prompt row gives
    the prompt ids and text of the preference row for that conversation."""
    conversations = [r["messages"] for r in SFT_ROWS]
    pref = _preference(llama2, write_jsonl(tmp_path / "pairs.jsonl", _pairs_of(conversations)))
    pref.setup("fit")
    texts = pref.read_pairs(str(tmp_path / "pairs.jsonl"))[0]
    for rows in ([{"messages": c[:-1], "id": k} for k, c in enumerate(conversations)],
                 [{"messages": c} for c in conversations]):
        prompts = _prompts(llama2, write_jsonl(tmp_path / "prompts.jsonl", rows))
        prompts.setup("fit")
        assert [r["input_ids"] for r in prompts.train_set] == [p["prompt_ids"] for p in pref.train_set]
        assert [r["prompt"] for r in prompts.train_set] == [t.prompt for t in texts]
    assert prompts.train_set[0]["metadata"] == {}
    first = _prompts(llama2, write_jsonl(tmp_path / "p.jsonl", [{"messages": conversations[0][:-1], "id": 7}]))
    first.setup("fit")
    assert first.train_set[0]["metadata"] == {"id": 7}  # the other fields go to the reward


def test_both_preference_layouts_and_the_unpaired_module(llama2):
    """The fixture has whole conversations (rows 1, 3) and TRL's prompt + answers (rows 2, 4); KTO's module turns
    each pair into a desirable and an undesirable row with the same ids."""
    pref = _preference(llama2, FIXTURES / "preference_messages.jsonl")
    pref.setup("fit")
    tok = pref.tokenizer
    decoded = [(tok.decode(e["prompt_ids"]), tok.decode(e["chosen_ids"]), tok.decode(e["rejected_ids"]))
               for e in pref.train_set]
    assert decoded == [  # the tokenizer adds no BOS: the template's '<s>' text is the BOS token
        ("<s>[INST] Hi there [/INST] Hello! </s><s>[INST] Name a colour. [/INST]", "Blue. </s>", "I will not. </s>"),
        ("<s>[INST] What is 2+2? [/INST]", "4 </s>", "5 </s>"), ("<s>[INST] Say yes [/INST]", "Yes </s>", "No </s>"),
        ("<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nRate me [/INST]", "You did well. </s>", "Bad. </s>")]
    kto = UnpairedDataModule(tokenizer=pref.hparams.tokenizer, data=str(FIXTURES / "preference_messages.jsonl"),
                             source_format="messages", chat_template=TEMPLATE, val_fraction=0.0, batch_size=2,
                             max_length=256)
    kto.setup("fit")
    by_completion = {tuple(e["completion_ids"]): (e["prompt_ids"], e["label"]) for e in kto.train_set}
    for e in pref.train_set:
        assert by_completion[tuple(e["chosen_ids"])] == (e["prompt_ids"], True)
        assert by_completion[tuple(e["rejected_ids"])] == (e["prompt_ids"], False)


def test_sft_on_conversations_trains_with_the_loss_on_assistant_tokens_only(llama2):
    """The module's loss is the mean NLL of exactly the masked tokens (computed here from the logits), and 3
    optimizer steps change the weights."""
    from recipes.modules.models import ModelSpec
    from recipes.modules.sft import SFTModule

    data = _sft(llama2, FIXTURES / "sft_messages.jsonl")
    data.setup("fit")
    module = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    module.configure_model()
    batch = data.collate(data.train_set[:2])
    with torch.no_grad():
        logprobs = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs = logprobs[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        targets = batch["completion_mask"][:, 1:].bool()
        expected = -logprobs[targets].mean()
        loss, tokens = module._nll(batch)
    assert int(tokens) == int(targets.sum()) == 8 + 4  # row 1: two answers of 4 tokens; row 2: one of 4
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(module, data)
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())


def test_dpo_trains_on_conversational_pairs(llama2):
    from recipes.modules.dpo import DPOModule
    from recipes.modules.models import ModelSpec

    data = _preference(llama2, FIXTURES / "preference_messages.jsonl")
    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer, cache_reference=False,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, data)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    batch = collate_preference(data.train_set[:2], data.tokenizer.pad_token_id)
    assert batch["completion_mask"][0].sum() == len(data.train_set[0]["chosen_ids"])  # the last answer + EOS


def test_truncated_conversations_are_cut_and_counted(llama2, caplog):
    """max_length 24: row 1 (46 tokens) keeps its first 12 prompt tokens and the first 12 of the rest; its mask
    is cut with it. Every row over the budget is counted."""
    dm = _sft(llama2, FIXTURES / "sft_messages.jsonl", max_length=24)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    first = dm.train_set[0]
    assert len(first["prompt_ids"]) == 12 and len(first["response_ids"]) == len(first["loss_mask"]) == 12
    assert first["loss_mask"][:4] == [1, 1, 1, 1] and first["loss_mask"][4:] == [0] * 8
    path = str(FIXTURES / "sft_messages.jsonl")
    assert dm.counts[f"{path}: had the prompt truncated from the left"] == 1
    assert dm.counts[f"{path}: had the conversation truncated from the right (its last EOS not learned)"] == 2
    assert "2 of 4 rows had the conversation truncated from the right" in caplog.text


def test_messages_after_the_last_answer_are_left_out_and_counted(llama2, tmp_path):
    rows = [{"messages": SFT_ROWS[1]["messages"] + [{"role": "user", "content": "Thanks"}]}]
    dm = _sft(llama2, write_jsonl(tmp_path / "d.jsonl", rows))
    dm.setup("fit")
    tok = dm.tokenizer
    assert tok.decode(dm.train_set[0]["response_ids"]) == "4 </s>"
    assert dm.counts[f"{tmp_path / 'd.jsonl'}: had messages after the last assistant message (no loss on them: "
                     "left out)"] == 1


@pytest.mark.parametrize("make, rows, match", [
    (_sft, [SFT_ROWS[1], {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}],
     r"d.jsonl, row 2, field 'messages\[1\].role': is 'bot'"),
    (_sft, [SFT_ROWS[1], {"conversation": []}], r"d.jsonl, row 2, field 'messages': has no value"),
    (_sft, [{"messages": [{"role": "user", "content": "hi"}]}], r"d.jsonl, row 1, field 'messages': has no assistant"),
    (_sft, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
     r"d.jsonl, row 1, field 'messages\[1\].content': is an empty answer"),
    (_sft, [{"messages": [{"role": "user", "content": "a"}] + [{"role": "assistant", "content": "b"}] * 2}],
     r"d.jsonl, row 1, field 'messages': the chat template refuses it"),
    (_preference, [{"chosen": SFT_ROWS[1]["messages"], "rejected": SFT_ROWS[3]["messages"]}],
     r"d.jsonl, row 1, field 'rejected': does not share the conversation"),
    (_preference, [{"chosen": SFT_ROWS[1]["messages"], "rejected": SFT_ROWS[1]["messages"][:1] * 2}],
     r"d.jsonl, row 1, field 'rejected\[1\].role': is 'user': a response row ends with the assistant"),
    (_preference, [{"prompt": "hi", "chosen": [], "rejected": []}],
     r"d.jsonl, row 1, field 'prompt': is str 'hi', not a non-empty list of messages"),
    (_prompts, [{"messages": [{"role": "user", "content": 3}]}],
     r"d.jsonl, row 1, field 'messages\[0\].content': is int, not text"),
])
def test_bad_rows_name_the_file_row_and_field(llama2, tmp_path, make, rows, match):
    with pytest.raises(DataFormatError, match=match):
        make(llama2, write_jsonl(tmp_path / "d.jsonl", rows)).setup("fit")


def test_empty_answers_can_be_dropped_with_a_count(llama2, tmp_path):
    rows = [SFT_ROWS[1], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    dm = _sft(llama2, write_jsonl(tmp_path / "d.jsonl", rows), drop_empty=True)
    dm.setup("fit")
    assert len(dm.train_set) == 1 and dm.counts[f"{tmp_path / 'd.jsonl'}: dropped: an empty assistant message"] == 1


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    dm = SFTDataModule(data=str(FIXTURES / "sft_messages.jsonl"), source_format="messages", val_fraction=0.0)
    with pytest.raises(ValueError, match=r"chat template .* set data.chat_template"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="neither a file nor a Jinja template"):
        SFTDataModule(chat_template=str(tmp_path / "missing.jinja"))
