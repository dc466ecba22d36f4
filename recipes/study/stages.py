"""The study's stages: each is a real ``python -m recipes fit`` of the project's own module and data module, from a
Lightning config the study YAML describes (with ``{data}``/``{seed}``/``{STAGE}`` placeholders), followed by an
export to a Hugging Face folder; and the evaluation job that scores an exported policy on the held-out prompts."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from recipes.study.scoring import EvalSpec
from recipes.study.testbed import TestbedSpec

log = logging.getLogger(__name__)

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
RESERVED = {"data", "seed", "gold"}
STAGE_KEYS = {"label", "role", "extends", "config", "track", "frontier", "standardize"}
ROLES = ("policy", "reward", "helper")  # evaluated as a policy, evaluated as a reward model, not evaluated


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` on top of ``base``: dicts merge key by key, anything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def resolve_stages(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Expand ``extends: OTHER`` (the other stage's config, then this one's on top) and check every stage."""
    resolved: dict[str, dict[str, Any]] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        if name in resolved:
            return resolved[name]
        if name not in stages:
            raise ValueError(f"study config: stage '{chain[-1]}' extends '{name}', which is not a stage; "
                             f"stages are {sorted(stages)}.")
        if name in chain:
            raise ValueError(f"study config: stages extend each other in a cycle: {' -> '.join(chain + (name,))}.")
        entry = dict(stages[name])
        unknown = set(entry) - STAGE_KEYS
        if unknown:
            raise ValueError(f"study config: stages.{name} has unknown keys {sorted(unknown)}; allowed: "
                             f"{', '.join(sorted(STAGE_KEYS))}.")
        config, parent = entry.get("config") or {}, {}
        if entry.get("extends"):
            parent = resolve(entry["extends"], chain + (name,))
            config = deep_merge(parent["config"], config)
        role = entry.get("role", parent.get("role", "policy"))
        if role not in ROLES:
            raise ValueError(f"study config: stages.{name}.role is {role!r}; one of {', '.join(ROLES)}.")
        # label and frontier name this stage's own point: not inherited
        resolved[name] = {"label": entry.get("label", name), "role": role, "config": config,
                          "track": entry.get("track", parent.get("track")), "frontier": entry.get("frontier"),
                          "standardize": bool(entry.get("standardize", parent.get("standardize", False)))}
        return resolved[name]

    for name in stages:
        resolve(name, ())
    for name, entry in resolved.items():
        for dep in stage_dependencies(entry["config"]):
            if dep not in resolved:
                raise ValueError(f"study config: stages.{name} refers to '{{{dep}}}', which is neither a stage nor "
                                 f"one of {sorted(RESERVED)}.")
    return resolved


def stage_dependencies(config: Any) -> set[str]:
    """The stages whose exported folders a config refers to (``{NAME}`` placeholders other than data/seed/gold)."""
    if isinstance(config, dict):
        return set().union(*(stage_dependencies(v) for v in config.values())) if config else set()
    if isinstance(config, list):
        return set().union(*(stage_dependencies(v) for v in config)) if config else set()
    if isinstance(config, str):
        return {m for m in PLACEHOLDER.findall(config) if m not in RESERVED}
    return set()


def fill(config: Any, values: dict[str, Any]) -> Any:
    """Replace placeholders; a string that is exactly one placeholder whose value is not a string (``{seed}``,
    ``{gold}``) becomes that value."""
    if isinstance(config, dict):
        return {k: fill(v, values) for k, v in config.items()}
    if isinstance(config, list):
        return [fill(v, values) for v in config]
    if isinstance(config, str):
        whole = PLACEHOLDER.fullmatch(config)
        if whole and not isinstance(values[whole.group(1)], str):
            return values[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), config)
    return config


@dataclass
class Job:
    """One unit of work in a worker process: ``fit`` (train stage ``stage`` of seed ``seed``) or ``eval``.

    ``track``, ``testbed``, ``sft`` and ``reward`` are those of the stage's track (its SFT stage is the reference of
    every evaluation and the sampler of a reward model's standardization; its reward stage, if any, scores the
    policies' samples); ``role`` is the stage's (policy, reward, helper)."""

    kind: str
    stage: str
    seed: int
    run_dir: str
    config: dict[str, Any]
    testbed: TestbedSpec
    eval: EvalSpec
    label: str = ""
    track: str = ""
    role: str = "policy"
    sft: str = "sft"
    reward: str | None = None
    standardize: bool = False

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{self.kind}:{self.stage}"


def stage_dir(run_dir: str, stage: str) -> Path:
    return Path(run_dir) / stage


def hf_dir(run_dir: str, stage: str) -> str:
    return str(stage_dir(run_dir, stage) / "hf")


def data_dir(run_dir: str, track: str) -> Path:
    """Where a seed's testbed of ``track`` is written."""
    return Path(run_dir) / "data" / track


def lightning_config(job: Job, defaults: dict[str, Any]) -> dict[str, Any]:
    """The full Lightning CLI config of a fit job: defaults, the stage's config, filled placeholders (``{data}``: the
    track's testbed folder, ``{gold}``: its `GoldReward` arguments), the stage's output folder and logger, and the
    `GoldCurve` callback for policies."""
    out = stage_dir(job.run_dir, job.stage)
    values = {"data": str(data_dir(job.run_dir, job.track)), "seed": job.seed, "gold": job.testbed.gold_args()}
    values.update({name: hf_dir(job.run_dir, name) for name in stage_dependencies(job.config)})
    config = fill(deep_merge(defaults, job.config), values)
    config["seed_everything"] = job.seed
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(out)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(out), "name": "", "version": ""}}
    callbacks = list(trainer.get("callbacks") or [])
    if job.role == "policy" and job.eval.curve_every_n_steps > 0:
        callbacks.append({"class_path": "recipes.study.scoring.GoldCurve", "init_args": {
            "prompts_file": str(data_dir(job.run_dir, job.track) / "heldout_prompts.jsonl"),
            "path": str(out / "gold_curve.json"), "every_n_steps": job.eval.curve_every_n_steps,
            "num_prompts": job.eval.curve_prompts, "max_new_tokens": job.eval.max_new_tokens,
            "gold": job.testbed.gold_args()}})
    trainer["callbacks"] = callbacks
    return config


def run_job(job: Job) -> dict[str, Any]:
    """Run one job in this (worker) process and return its summary (also written to the stage folder)."""
    import torch

    torch.set_num_threads(1)  # tiny models: one thread per process, the processes use the cores
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = run_fit(job) if job.kind == "fit" else run_eval(job)
    # CPU seconds of this one-thread process: close to the wall time the job takes on an idle core
    result.update(seed=job.seed, stage=job.stage, kind=job.kind, seconds=time.perf_counter() - start,
                  cpu_seconds=time.process_time() - cpu_start)
    name = "fit.json" if job.kind == "fit" else "eval.json"
    (stage_dir(job.run_dir, job.stage) / name).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def _quiet() -> None:
    """Keep a worker's output to errors: the study's own progress bar is the progress shown."""
    import warnings

    import datasets
    import lightning  # noqa: F401  (sets its loggers' levels on import; ours go after)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.fabric.utilities.seed", "recipes"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_fit(job: Job) -> dict[str, Any]:
    """``python -m recipes fit --config <stage>/config.yaml``, then export the trained model to ``<stage>/hf``."""
    from recipes.__main__ import cli_main

    out = stage_dir(job.run_dir, job.stage)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "study_stage.yaml"
    path.write_text(yaml.safe_dump(job.config, sort_keys=False), encoding="utf-8")
    cli = cli_main(["fit", "--config", str(path)])
    cli.model.export_pretrained(hf_dir(job.run_dir, job.stage))
    result: dict[str, Any] = {"steps": int(cli.trainer.global_step)}
    if job.standardize:
        from recipes.study.scoring import standardize_reward_model

        result["standardization"] = standardize_reward_model(
            hf_dir(job.run_dir, job.stage), hf_dir(job.run_dir, job.sft), read_prompts(job, "train_prompts"),
            job.testbed.gold_reward(), job.eval, seed=job.seed)
    return result


def read_prompts(job: Job, name: str) -> list[str]:
    """The prompts of the job's testbed file ``name`` (``train_prompts`` or ``heldout_prompts``)."""
    with open(data_dir(job.run_dir, job.track) / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def run_eval(job: Job) -> dict[str, Any]:
    """Score stage ``job.stage``: a policy's exported folder on the held-out prompts against the track's SFT policy
    and reward model (`recipes.study.scoring.evaluate_policy`; the SFT stage also gets the KL-regularised optimum), or
    a reward model's accuracy against the labels and the gold reward (`recipes.study.scoring.evaluate_reward_model`)."""
    from transformers import AutoModelForCausalLM

    from recipes.modules.reward_functions import SequenceClassifierReward
    from recipes.modules.tokenizer import load_tokenizer
    from recipes.study.scoring import evaluate_policy, evaluate_reward_model, kl_regularised_optimum

    prompts, gold = read_prompts(job, "heldout_prompts"), job.testbed.gold_reward()
    reference = AutoModelForCausalLM.from_pretrained(hf_dir(job.run_dir, job.sft))
    if job.role == "reward":
        tokenizer = load_tokenizer(hf_dir(job.run_dir, job.sft))
        result = evaluate_reward_model(hf_dir(job.run_dir, job.stage), job.config["pairs_test"], reference, tokenizer,
                                       prompts, gold, job.eval, seed=job.seed)
        result.update(label=job.label, track=job.track)
        return result
    policy = AutoModelForCausalLM.from_pretrained(hf_dir(job.run_dir, job.stage))
    tokenizer = load_tokenizer(hf_dir(job.run_dir, job.stage))
    learned = SequenceClassifierReward(hf_dir(job.run_dir, job.reward)) if job.reward else None
    result = evaluate_policy(policy, reference, tokenizer, prompts, gold, learned, job.eval, seed=job.seed)
    if job.stage == job.sft:
        result["optimum"] = kl_regularised_optimum(policy, tokenizer, prompts, gold, job.eval, seed=job.seed)
    result.update(label=job.label, track=job.track)
    curve = stage_dir(job.run_dir, job.stage) / "gold_curve.json"
    result["curve"] = json.loads(curve.read_text(encoding="utf-8")) if curve.exists() else []
    return result
