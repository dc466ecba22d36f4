"""Export to Hugging Face folders that plain transformers (and peft, for adapters) load without this project."""

from __future__ import annotations

import copy
import logging
import os

from torch import nn
from transformers import PreTrainedTokenizerBase

from modules.models import is_peft

log = logging.getLogger(__name__)


def save_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str,
                    merge_lora: bool = True) -> str:
    """Save ``model`` (and ``tokenizer``) to ``path`` with ``save_pretrained``.

    A LoRA model is saved merged into its base (a copy is merged; the live model keeps its adapter) or, with
    ``merge_lora=False``, as a peft adapter folder. A 4-bit base cannot be merged losslessly, so it is saved as an
    adapter with a warning.
    """
    os.makedirs(path, exist_ok=True)
    if is_peft(model):
        quantized = getattr(model.get_base_model(), "is_loaded_in_4bit", False)
        if merge_lora and quantized:
            log.warning("4-bit base: saving the LoRA adapter instead of merged weights (merge on a bf16 copy).")
            merge_lora = False
        if merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    log.info("Exported %s to %s", type(model).__name__, path)
    return path
