"""Export to Hugging Face folders that plain transformers (and peft, for adapters) load without this project, from
any working directory and with transformers 4 too; each folder carries a model card (README.md) saying what it is."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

import yaml
from recipes.modules.models import is_peft

log = logging.getLogger(__name__)

# Tokenizer classes that transformers 4.46 defines (checked by hand against its tokenization_auto.py; transformers 4 is
# not installed here). transformers 5 writes "TokenizersBackend", which 4.x does not know: the export replaces any
# other name with PreTrainedTokenizerFast, which reads the same tokenizer.json.
TRANSFORMERS4_TOKENIZER_CLASSES = frozenset({
    "PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
    "GPT2Tokenizer", "GPT2TokenizerFast", "GPTNeoXTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast",
    "GemmaTokenizer", "GemmaTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "BertTokenizer", "BertTokenizerFast",
})
CARD_HPARAMS_SKIPPED = ("model", "guard_non_finite")  # the base model has its own line; a guard changes no number


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


@dataclass
class ModelCard:
    """What an export's README.md says (`render_model_card`); every field may be empty.

    Args:
        base_model: the hub id or absolute folder the weights started from (None: random initialization).
        algorithm: the LightningModule class that trained it (``RewardModule``).
        data: the data module's settings (paths, source format).
        hyperparameters: the module's saved hyperparameters (``module.hparams``).
        metrics: the final logged metrics (``trainer.callback_metrics``).
        config: the YAML of the run's LightningCLI config.
        input_convention: how to format inputs (reward models: prompt + response, EOS).
        adapter: the folder is a peft LoRA adapter rather than full weights.
    """

    base_model: str | None = None
    algorithm: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: str | None = None
    input_convention: str | None = None
    adapter: bool = False


def algorithm_tag(algorithm: str) -> str:
    """The hub tag of a module class: ``RewardModule`` -> ``reward-model``, ``DPOModule`` -> ``dpo``."""
    name = algorithm.removesuffix("Module").lower()
    return "reward-model" if name == "reward" else name


def _plain(value: Any) -> Any:
    """A value YAML can write: dataclasses (a ModelSpec) as dicts, objects as their class path."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__module__}.{type(value).__qualname__}"


def absolute_base(name_or_path: str | None) -> str | None:
    """A base model reference that resolves from any working directory: an existing relative folder becomes
    absolute; a hub id (or a path that does not exist here) is kept as given; empty means none."""
    if not name_or_path:
        return None
    expanded = os.path.expanduser(name_or_path)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else name_or_path


def base_model_of(model: nn.Module) -> str | None:
    """Where ``model``'s weights came from: a peft model's base, else the folder or hub id it was loaded from."""
    if is_peft(model):
        return absolute_base(model.peft_config[model.active_adapter].base_model_name_or_path)
    return absolute_base(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None))


def _cli_config(trainer: Any) -> str | None:
    """The YAML LightningCLI saves as config.yaml, read from the trainer's SaveConfigCallback (None outside the CLI)."""
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, SaveConfigCallback):
            return callback.parser.dump(callback.config, skip_none=False)
    return None


def model_card(module: Any, config: str | None = None, datamodule: Any = None) -> ModelCard:
    """The card of a LightningModule's export: its class, hyperparameters, base model, the data module's settings,
    the final metrics and the CLI config of its trainer when it is attached to one (``config`` and ``datamodule``
    stand in for an unattached module), and the module's ``input_convention`` when it declares one (reward model)."""
    network = getattr(module, "network", None)
    trainer = getattr(module, "_trainer", None)
    hparams = {k: v for k, v in dict(getattr(module, "hparams", {})).items()
               if k not in CARD_HPARAMS_SKIPPED and not k.startswith("_")}  # "_class_path": the CLI's bookkeeping
    datamodule = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
    data = {k: v for k, v in dict(getattr(datamodule, "hparams", {})).items()
            if k != "tokenizer" and not k.startswith("_")}
    metrics = {k: float(v) for k, v in getattr(trainer, "callback_metrics", {}).items() if v.numel() == 1}
    return ModelCard(
        base_model=base_model_of(network) if network is not None else None, algorithm=type(module).__name__,
        data=_plain(data), hyperparameters=_plain(hparams), metrics=metrics,
        config=config if config is not None else _cli_config(trainer),
        input_convention=getattr(module, "input_convention", None))


def render_model_card(card: ModelCard) -> str:
    """README.md: YAML front matter (``library_name``, ``base_model``, ``tags``) and a body with one section per
    known field."""
    tags = ["rlhf-recipes"] + ([algorithm_tag(card.algorithm)] if card.algorithm else []) + \
        (["lora"] if card.adapter else [])
    front = {"library_name": "peft" if card.adapter else "transformers", "tags": tags}
    if card.base_model:
        front["base_model"] = card.base_model
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {algorithm_tag(card.algorithm) if card.algorithm else 'model'} trained with rlhf-recipes", "",
             f"- Base model: {card.base_model or 'none (randomly initialized from a config)'}",
             f"- Algorithm: {card.algorithm or 'unknown (exported without its LightningModule)'}",
             f"- Weights: {'a peft LoRA adapter over the base model' if card.adapter else 'full (LoRA merged)'}"]
    if card.input_convention:
        lines += ["", "## Input convention", "", card.input_convention]
    sections = (("Data", card.data), ("Hyperparameters", card.hyperparameters), ("Final metrics", card.metrics))
    for title, values in sections:
        if values:
            lines += ["", f"## {title}", "", "```yaml", yaml.safe_dump(values, sort_keys=True).rstrip(), "```"]
    if card.config:
        lines += ["", "## Config", "", "The LightningCLI config that produced it:", "", "```yaml",
                  card.config.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def portable_tokenizer_config(path: str) -> None:
    """Rewrite ``tokenizer_config.json``'s ``tokenizer_class`` to one transformers 4 knows (PreTrainedTokenizerFast
    reads the same ``tokenizer.json``) when transformers 5 named a class 4.x lacks (``TokenizersBackend``)."""
    config_file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_file) or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") in TRANSFORMERS4_TOKENIZER_CLASSES:
        return
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def absolute_adapter_base(path: str) -> None:
    """Make ``adapter_config.json``'s ``base_model_name_or_path`` absolute when it is a relative folder, so
    ``AutoPeftModelForCausalLM.from_pretrained(path)`` works from any working directory (a hub id is kept)."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    base = absolute_base(config.get("base_model_name_or_path"))
    if base == config.get("base_model_name_or_path"):
        return
    config["base_model_name_or_path"] = base
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _finish_folder(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str,
                   card: ModelCard | None) -> None:
    """Tokenizer (with a class transformers 4 loads), an absolute adapter base, and README.md."""
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        portable_tokenizer_config(path)
    absolute_adapter_base(path)
    write_model_card(path, card or ModelCard(base_model=base_model_of(model)))


def write_model_card(path: str, card: ModelCard) -> None:
    """Write ``card`` as ``path``/README.md (replacing peft's), marked as an adapter when the folder holds one."""
    card = dataclasses.replace(card, adapter=os.path.isfile(os.path.join(path, "adapter_config.json")))
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
        f.write(render_model_card(card))


def save_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str,
                    merge_lora: bool = True, is_writer: bool = True, card: ModelCard | None = None) -> str:
    """Save ``model`` (and ``tokenizer``) to ``path`` with ``save_pretrained``, and README.md from ``card`` (without
    one, a card naming the base model only: pass `model_card` of the LightningModule for the rest).

    A LoRA model is saved merged into its base (a copy is merged; the live model keeps its adapter) or, with
    ``merge_lora=False``, as a peft adapter folder whose base is an absolute path (or hub id). A 4-bit base cannot be
    merged losslessly, so it is saved as an adapter with a warning. An FSDP2- or ZeRO-3-sharded model is gathered
    first (every rank calls this; only ``is_writer`` writes); a sharded LoRA model is merged from the gathered state
    dict (`merged_lora_state_dict`).
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
        _finish_folder(model, tokenizer, path, card)
        return path
    if is_peft(model):
        quantized = getattr(model.get_base_model(), "is_loaded_in_4bit", False)
        if merge_lora and quantized:
            log.warning("4-bit base: saving the LoRA adapter instead of merged weights (merge on a bf16 copy).")
            merge_lora = False
        if merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    _finish_folder(model, tokenizer, path, card)
    log.info("Exported %s to %s", type(model).__name__, path)
    return path
