"""Chat-format messages on the real Llama-2 tokenizer with the Llama-2 chat template: the rendering cut into
context and assistant pieces, the loss mask on assistant tokens only, the prompt/response split of the last turn,
and errors that name the row and the message."""

import pytest

from recipes.datamodules.chat import (
    ChatPiece,
    check_messages,
    preference_conversations,
    render_pieces,
    split_last_turn,
    tokenize_pieces,
)
from recipes.datamodules.io import DataFormatError
from tests.conftest import REPO, shared_file

TEMPLATE = (REPO / "tests" / "fixtures" / "chat" / "llama2_chat_template.jinja").read_text()
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}]


@pytest.fixture(scope="module")
def llama2_chat():
    """The real Llama-2 tokenizer as meta-llama ships it (it adds BOS), with the Llama-2 chat template."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(shared_file("llama2-tokenizer/tokenizer.model").parent, add_bos_token=True)
    tok.chat_template = TEMPLATE
    return tok


def test_pieces_cut_the_rendering_at_the_assistant_messages(llama2_chat):
    """The template writes '<s>[INST] <<SYS>>\\nBe brief.\\n<</SYS>>\\n\\nHi there [/INST] Hello! </s><s>[INST] ...';
    the pieces are that text without the leading BOS: each context ends where the generation prompt ends (' [/INST]'),
    each answer is ' ' + its content + ' ' as the template writes it, and the '</s>' after it its end (tokenize_pieces
    appends EOS)."""
    assert render_pieces(llama2_chat, CONVERSATION) == [
        ChatPiece("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]", False), ChatPiece(" Hello! ", True),
        ChatPiece("<s>[INST] Name a colour. [/INST]", False), ChatPiece(" Blue. ", True)]


def test_the_loss_mask_covers_each_answer_and_its_eos_only(llama2_chat):
    """Ids: BOS + the first context, 'Hello! ' + EOS, the second context (its '<s>' text is BOS), 'Blue. ' + EOS;
    the mask is 1 exactly on the two answers' tokens and their EOS (tokenized here independently), and the ids are
    those of the whole rendering tokenized at once (SentencePiece writes the space before each answer itself)."""
    ids, mask = tokenize_pieces(llama2_chat, render_pieces(llama2_chat, CONVERSATION))
    enc = lambda text: llama2_chat(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first, second = enc("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]"), enc("<s>[INST] Name a colour. [/INST]")
    hello, blue, eos = enc("Hello! "), enc("Blue. "), llama2_chat.eos_token_id
    assert llama2_chat.convert_ids_to_tokens(hello) == ["▁Hello", "!", "▁"]  # the template's ' ' before EOS
    assert ids == [llama2_chat.bos_token_id] + first + hello + [eos] + second + blue + [eos]
    assert mask == [0] * (1 + len(first)) + [1] * (len(hello) + 1) + [0] * len(second) + [1] * (len(blue) + 1)
    assert second[0] == llama2_chat.bos_token_id  # the second turn's '<s>' text is the BOS token
    assert [i for i, m in zip(ids, mask) if m] == hello + [eos] + blue + [eos]
    assert ids == llama2_chat(llama2_chat.apply_chat_template(CONVERSATION, tokenize=False)[len("<s>"):])["input_ids"]


def test_the_last_turn_splits_into_the_prompt_and_the_answer(llama2_chat):
    """The prompt is everything before the last answer as the template renders it with its generation prompt (no
    leading BOS); the response is that answer's piece: the ids SFT learned for the whole conversation are the
    prompt's ids followed by the response's (+ EOS), as the preference and PPO pipelines build them."""
    prompt, response = split_last_turn(llama2_chat, CONVERSATION, "f.jsonl", 0, "messages")
    assert prompt == ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] Name a colour. "
                      "[/INST]")
    assert response == " Blue. "
    ids, mask = tokenize_pieces(llama2_chat, render_pieces(llama2_chat, CONVERSATION))
    answer = llama2_chat(response, add_special_tokens=False)["input_ids"] + [llama2_chat.eos_token_id]
    assert ids == llama2_chat(prompt)["input_ids"] + answer and mask[-len(answer):] == [1] * len(answer)


def test_a_template_writing_its_own_header_after_the_prompt_is_refused(llama2_chat):
    """A template whose generation prompt lacks the assistant header it writes before an answer: the prompt of
    PPO and evaluation would not be the text SFT trained after."""
    from copy import deepcopy

    tok = deepcopy(llama2_chat)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<bot>{% endif %}{{ m['content'] }}"
                         "{% endfor %}")
    with pytest.raises(DataFormatError, match=r"d.jsonl, row 2, field 'messages\[1\]': the chat template writes "
                       r"'<bot>' before this answer"):
        render_pieces(tok, CONVERSATION[1:3], "d.jsonl", 1)


def test_a_template_error_names_the_row(llama2_chat):
    with pytest.raises(DataFormatError, match=r"d.jsonl, row 4, field 'messages': the chat template refuses it "
                       r".*alternate"):
        render_pieces(llama2_chat, [CONVERSATION[1], CONVERSATION[1]], "d.jsonl", 3)


def test_preference_rows_in_both_conversational_layouts(llama2_chat):
    whole = {"chosen": CONVERSATION, "rejected": CONVERSATION[:-1] + [{"role": "assistant", "content": "No."}]}
    prefix, chosen, rejected = preference_conversations(whole, "p.jsonl", 0)
    assert prefix == CONVERSATION[:-1] and chosen == CONVERSATION and rejected[-1]["content"] == "No."
    split = {"prompt": CONVERSATION[:2], "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}
    prefix, chosen, rejected = preference_conversations(split, "p.jsonl", 1)
    assert prefix == CONVERSATION[:2] and chosen == CONVERSATION[:3] and rejected[-1]["content"] == "Go away."
    with pytest.raises(DataFormatError, match=r"p.jsonl, row 3, field 'rejected': does not share the conversation"):
        other = [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]
        preference_conversations({"chosen": CONVERSATION, "rejected": other}, "p.jsonl", 2)


@pytest.mark.parametrize("value, match", [
    ("hi", r"row 5, field 'messages': is str 'hi', not a non-empty list of messages"),
    ([{"role": "robot", "content": "x"}], r"field 'messages\[0\].role': is 'robot'. use one of system, user"),
    ([{"role": "user", "content": 5}], r"field 'messages\[0\].content': is int, not text"),
    ([{"role": "user"}], r"field 'messages\[0\]': is .* not a message"),
    ([{"role": "assistant", "content": "x"}], r"field 'messages\[0\].role': is 'assistant': a conversation opens"),
])
def test_bad_messages_name_the_row_and_the_message(value, match):
    with pytest.raises(DataFormatError, match=match):
        check_messages(value, "d.jsonl", 4, "messages")


def test_a_response_row_must_end_with_the_assistant(llama2_chat):
    with pytest.raises(DataFormatError, match=r"field 'messages\[1\].role': is 'user'"):
        split_last_turn(llama2_chat, CONVERSATION[:2], "d.jsonl", 0, "messages")
