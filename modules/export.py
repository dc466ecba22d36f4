"""Export to Hugging Face folders that plain transformers (and peft, for adapters) load without this project."""

from __future__ import annotations

import copy
import logging
import os

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from recipes.modules.models import is_peft

log = logging.getLogger(__name__)


def _full_state_dict_if_sharded(model: nn.Module, is_writer: bool = True) -> dict | None:
    """Gather a sharded model's full state dict to CPU (a collective: every rank must call it): FSDP2 DTensors, or
    DeepSpeed ZeRO-3 partitions, one parameter at a time (``GatheredParameters``), kept by the writer only. None
    for a model that is not sharded."""
    from torch.distributed.tensor import DTensor

    from recipes.modules.sharding import is_partitioned

    if is_partitioned(model):  # ZeRO-3: the module holds empty placeholders
        import deepspeed

        state = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not hasattr(tensor, "ds_id"):
                state[name] = tensor.detach().cpu()
                continue
            with deepspeed.zero.GatheredParameters([tensor]):
                if is_writer:
                    state[name] = tensor.data.detach().cpu().clone()
        return state
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def merged_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The state dict of a LoRA model's base with its active adapter merged, computed from ``state`` (the peft
    model's own full state dict, e.g. gathered from FSDP2 shards), with the base model's key names.

    Each adapted linear becomes ``W + scaling * B @ A`` (Hu et al., arXiv 2106.09685, Eq. 3; transposed for
    ``fan_in_fan_out`` layers), computed in fp32 and stored in ``W``'s dtype; other adapters are dropped and a
    ``modules_to_save`` copy replaces its original. This is what peft's ``merge_and_unload`` gives, without an
    unsharded copy of the live model. Returns None when a layer is not a plain LoRA linear (DoRA or another
    variant, embedding or convolution adapters): load the adapter folder and merge with peft then.
    """
    from peft.tuners.lora import LoraLayer

    adapter, merged = model.active_adapter, dict(state)
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.lora_variant.get(adapter) is not None or not isinstance(layer.get_base_layer(), nn.Linear):
            return None
        weight = state[f"{name}.base_layer.weight"]
        delta = state[f"{name}.lora_B.{adapter}.weight"].float() @ state[f"{name}.lora_A.{adapter}.weight"].float()
        delta = delta.T if layer.fan_in_fan_out else delta
        merged[f"{name}.base_layer.weight"] = (weight.float() + layer.scaling[adapter] * delta).to(weight.dtype)
    prefix, kept = "base_model.model.", f".modules_to_save.{adapter}."
    plain = {}
    for key, value in merged.items():
        if ".lora_" in key or ".original_module." in key or (".modules_to_save." in key and kept not in key):
            continue
        key = key.removeprefix(prefix).replace(".base_layer.", ".").replace(kept, ".")
        plain[key] = value
    return plain


def save_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str,
                    merge_lora: bool = True, is_writer: bool = True) -> str:
    """Save ``model`` (and ``tokenizer``) to ``path`` with ``save_pretrained``.

    A LoRA model is saved merged into its base (a copy is merged; the live model keeps its adapter) or, with
    ``merge_lora=False``, as a peft adapter folder. A 4-bit base cannot be merged losslessly, so it is saved as an
    adapter with a warning. An FSDP2- or ZeRO-3-sharded model is gathered first (every rank calls this; only
    ``is_writer`` writes); a sharded LoRA model is merged from the gathered state dict (`merged_lora_state_dict`).
    """
    full_state = _full_state_dict_if_sharded(model, is_writer)
    if not is_writer:
        return path
    os.makedirs(path, exist_ok=True)
    if full_state is not None:
        merged = merged_lora_state_dict(model, full_state) if is_peft(model) and merge_lora else None
        if merged is not None:
            model.get_base_model().save_pretrained(path, state_dict=merged)
        else:
            if is_peft(model) and merge_lora:
                log.warning("Sharded LoRA model with a DoRA/embedding adapter: saving the adapter; merge it with "
                            "peft after loading.")
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
