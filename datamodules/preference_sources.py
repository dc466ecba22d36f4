"""Format adapters for preference data: each turns one raw record into ``(prompt, chosen, rejected)`` texts.

HH-RLHF raw dialogues, PKU-SafeRLHF (with the paper's safe-then-helpful rule and a safe-responses-only SFT view),
generic ``{prompt, chosen, rejected}`` rows and conversational rows (``messages``: chat message lists, rendered with
the tokenizer's chat template). Errors name the file, the row and the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from transformers import PreTrainedTokenizerBase

from recipes.datamodules.chat import preference_conversations, split_last_turn
from recipes.datamodules.formats import HUMAN, PromptFormat, format_prompt, split_hh_dialogue
from recipes.datamodules.io import DataFormatError, DropCounter, EmptyFieldError, require_text, require_value

PreferenceFormat = Literal["hh", "saferlhf", "generic", "messages"]


class PreferenceText(NamedTuple):
    """One preference pair as text: a shared prompt and two responses that each follow it verbatim."""

    prompt: str
    chosen: str
    rejected: str


class PromptMismatchError(DataFormatError):
    """The two dialogues of an HH-RLHF pair do not share their history up to the last assistant turn."""


def _check_response(text: str, source: str, row: int, field: str) -> str:
    if not text.strip():
        raise EmptyFieldError(source, row, field, "has an empty final assistant response",
                              "remove the row, or set drop_empty: true to drop such rows with a count")
    return text


def hh_pair(record: Mapping[str, Any], source: str, row: int) -> PreferenceText:
    """HH-RLHF raw row (``chosen``/``rejected`` full dialogues) -> shared prompt (multi-turn history kept, ending in
    ``\\n\\nAssistant:``) and the two final responses (leading space kept, so ``prompt + chosen`` is the dialogue).

    Each dialogue is split at its last ``\\n\\nAssistant:``; when the two prompts differ (in the real data, a
    response that itself contains ``\\n\\nAssistant:``) this raises `PromptMismatchError`."""
    parts = {}
    for field in ("chosen", "rejected"):
        dialogue = require_text(record, field, source, row)
        split = split_hh_dialogue(dialogue)
        if split is None or not dialogue.lstrip("\n").startswith(HUMAN.strip()):
            raise DataFormatError(source, row, field,
                                  "is not an HH dialogue ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
        parts[field] = split
    (prompt, chosen), (other_prompt, rejected) = parts["chosen"], parts["rejected"]
    if prompt != other_prompt:
        at = next(i for i, (a, b) in enumerate(zip(prompt + "\0", other_prompt + "\1")) if a != b)
        raise PromptMismatchError(
            source, row, "rejected",
            f"its prompt (history up to the last '\\n\\nAssistant:') differs from the chosen one at character {at}",
            "fix the row, or set drop_prompt_mismatch: true to drop such pairs with a count")
    return PreferenceText(prompt, _check_response(chosen, source, row, "chosen"),
                          _check_response(rejected, source, row, "rejected"))


def _binary(record: Mapping[str, Any], field: str, source: str, row: int, kind: type) -> Any:
    value = require_value(record, field, source, row, "PKU-SafeRLHF rows need prompt, response_0, response_1, "
                          "better_response_id, safer_response_id, is_response_0_safe, is_response_1_safe")
    ok = isinstance(value, bool) if kind is bool else (isinstance(value, int) and not isinstance(value, bool)
                                                       and value in (0, 1))
    if not ok:
        raise DataFormatError(source, row, field, f"expected {'true/false' if kind is bool else '0 or 1'}, "
                              f"got {value!r}")
    return value


def saferlhf_choice(record: Mapping[str, Any], source: str, row: int) -> int:
    """The paper's rule (Xu et al. 2024, Sec. 5): if both responses are safe, the more helpful one
    (``better_response_id``) is chosen; otherwise the safer one (``safer_response_id``). Returns the chosen id."""
    safe = [_binary(record, f"is_response_{i}_safe", source, row, bool) for i in (0, 1)]
    better = _binary(record, "better_response_id", source, row, int)
    safer = _binary(record, "safer_response_id", source, row, int)
    return better if all(safe) else safer


def saferlhf_pair(record: Mapping[str, Any], source: str, row: int, prompt_format: PromptFormat = "hh",
                  tokenizer: PreTrainedTokenizerBase | None = None) -> PreferenceText:
    """PKU-SafeRLHF row -> (prompt rendered with ``prompt_format``, chosen, rejected) by `saferlhf_choice`."""
    prompt = require_text(record, "prompt", source, row)
    responses = [_check_response(require_text(record, f"response_{i}", source, row, allow_empty=True),
                                 source, row, f"response_{i}") for i in (0, 1)]
    chosen = saferlhf_choice(record, source, row)
    return PreferenceText(format_prompt(prompt, prompt_format, tokenizer), responses[chosen], responses[1 - chosen])


def saferlhf_safe_responses(record: Mapping[str, Any], source: str, row: int, prompt_format: PromptFormat = "hh",
                            tokenizer: PreTrainedTokenizerBase | None = None) -> list[tuple[str, str]]:
    """The SFT-on-safe view of a PKU-SafeRLHF row: ``(prompt, response)`` for each response marked safe (0, 1 or 2
    of them; identical safe responses count once)."""
    prompt = format_prompt(require_text(record, "prompt", source, row), prompt_format, tokenizer)
    out: list[tuple[str, str]] = []
    for i in (0, 1):
        if _binary(record, f"is_response_{i}_safe", source, row, bool):
            response = require_text(record, f"response_{i}", source, row)
            if (prompt, response) not in out:
                out.append((prompt, response))
    return out


def generic_pair(record: Mapping[str, Any], source: str, row: int, prompt_format: PromptFormat = "plain",
                 tokenizer: PreTrainedTokenizerBase | None = None) -> PreferenceText:
    """``{prompt, chosen, rejected}`` row -> the prompt rendered with ``prompt_format`` and both responses."""
    prompt = require_text(record, "prompt", source, row)
    chosen = require_text(record, "chosen", source, row)
    rejected = require_text(record, "rejected", source, row)
    return PreferenceText(format_prompt(prompt, prompt_format, tokenizer), chosen, rejected)


def messages_pair(record: Mapping[str, Any], source: str, row: int,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> PreferenceText:
    """Conversational row -> (prompt, chosen, rejected) texts through the chat template: ``chosen`` / ``rejected``
    whole conversations that differ only in their last assistant message, or ``prompt`` the conversation and
    ``chosen`` / ``rejected`` the answers (`recipes.datamodules.chat.preference_conversations`). The prompt is the
    rendering before the last answer (with the generation prompt), each response that answer's piece
    (`recipes.datamodules.chat.split_last_turn`): the ids SFT learns for the same conversation's last turn."""
    if tokenizer is None:
        raise ValueError("source_format 'messages' needs the tokenizer (its chat template renders the rows).")
    _, chosen, rejected = preference_conversations(record, source, row)
    texts = {}
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        texts[field] = split_last_turn(tokenizer, conversation, source, row, field)
        _check_response(texts[field][1], source, row, field)
    (prompt, chosen_text), (other_prompt, rejected_text) = texts["chosen"], texts["rejected"]
    if prompt != other_prompt:
        raise PromptMismatchError(source, row, "rejected", "its conversation before the last answer renders "
                                  "differently from the chosen one", "give both the same turns before their final "
                                  "answers, or set drop_prompt_mismatch: true to drop such pairs with a count")
    return PreferenceText(prompt, chosen_text, rejected_text)


def to_preference(record: Mapping[str, Any], source_format: PreferenceFormat, prompt_format: PromptFormat,
                  source: str, row: int, tokenizer: PreTrainedTokenizerBase | None = None) -> PreferenceText:
    """Dispatch one raw record to its format adapter (HH rows keep their own dialogue format, ``messages`` rows the
    chat template)."""
    if source_format == "hh":
        return hh_pair(record, source, row)
    if source_format == "saferlhf":
        return saferlhf_pair(record, source, row, prompt_format, tokenizer)
    if source_format == "generic":
        return generic_pair(record, source, row, prompt_format, tokenizer)
    if source_format == "messages":
        return messages_pair(record, source, row, tokenizer)
    raise ValueError(f"Unknown preference source_format {source_format!r}; choose hh, saferlhf, generic or messages.")


def read_margin(record: Mapping[str, Any], field: str, source: str, row: int) -> float:
    """A per-pair reward margin (e.g. Llama 2's graded preference strength) as a float."""
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataFormatError(source, row, field, f"expected a number, got {value!r}",
                              "fill in the margin or unset margin_field")
    return float(value)


def parse_rows(records: Sequence[Mapping[str, Any]], parse: Callable[[Mapping[str, Any], int], Any],
               counter: DropCounter, drop_empty: bool, drop_prompt_mismatch: bool) -> Iterator[tuple[int, Any]]:
    """``(row, parse(record, row))`` for every record. A row with an empty field (`EmptyFieldError`) or whose chosen
    and rejected prompts differ (`PromptMismatchError`) raises, unless its drop flag is set: then it is counted in
    ``counter`` and skipped."""
    for row, record in enumerate(records):
        try:
            parsed = parse(record, row)
        except EmptyFieldError as e:
            if not drop_empty:
                raise
            counter.add(f"dropped: empty '{e.field}'")
            continue
        except PromptMismatchError:
            if not drop_prompt_mismatch:
                raise
            counter.add("dropped: chosen and rejected prompts differ")
            continue
        yield row, parsed
