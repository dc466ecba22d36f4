"""The evaluation command's model side: resolve a policy or reward model (Hugging Face folder, or a Lightning
checkpoint exported first), sample responses with a KV cache, and measure the sampled-response KL to a reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from recipes.datamodules.collate import pad_prompts
from recipes.evaluate.metrics import sequence_kl
from recipes.modules.generation import sample
from recipes.modules.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PolicySpec:
    """One policy to evaluate.

    Args:
        name: the row name in the table (``sft``, ``dpo``, ``ppo`` ...); also how baselines and the reference name it.
        path: a Hugging Face causal-LM folder (``HFExport`` / ``python -m recipes.export`` output), or a Lightning
            ``.ckpt`` of this project's modules, exported to ``<out_dir>/exported/<name>`` before use.
        config: for a ``.ckpt``: the run's ``config.yaml`` (default: the one two folders up, where
            ``python -m recipes fit`` saves it).
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``, ``auto``: the folder's).
    """

    name: str
    path: str
    config: str | None = None
    dtype: str = "float32"


@dataclass
class GenerationSpec:
    """Sampling settings shared by every policy (one generator seeded with the run's seed per policy).

    Args:
        max_new_tokens: response token budget (a response that reaches it is counted as cut).
        max_prompt_length: longer prompts lose tokens from the left (counted and logged).
        temperature: 0 is greedy. The KL column is an unbiased KL estimate only at 1 with top_k 0 and top_p 1.
        top_k, top_p: filters (0 / 1 disable them).
        batch_size: prompts sampled at a time (the samples depend on it, as on the seed and device).
    """

    max_new_tokens: int = 128
    max_prompt_length: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 8


@dataclass
class Generations:
    """One policy's responses: texts plus per-response counts (and the KL to the reference when measured)."""

    responses: list[str]
    response_tokens: list[int]
    ended_with_eos: list[bool]
    prompts_cut: int
    kl: list[float] | None = None


def resolve_folder(name: str, path: str, config: str | None, out_dir: str) -> str:
    """A loadable Hugging Face folder for ``path``: the folder itself, or a ``.ckpt`` exported with its run config
    by `recipes.export.export_checkpoint` to ``<out_dir>/exported/<name>``."""
    if not path.endswith(".ckpt"):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"'{name}': {path} is not a folder. Give a Hugging Face folder (written by "
                                    "HFExport or `python -m recipes.export`) or a Lightning .ckpt file.")
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"'{name}': checkpoint {path} does not exist.")
    config = config or str(Path(path).resolve().parent.parent / "config.yaml")
    if not os.path.exists(config):
        raise FileNotFoundError(
            f"'{name}': checkpoint {path} needs its run's config.yaml to rebuild the module, and {config} does not "
            f"exist. Set `config:` for it, or export it first: python -m recipes.export --config <run>/config.yaml "
            f"--ckpt_path {path} --out <folder>, and give that folder as `path`.")
    from recipes.export import export_checkpoint

    out = os.path.join(out_dir, "exported", name)
    log.info("'%s': exporting %s (config %s) to %s", name, path, config, out)
    return export_checkpoint(config, path, out)


def load_policy(folder: str, dtype: str, device: str) -> tuple[nn.Module, object]:
    """A causal LM and its tokenizer (pad policy applied) from ``folder``, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(folder)
    from recipes.modules.models import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype))
    return model.requires_grad_(False).eval().to(device), tokenizer


def check_same_tokenizer(policy_tok, reference_tok, policy: str, reference: str) -> None:
    """The KL compares two models' log-probs of the same token ids: refuse a reference with another vocabulary."""
    if policy_tok.get_vocab() != reference_tok.get_vocab():
        raise ValueError(
            f"KL reference '{reference}' uses a different tokenizer than policy '{policy}' ({len(reference_tok)} vs "
            f"{len(policy_tok)} tokens): a token-level KL needs both to read the same ids. Set `reference` to a model "
            "trained from the same base (normally the SFT policy), or `reference: null` to skip the KL column.")


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], spec: GenerationSpec, seed: int, device: str,
             reference: nn.Module | None = None, progress: bool = True, description: str = "generating"
             ) -> Generations:
    """Sample one response per prompt, ``spec.batch_size`` prompts at a time, in prompt order.

    Prompts are tokenized as `recipes.datamodules.prompts.PromptDataModule` does (special tokens added) and left-padded;
    one generator seeded with ``seed`` draws every token. With ``reference`` each response's KL(policy || reference)
    is estimated on the same batch (`recipes.evaluate.metrics.sequence_kl`).
    """
    from tqdm.auto import tqdm

    encoded, cut = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        cut += len(ids) > spec.max_prompt_length
        encoded.append(ids[-spec.max_prompt_length:])
    if cut:
        log.warning("%s: %d of %d prompts cut from the left to max_prompt_length=%d tokens", description, cut,
                    len(prompts), spec.max_prompt_length)
    generator = torch.Generator(device).manual_seed(seed)
    out = Generations([], [], [], cut, [] if reference is not None else None)
    with tqdm(total=len(prompts), desc=description, disable=not progress) as bar:
        for start in range(0, len(prompts), spec.batch_size):
            rows = [{"input_ids": ids, "prompt": "", "metadata": {}}
                    for ids in encoded[start:start + spec.batch_size]]
            batch = pad_prompts(rows, tokenizer.pad_token_id)
            input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            gen = sample(model, input_ids, mask, spec.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         spec.temperature, spec.top_k, spec.top_p, generator=generator)
            lengths = gen.response_mask.sum(-1).tolist()
            out.responses += tokenizer.batch_decode([ids[:n] for ids, n in zip(gen.response_ids, lengths)],
                                                    skip_special_tokens=True)
            out.response_tokens += lengths
            out.ended_with_eos += gen.ended_with_eos.tolist()
            if reference is not None:
                full_ids = torch.cat([input_ids, gen.response_ids], dim=1)  # (B, P + R)
                full_mask = torch.cat([mask, gen.response_mask], dim=1)
                out.kl += sequence_kl(model, reference, full_ids, full_mask, input_ids.shape[1],
                                      gen.response_mask).tolist()
            bar.update(len(rows))
    cut_responses = len(prompts) - sum(out.ended_with_eos)
    if cut_responses:
        log.info("%s: %d of %d responses reached max_new_tokens=%d without EOS (kept as they are)", description,
                 cut_responses, len(prompts), spec.max_new_tokens)
    return out


def release_memory() -> None:
    """Return freed accelerator memory after the caller dropped a model, so one policy at a time holds it (on a CPU
    dropping the last reference frees it; a full collection there costs seconds and gains nothing)."""
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
