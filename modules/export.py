"""Export to Hugging Face folders that plain transformers (and peft, for adapters) load without this project."""

from __future__ import annotations

import copy
import logging
import os

from torch import nn
from transformers import PreTrainedTokenizerBase

from modules.models import is_peft

log = logging.getLogger(__name__)


def _full_state_dict_if_sharded(model: nn.Module) -> dict | None:
    """Gather an FSDP2-sharded model's full state dict to CPU (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str,
                    merge_lora: bool = True, is_writer: bool = True) -> str:
    """Save ``model`` (and ``tokenizer``) to ``path`` with ``save_pretrained``.

    A LoRA model is saved merged into its base (a copy is merged; the live model keeps its adapter) or, with
    ``merge_lora=False``, as a peft adapter folder. A 4-bit base cannot be merged losslessly, so it is saved as an
    adapter with a warning. An FSDP2-sharded model is gathered first (every rank calls this; only ``is_writer``
    writes); a sharded LoRA model is saved as an adapter.
    """
    full_state = _full_state_dict_if_sharded(model)
    if not is_writer:
        return path
    os.makedirs(path, exist_ok=True)
    if full_state is not None:
        if is_peft(model) and merge_lora:
            log.warning("Sharded LoRA model: saving the adapter; merge it into the base after loading.")
        model.save_pretrained(path, state_dict=full_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path
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
