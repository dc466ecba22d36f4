"""Building causal LMs: from a hub id or local folder (`from_pretrained`) or from a config (tiny random models),
with dtype, gradient checkpointing, LoRA (peft) and 4-bit QLoRA (bitsandbytes). Called from `configure_model()`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass
class LoRASpec:
    """LoRA adapter settings (peft ``LoraConfig``).

    Args:
        r: rank; higher is more capacity and memory.
        alpha: scaling numerator (update scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``all-linear``.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a value head).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None


@dataclass
class ModelSpec:
    """Where a causal LM comes from and how it is prepared for training.

    Args:
        name_or_path: hub id or local folder for ``from_pretrained``; leave unset to build from ``config``.
        config: a transformers config as a dict (must hold ``model_type``) for a randomly initialized model;
            ``vocab_size`` and special-token ids default to the tokenizer's.
        dtype: weight dtype at load (``auto``: the checkpoint's). Mixed precision is the Trainer's ``precision``.
        gradient_checkpointing: recompute activations in backward to save memory.
        lora: LoRA settings; unset trains every weight.
        load_in_4bit: QLoRA: load the base weights in 4-bit NF4 through bitsandbytes (needs ``lora`` and saved
            weights).
        bnb_4bit_compute_dtype: dtype of the 4-bit matmuls.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` (GPU only).
        trust_remote_code: allow model code from the hub.
    """

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    dtype: DType = "float32"
    gradient_checkpointing: bool = False
    lora: LoRASpec | None = None
    load_in_4bit: bool = False
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    extra_kwargs: dict[str, Any] = field(default_factory=dict)


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def config_from_spec(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None, max_length: int | None,
                     **overrides: Any) -> PreTrainedConfig:
    """The transformers config of a random model: ``spec.config`` with the tokenizer's vocab size and special ids
    and the data's token budget filled in where the spec leaves them out."""
    cfg_dict = dict(spec.config or {})
    if "model_type" not in cfg_dict:
        raise ValueError("model.config needs a 'model_type' (e.g. 'llama') to build a random model from a config.")
    if tokenizer is not None:
        cfg_dict.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            cfg_dict.setdefault(key, getattr(tokenizer, key))
    if max_length is not None:
        cfg_dict.setdefault("max_position_embeddings", max_length)
    config = AutoConfig.for_model(**cfg_dict, **overrides)
    if spec.attn_implementation:
        config._attn_implementation = spec.attn_implementation
    return config


def _random_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None,
                  max_length: int | None) -> PreTrainedModel:
    with _transformers_knows_zero3():  # inside deepspeed.zero.Init, initialize the partitioned weights
        return AutoModelForCausalLM.from_config(config_from_spec(spec, tokenizer, max_length),
                                                dtype=torch_dtype(spec.dtype))


def _quantization_config(spec: ModelSpec):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise RuntimeError("load_in_4bit needs bitsandbytes: `pip install bitsandbytes` (GPU, or CPU with "
                           "bitsandbytes >= 0.45), or set model.load_in_4bit: false.") from e
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, spec.bnb_4bit_compute_dtype))


def _pretrained_model(spec: ModelSpec, **extra: Any) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code,
                              **spec.extra_kwargs, **extra}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.load_in_4bit:
        kwargs["quantization_config"] = _quantization_config(spec)
    try:
        with _transformers_knows_zero3():
            return AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs)
    except OSError as e:
        local = os.path.exists(str(spec.name_or_path))
        raise FileNotFoundError(
            f"Model '{spec.name_or_path}' " + ("could not be read from disk" if local else
                                               "is not on disk and could not be downloaded")
            + f" ({e.__class__.__name__}: {str(e).splitlines()[0]}). Point model.name_or_path at a local folder "
            "holding config.json and the weights: download it once on a connected machine with "
            "`huggingface-cli download <id> --local-dir <folder>`, or save one with `save_pretrained`."
        ) from e


@contextmanager
def _transformers_knows_zero3() -> Iterator[None]:
    """Inside an active ``deepspeed.zero.Init`` (Lightning's DeepSpeedStrategy with ``stage: 3`` runs
    ``configure_model`` in one), tell transformers that ZeRO-3 is on, so ``from_pretrained`` loads each weight into
    its partitioned parameter; without this it fails with a size mismatch. No-op elsewhere."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if zero is None or getattr(zero, "zero_init_context", 0) == 0:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    yield  # transformers keeps only a weak reference to it: ``config`` must live until the load is done
    del config


def build_causal_lm(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None,
                    max_length: int | None = None) -> PreTrainedModel:
    """Build the model ``spec`` describes, ready to train (LoRA-wrapped when ``spec.lora`` is set)."""
    if spec.load_in_4bit and spec.lora is None:
        raise ValueError("load_in_4bit trains through LoRA adapters only: set model.lora (QLoRA) or disable 4-bit.")
    if spec.name_or_path is None and spec.config is None:
        raise ValueError("Set model.name_or_path (hub id or local folder) or model.config (random init).")
    if spec.name_or_path is None:
        if spec.load_in_4bit:
            raise ValueError("load_in_4bit needs saved weights: save the model with save_pretrained and set "
                             "model.name_or_path to that folder.")
        model = _random_model(spec, tokenizer, max_length)
    else:
        model = _pretrained_model(spec)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.warning("Resizing embeddings from %d to %d rows for the tokenizer's added tokens",
                    model.get_input_embeddings().num_embeddings, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return prepare_for_training(model, spec)


def keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight at its first eval-mode forward without
    grad (a PPO rollout, generation) and from then on multiplies with a kernel that has no autograd: every later
    training forward leaves the LoRA adapters without gradients, with only a warning. Whether it happens depends on
    the CPU. A model built to train keeps the trainable layout (CUDA is not affected)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model: PreTrainedModel, spec: ModelSpec) -> PreTrainedModel:
    """Apply k-bit preparation, gradient checkpointing and LoRA to a loaded model."""
    if spec.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        keep_4bit_weights_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if spec.lora is not None:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    model.config.use_cache = not spec.gradient_checkpointing
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = spec.lora
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, modules_to_save=lora.modules_to_save))
    return model


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# Checkpoints store these specs in their hyperparameters; allow them under torch.load(weights_only=True), also by the
# names rlhf-recipes 0.1 pickled them under (its top-level `modules` package; recipes.legacy maps the other old paths).
torch.serialization.add_safe_globals([ModelSpec, LoRASpec, (ModelSpec, "modules.models.ModelSpec"),
                                      (LoRASpec, "modules.models.LoRASpec")])
