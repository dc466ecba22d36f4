"""Chat-format data: conversations as lists of ``{"role", "content"}`` messages (multi-turn; preference rows whose
``chosen`` / ``rejected`` are such lists, as in the hub's common preference sets), rendered with the tokenizer's chat
template.

The rendering is cut into pieces at message boundaries: each assistant message's rendering (from where the
template's generation prompt ends to its end-of-turn EOS) is an *assistant* piece, everything between (system prompt,
user turns, the template's headers) a *context* piece. Every consumer tokenizes the same pieces the same way, each piece apart (as prompt and
response are tokenized apart everywhere in this project): SFT learns on the assistant pieces only; a preference or
prompt row's prompt is the text before its last assistant piece, so training, PPO scoring and evaluation read the
same ids for the same conversation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from recipes.datamodules.io import DataFormatError

ROLES = ("system", "user", "assistant")


class ChatPiece(NamedTuple):
    """A span of the rendered conversation: its text, and whether the assistant says it (what SFT learns)."""

    text: str
    assistant: bool


def check_messages(value: Any, source: str, row: int, field: str, opens: bool = True) -> list[dict[str, str]]:
    """``value`` as a list of ``{"role", "content"}`` messages, or a `DataFormatError` naming the file, row and
    field (down to the message: ``messages[2].role``) and what to do; ``opens``: it opens a conversation (so it
    cannot start with the assistant)."""
    if not isinstance(value, list) or not value:
        raise DataFormatError(source, row, field, f"is {type(value).__name__} {str(value)[:60]!r}, not a non-empty "
                              "list of messages", 'write it as [{"role": "user", "content": "..."}, ...]')
    messages = []
    for j, message in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataFormatError(source, row, where, f"is {str(message)[:60]!r}, not a message",
                                  'each message is {"role": ..., "content": ...}')
        if message["role"] not in ROLES:
            raise DataFormatError(source, row, f"{where}.role", f"is {message['role']!r}",
                                  f"use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataFormatError(source, row, f"{where}.content", f"is {type(message['content']).__name__}, not "
                                  "text", "write the message's text as a string")
        messages.append({"role": message["role"], "content": message["content"]})
    if opens and messages[0]["role"] == "assistant":
        raise DataFormatError(source, row, f"{field}[0].role", "is 'assistant': a conversation opens with a system "
                              "or user message", "add the user turn the assistant answers")
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool,
            source: str = "", row: int | None = None, field: str = "messages") -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat messages need a tokenizer with a chat template (tokenizer.chat_template); use a chat "
                         "model's tokenizer or set data.chat_template (a Jinja file or its text).")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError, raise_exception() of the template (e.g. roles must alternate)
        raise DataFormatError(source, row, field, f"the chat template refuses it ({type(e).__name__}: {e})",
                              "write the conversation as the template expects (most alternate user and "
                              "assistant after an optional system message)") from e


def set_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> None:
    """Give ``tokenizer`` the chat template ``chat_template``: a Jinja file's path or the template's text (None
    keeps the tokenizer's own)."""
    if chat_template is None:
        return
    path = Path(os.path.expanduser(chat_template))
    if "{" not in chat_template and not path.is_file():
        raise FileNotFoundError(f"chat_template {chat_template!r} is neither a file nor a Jinja template; pass the "
                                "path of a .jinja file or the template's text.")
    tokenizer.chat_template = path.read_text(encoding="utf-8") if "{" not in chat_template else chat_template


def render_pieces(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], source: str = "",
                  row: int | None = None) -> list[ChatPiece]:
    """The conversation as the chat template renders it, cut into context and assistant pieces.

    Assistant message ``i`` is rendered between ``before = render(messages[:i], generation prompt)`` and
    ``render(messages[:i + 1])``. The context before it ends where ``before`` ends, so it is the prompt the model
    reads at generation time (`chat_prompt`). The assistant piece is the template's text from there to the end of the
    content, with the whitespace the template writes before the EOS that ends the turn (Llama-2's ``' ' + content
    + ' ' + eos``); that EOS is the piece's end (`tokenize_pieces` appends it, so SFT learns to stop). The space
    between the generation prompt and the content stays in the piece unless the tokenizer writes it itself (a
    SentencePiece word-start mark: tokenizing the content apart then gives the ids it has after the prompt), so on
    Llama-2 the pieces tokenized apart give the ids of the whole rendering. The rest is context.

    Refused, naming the message: a template for which these renderings are not prefixes of the whole (it rewrites
    earlier turns), or that writes text other than whitespace before an answer which its generation prompt lacks
    (then no piece is the text the model reads before answering). A leading BOS token in the text is dropped when
    the tokenizer adds one itself (when the first piece is tokenized), as for every other prompt."""
    full, pieces, pos = _render(tokenizer, messages, False, source, row), [], 0
    eos = tokenizer.eos_token or ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, source, row)
        through = _render(tokenizer, messages[:i + 1], False, source, row)
        content = message["content"].strip()
        start = through.find(content, len(before)) if content else len(before)
        if not (through.startswith(before) and full.startswith(through)) or len(before) < pos or start < 0:
            raise DataFormatError(source, row, f"messages[{i}]", "does not render as a prefix of the conversation "
                                  "with this chat template (or its content is not in the rendering)", "use a "
                                  "template that renders each turn once (most do), or write single-turn rows")
        gap = through[len(before):start]
        if gap.strip():
            raise DataFormatError(source, row, f"messages[{i}]", f"the chat template writes {gap.strip()!r} before "
                                  "this answer, which its generation prompt (add_generation_prompt) lacks", "use a "
                                  "template whose generation prompt ends where the answer starts")
        end = start + len(content)
        after = through[end:]
        if eos and after.lstrip().startswith(eos):  # the turn ends with EOS: its whitespace is the answer's own
            end += len(after) - len(after.lstrip())
        context = full[pos:len(before)]
        gap = gap if _kept(tokenizer, context, gap, full[start:end]) else ""
        pieces += [ChatPiece(context, False), ChatPiece(gap + full[start:end], True)]
        pos = end + len(eos) if eos and full.startswith(eos, end) else end
    pieces.append(ChatPiece(full[pos:], False))
    pieces[0] = ChatPiece(_without_added_bos(tokenizer, pieces[0].text), False)
    return [p for p in pieces if p.text or p.assistant]


def _kept(tokenizer: PreTrainedTokenizerBase, context: str, gap: str, answer: str) -> bool:
    """Whether the whitespace ``gap`` between a context and an answer belongs to the answer's text: False only when
    the tokenizer writes it itself (the answer tokenized apart gives the ids it has after the context, and with the
    gap it would not)."""
    if not gap or not answer:
        return bool(gap)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    whole, head = enc(context + gap + answer), enc(context)
    return head + enc(gap + answer) == whole or head + enc(answer) != whole


def _without_added_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """``text`` without its leading BOS token when the tokenizer adds one itself (else it would appear twice)."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def tokenize_pieces(tokenizer: PreTrainedTokenizerBase, pieces: list[ChatPiece]) -> tuple[list[int], list[int]]:
    """Token ids of the pieces, each tokenized apart (the first with the tokenizer's special tokens, e.g. BOS; an
    assistant piece followed by EOS, as every response is), and the loss mask: 1 on the assistant pieces' tokens
    (their EOS included). Shapes: two lists of one length."""
    ids, mask = [], []
    for k, piece in enumerate(pieces):
        piece_ids = tokenizer(piece.text, add_special_tokens=k == 0)["input_ids"]
        if piece.assistant:
            piece_ids = piece_ids + [tokenizer.eos_token_id]
        ids += piece_ids
        mask += [int(piece.assistant)] * len(piece_ids)
    return ids, mask


def split_last_turn(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], source: str,
                    row: int, field: str) -> tuple[str, str]:
    """``(prompt, response)`` texts of a conversation that ends with an assistant message: the prompt is what the
    template renders before that message (with its generation prompt, without a leading BOS), the response that
    message's assistant piece (`render_pieces`; the pipelines append EOS after it, as for every response). The same
    pieces SFT learns, so a preference model, DPO and PPO's scoring read what the SFT model writes."""
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(source, row, f"{field}[{len(messages) - 1}].role", f"is {messages[-1]['role']!r}: a "
                              "response row ends with the assistant's message", "end the conversation with it")
    answers = [p for p in render_pieces(tokenizer, messages, source, row) if p.assistant]
    return chat_prompt(tokenizer, messages[:-1], source, row, field), answers[-1].text


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], source: str = "",
                row: int | None = None, field: str = "messages") -> str:
    """The prompt text of a conversation to be answered: its rendering with the template's generation prompt,
    without a leading BOS token when the tokenizer adds it."""
    return _without_added_bos(tokenizer, _render(tokenizer, messages, True, source, row, field))


def preference_conversations(record: dict[str, Any], source: str, row: int) -> tuple[list, list, list]:
    """``(prefix, chosen, rejected)`` message lists of a conversational preference row: either ``chosen`` and
    ``rejected`` are whole conversations sharing everything but their last assistant message (UltraFeedback-style),
    or ``prompt`` holds the conversation and ``chosen`` / ``rejected`` the answers (TRL's conversational format)."""
    for field in ("chosen", "rejected"):
        if field not in record:
            raise DataFormatError(source, row, field, "is missing", "a preference row has chosen and rejected")
    if record.get("prompt") is not None:
        prefix = check_messages(record["prompt"], source, row, "prompt")
        chosen, rejected = (check_messages(record[f], source, row, f, opens=False) for f in ("chosen", "rejected"))
        return prefix, prefix + chosen, prefix + rejected
    chosen, rejected = (check_messages(record[f], source, row, f) for f in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise DataFormatError(source, row, "rejected", "does not share the conversation of 'chosen' up to the last "
                              "message", "give both the same turns before their final assistant answers")
    return chosen[:-1], chosen, rejected
