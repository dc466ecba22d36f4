"""Prompt formats: the HH-RLHF dialogue format, the Alpaca template, and the tokenizer's own chat template.

A format turns a (possibly multi-turn) request into the prompt text a model sees; the response follows it verbatim
(HH-RLHF's responses start with a space, PKU-SafeRLHF's and generic ones do not). Prompt and response are tokenized
apart everywhere, in training and by `recipes.modules.reward_functions.prompt_response_ids` when a reward model scores
them, so a SentencePiece tokenizer gives the same ids for the same texts in both.
"""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

PromptFormat = Literal["hh", "alpaca", "chat", "plain"]

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant:"

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca template (with or without the ``input`` block)."""
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def hh_prompt(query: str) -> str:
    """One human turn in the HH-RLHF dialogue format, ending where the assistant speaks.

    Text that already is an HH dialogue (starts with ``\\n\\nHuman:``) is kept and only gets the trailing
    ``\\n\\nAssistant:`` if it lacks it; the response then starts with a space, as in the dataset.
    """
    text = query if query.startswith(HUMAN.rstrip(" ")) else HUMAN + query
    return text if text.rstrip().endswith(ASSISTANT) else text + ASSISTANT


def format_prompt(query: str, fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Render a single-turn request in format ``fmt`` (``chat`` needs a tokenizer with a chat template)."""
    if fmt == "hh":
        return hh_prompt(query)
    if fmt == "alpaca":
        return alpaca_prompt(query)
    if fmt == "plain":
        return query
    if fmt == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; use 'hh' or 'alpaca'.")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"Unknown prompt format {fmt!r}; choose one of hh, alpaca, chat, plain.")


def split_hh_dialogue(text: str) -> tuple[str, str] | None:
    """Split an HH-RLHF dialogue at its last ``\\n\\nAssistant:`` into (prompt with history, final response).

    Returns ``None`` when the text has no assistant turn. The prompt keeps the marker, the response keeps its
    leading space, so ``prompt + response == text``.
    """
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]
