"""Scalar-head models: reward models and PPO critics as Hugging Face ``AutoModelForSequenceClassification``
(``num_labels=1``), so an exported reward model loads in plain transformers and initializes the critic directly.

Scores are read from our own masks (the last real token), never from HF's pad-id pooling, which misreads rows when
the pad id equals the eos id.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from recipes.modules.models import (
    ModelSpec,
    _quantization_config,
    _transformers_knows_zero3,
    config_from_spec,
    is_peft,
    torch_dtype,
)
from recipes.modules.policy import position_ids_from_mask


def build_scalar_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None,
                       max_length: int | None = None) -> PreTrainedModel:
    """A sequence-classification model with one output, from a hub id / folder (a causal LM's weights load into
    the backbone; the head starts fresh) or from a config; LoRA (task ``SEQ_CLS``, head trained in full) and 4-bit
    as in `recipes.modules.models`."""
    if spec.name_or_path is None and spec.config is None:
        raise ValueError("Set model.name_or_path (hub id or local folder) or model.config (random init).")
    if spec.name_or_path is None:
        config = config_from_spec(spec, tokenizer, max_length, num_labels=1)
        with _transformers_knows_zero3():  # inside deepspeed.zero.Init: initialize the partitioned weights
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch_dtype(spec.dtype))
    else:
        kwargs = {"num_labels": 1, "dtype": torch_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
        if spec.load_in_4bit:
            kwargs["quantization_config"] = _quantization_config(spec)
        try:
            with _transformers_knows_zero3():  # inside deepspeed.zero.Init: load into the partitions
                model = AutoModelForSequenceClassification.from_pretrained(spec.name_or_path, **kwargs)
        except OSError as e:
            raise FileNotFoundError(
                f"Scalar model '{spec.name_or_path}' is not on disk and could not be downloaded ({e}). Point "
                "name_or_path at a local folder (an exported reward model or a causal LM saved with save_pretrained)."
            ) from e
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = spec.lora
        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or [head_name(model)]))
    return model


def head_name(model: nn.Module) -> str:
    """The attribute name of a sequence-classification model's scalar head (score, classifier or v_head)."""
    hf = model.get_base_model() if is_peft(model) else model
    for name in ("score", "classifier", "v_head"):
        if hasattr(hf, name):
            return name
    raise TypeError(f"{type(hf).__name__} has no scalar head named score/classifier/v_head.")


def token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 columns: slice | Tensor = slice(None)) -> Tensor:
    """The head's output at the positions ``columns`` (a slice of columns, PPO values: ``(B, T')``; or one index per
    row, ``(B,)``: reward scores): the body runs on the whole batch, the head only on those hidden states; float32."""
    hf = model.get_base_model() if is_peft(model) else model
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    head = getattr(hf, head_name(model))
    if isinstance(columns, Tensor):  # one position per row: (B,)
        return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), columns]).squeeze(-1).float()
    return head(hidden[:, columns]).squeeze(-1).float()


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the rightmost real token of each row (works for left and right padding). Shape: ``(B,)``."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The head's output at each row's last real token only (reward-model scores). Shape: ``(B,)``, float32."""
    return token_scores(model, input_ids, attention_mask, last_token_index(attention_mask))


def check_critic_tokenizer(spec: ModelSpec, critic: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Refuse a critic that cannot read the policy's token ids (its folder's tokenizer or its vocabulary differ)."""
    if tokenizer is None:
        return
    rows = critic.get_input_embeddings().num_embeddings
    path = spec.name_or_path
    has_tok = path and os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                                    ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    same = rows >= len(tokenizer)
    if same and has_tok:
        from recipes.modules.tokenizer import load_tokenizer

        same = load_tokenizer(path).get_vocab() == tokenizer.get_vocab()
    if not same:
        raise ValueError(
            f"critic '{path or 'config'}' ({rows} embedding rows) uses a different tokenizer than the policy "
            f"({len(tokenizer)} tokens): the critic reads the policy's token ids. Initialize the critic from a reward "
            "model trained with the policy's tokenizer (or from the policy); the reward itself may use any tokenizer "
            "through recipes.modules.reward_functions.SequenceClassifierReward.")

