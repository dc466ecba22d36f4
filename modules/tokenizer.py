"""Tokenizer loading: hub id or local folder, the real Llama-2 SentencePiece model, a built-in byte tokenizer; pad
policy.

Pad policy (stated once, used everywhere): a tokenizer without a pad token pads with its ``unk`` token when it has
one, else with ``eos``. Pad positions are always excluded by the attention and completion masks, so the choice never
enters a loss; masks are built from lengths, never by comparing ids with the pad id (so pad == eos is safe).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BUILTIN_BYTE = "builtin:byte"
# tokenizer_config.json key of an exported reward model whose tokenizer appends EOS for plain transformers (a
# pipeline scores the text as given); `load_tokenizer` turns it off again, since this project appends EOS itself.
EOS_APPENDED_FOR_SCORING = "eos_appended_for_scoring"
_BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (4 specials + 256 bytes) needing no files: any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins GPT-2 uses for raw bytes
    vocab = {tok: i for i, tok in enumerate(_BYTE_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tok.add_bos_token = False
    return tok


def _is_bare_sentencepiece_folder(path: Path) -> bool:
    """A folder holding only ``tokenizer.model``: AutoTokenizer would build a different vocabulary from it."""
    has_config = any((path / f).exists() for f in ("tokenizer_config.json", "tokenizer.json"))
    return (path / "tokenizer.model").exists() and not has_config


def load_tokenizer(
    name_or_path: str,
    padding_side: str = "right",
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and apply the pad policy.

    Args:
        name_or_path: ``builtin:byte``; a hub id; a local folder saved by ``save_pretrained``; or a SentencePiece
            ``tokenizer.model`` (file or bare folder), which loads through ``LlamaTokenizer`` so the ids are the
            real Llama-2 ones ("Hello" -> 15043).
        padding_side: side used by plain ``tokenizer.pad``; collators here pad explicitly and generation
            left-pads regardless.
        trust_remote_code: passed to ``AutoTokenizer``.
    """
    if name_or_path == BUILTIN_BYTE:
        tok: PreTrainedTokenizerBase = build_byte_tokenizer()
    else:
        path = Path(os.path.expanduser(name_or_path))
        if path.is_file() and path.name.endswith(".model"):
            path = path.parent
        try:
            if path.is_dir() and _is_bare_sentencepiece_folder(path):
                tok = LlamaTokenizer.from_pretrained(str(path))
            else:
                tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name_or_path,
                                                    trust_remote_code=trust_remote_code)
        except OSError as e:
            raise FileNotFoundError(
                f"Tokenizer '{name_or_path}' is not on disk and could not be downloaded ({e.__class__.__name__}). "
                "Point `tokenizer` at a local folder: download it once on a connected machine with "
                "`huggingface-cli download <id> --local-dir <folder>` (or save_pretrained) and pass that folder."
            ) from e
    apply_pad_policy(tok)
    if tok.init_kwargs.get(EOS_APPENDED_FOR_SCORING):
        stop_appending_eos(tok)
    tok.padding_side = padding_side
    return tok


def appending_eos(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of ``tok`` that ends every text it encodes with special tokens (the default) with EOS, for the reward
    model's export: ``pipeline("text-classification")`` then scores ``prompt + response`` as the model was trained.

    The flags are stored in ``tokenizer_config.json`` as well as in ``tokenizer.json``'s post-processor, because
    transformers 4's ``LlamaTokenizerFast`` rebuilds its post-processor from them. Raises TypeError for a tokenizer
    whose encoding this cannot change (no ``add_eos_token`` switch, e.g. a slow tokenizer)."""
    if tok.eos_token_id is None:
        raise TypeError(f"{type(tok).__name__} has no EOS token to append; add one with tokenizer.add_special_tokens().")
    out = copy.deepcopy(tok)
    out.add_eos_token = True  # a tokenizers-backed tokenizer rebuilds its TemplateProcessing post-processor
    if out("a")["input_ids"][-1:] != [out.eos_token_id]:
        raise TypeError(f"{type(tok).__name__} ignores add_eos_token; append the EOS token to reward-model inputs "
                        "yourself (the export's README.md says so).")
    out.init_kwargs.update(add_bos_token=bool(getattr(out, "add_bos_token", False)), add_eos_token=True)
    out.init_kwargs[EOS_APPENDED_FOR_SCORING] = True
    return out


def stop_appending_eos(tok: PreTrainedTokenizerBase) -> None:
    """Undo `appending_eos` in place: the tokenizer encodes as in training, where the collators append EOS."""
    tok.add_eos_token = False
    tok.init_kwargs.update(add_eos_token=False)
    tok.init_kwargs.pop(EOS_APPENDED_FOR_SCORING, None)


def apply_pad_policy(tok: PreTrainedTokenizerBase) -> None:
    """Give ``tok`` a pad token if it has none: ``unk`` when present, else ``eos`` (see module docstring)."""
    if tok.pad_token_id is not None:
        return
    fallback = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if fallback is None:
        raise ValueError("The tokenizer has no pad, unk or eos token; add one with tokenizer.add_special_tokens().")
    tok.pad_token = fallback
    log.info("Tokenizer has no pad token; padding with %r (masked out of every loss).", fallback)


def vocab_size(tok: PreTrainedTokenizerBase) -> int:
    """Number of embedding rows a model needs for ``tok`` (added tokens included)."""
    return len(tok)
