"""``python -m recipes study``: parse the study config, write each seed's testbed, run every stage's fit and
evaluation as a dependency graph over ``workers`` processes (with a progress bar), then write the report."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

import yaml
from recipes.study.scoring import EvalSpec
from recipes.study.stages import Job, resolve_stages, run_job, stage_dependencies
from recipes.study.testbed import TestbedSpec, write_testbed

log = logging.getLogger(__name__)
REQUIRED_STAGES = ("sft", "reward")  # every evaluation compares with the SFT policy and reads the reward model


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m recipes study", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="the study YAML, e.g. yaml/study/tiny.yaml")
    parser.add_argument("--seeds", type=list[int], default=[0], help="seeds to run, e.g. [0,1,2,3,4]")
    parser.add_argument("--out", type=str, default="runs/study", help="output folder")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (1 thread each)")
    parser.add_argument("--testbed", type=TestbedSpec, default=TestbedSpec())
    parser.add_argument("--eval", type=EvalSpec, default=EvalSpec())
    parser.add_argument("--defaults", type=dict, default={}, help="merged into every stage's config")
    parser.add_argument("--stages", type=dict, default={}, help="stage name -> {label, evaluate, "
                        "extends, config}")
    parser.add_argument("--only", type=list[str] | None, default=None,
                        help="run only these stages (and what they need), e.g. [sft,reward,dpo]")
    parser.add_argument("--report_only", type=bool, default=False,
                        help="train nothing: rewrite the report from the evaluations already in --out")
    parser.add_argument("--set", type=list[str], default=[],
                        help="dotted overrides of the stages/defaults tree, PATH=YAML_VALUE, e.g. "
                             "stages.ppo_ema.config.model.init_args.kl_coef=0.05")
    return parser


def gather_lists(args: list[str], options: tuple[str, ...] = ("--seeds", "--set", "--only")) -> list[str]:
    """Let list options take plain space-separated values: ``--seeds 0 1 2`` -> ``--seeds [0,1,2]`` and
    ``--set A=1 B=2`` -> ``--set ["A=1","B=2"]`` (a value already written as a ``[...]`` list is kept)."""
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        if args[i] in options and i + 1 < len(args) and not args[i + 1].lstrip().startswith("["):
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            out.append(json.dumps(args[i + 1:j]) if args[i] != "--seeds" else "[" + ",".join(args[i + 1:j]) + "]")
            i = j
            continue
        i += 1
    return out


def apply_sets(tree: dict[str, Any], sets: list[str]) -> None:
    """Apply ``PATH=VALUE`` overrides (VALUE read as YAML) to the nested dict ``tree`` in place."""
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: write PATH=VALUE, e.g. stages.dpo.config.trainer.max_steps=50.")
        path, raw = item.split("=", 1)
        keys, node = path.split("."), tree
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise TypeError(f"--set {item!r}: '{key}' is not a mapping under stages/defaults of the study config "
                                "(testbed and eval values are options: e.g. --testbed.behaviour.p_upper 0.1).")
            node = node[key]
        node[keys[-1]] = yaml.safe_load(raw)


def plan_jobs(cfg: Any, stages: dict[str, dict[str, Any]], seed: int, run_dir: str) -> dict[str, tuple[Job, set[str]]]:
    """Every job of one seed with the keys of the jobs it waits for: a fit per stage, an eval per evaluated stage."""
    jobs: dict[str, tuple[Job, set[str]]] = {}
    for name, entry in stages.items():
        label = entry["label"] if entry["evaluate"] else ""
        fit = Job("fit", name, seed, run_dir, entry["config"], cfg.testbed, cfg.eval, label)
        jobs[fit.key] = (fit, {f"seed{seed}/fit:{dep}" for dep in stage_dependencies(entry["config"])})
        if entry["evaluate"]:
            ev = Job("eval", name, seed, run_dir, {}, cfg.testbed, cfg.eval, label)
            jobs[ev.key] = (ev, {fit.key, f"seed{seed}/fit:sft", f"seed{seed}/fit:reward"})
    return jobs


def select(stages: dict[str, dict[str, Any]], only: list[str] | None) -> dict[str, dict[str, Any]]:
    """The stages in ``only`` plus everything they (and the evaluations) depend on; all stages when None."""
    if only is None:
        return stages
    unknown = set(only) - set(stages)
    if unknown:
        raise ValueError(f"--only: no stage(s) {sorted(unknown)}; stages are {sorted(stages)}.")
    keep, todo = set(REQUIRED_STAGES), list(only) + list(REQUIRED_STAGES)
    while todo:
        name = todo.pop()
        keep.add(name)
        todo += [d for d in stage_dependencies(stages[name]["config"]) if d not in keep]
    return {k: v for k, v in stages.items() if k in keep}


def execute(jobs: dict[str, tuple[Job, set[str]]], workers: int) -> dict[str, dict[str, Any]]:
    """Run the job graph over ``workers`` spawned processes, at most ``workers`` jobs in flight, the ready job of the
    earliest seed first (so seeds finish one after another); a failed job fails the study, naming the job."""
    from tqdm.auto import tqdm

    results: dict[str, dict[str, Any]] = {}
    pending, running = dict(jobs), {}
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool, \
            tqdm(total=len(jobs), desc="study", unit="job") as bar:
        while pending or running:
            ready = [k for k, (_, deps) in pending.items() if deps <= results.keys()]
            for key in ready[:max(0, workers - len(running))]:  # pending keeps seed-major order
                running[pool.submit(run_job, pending.pop(key)[0])] = key
            if not running:
                missing = {k: sorted(d - results.keys()) for k, (_, d) in pending.items()}
                raise RuntimeError(f"study: jobs wait on jobs that do not exist: {missing}")
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                try:
                    results[key] = future.result()
                except Exception as e:
                    pool.shutdown(cancel_futures=True)
                    raise RuntimeError(f"study: job {key} failed: {e!r}. Its Lightning config is in the stage folder "
                                       "(study_stage.yaml); rerun it with python -m recipes fit --config.") from e
                bar.set_postfix_str(f"{key} {results[key]['seconds']:.0f}s")
                bar.update(1)
    return results


def collect(out: Path) -> list[dict[str, Any]]:
    """Every evaluation already written under ``out`` (``seed*/STAGE/eval.json``), for ``--report_only``."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("seed*/*/eval.json"))]


def add_probes(report: dict[str, Any], cfg: Any, out: Path) -> None:
    """Score `recipes.study.scoring.ood_probes` with each seed's reward model; append the table to results.md."""
    from recipes.study.report import probe_markdown
    from recipes.study.scoring import probe_reward_model

    probes = []
    for seed in cfg.seeds:
        run_dir = out / f"seed{seed}"
        if not (run_dir / "reward" / "hf").exists():
            continue
        with open(run_dir / "data" / "heldout_prompts.jsonl", encoding="utf-8") as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
        probes += [{"seed": seed, **row} for row in
                   probe_reward_model(str(run_dir / "reward" / "hf"), prompts, cfg.testbed.gold_reward())]
    if probes:
        report["table"] += probe_markdown(probes, out)
        report["probes"] = probes
        (out / "results.md").write_text(report["table"], encoding="utf-8")


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the study; returns ``{"rows": [...], "table": markdown, "out": folder}`` (see `recipes.study.report`)."""
    from recipes.study.report import write_report

    parser = build_parser()
    import sys

    parsed = parser.parse_args(gather_lists(list(args) if args is not None else sys.argv[1:]))
    cfg = parser.instantiate_classes(parsed)  # the testbed and eval sections become TestbedSpec / EvalSpec
    # the stage configs stay plain dicts (instantiate_classes would build their class_path entries)
    raw = {"stages": parsed.stages.as_dict() if hasattr(parsed.stages, "as_dict") else dict(parsed.stages),
           "defaults": parsed.defaults.as_dict() if hasattr(parsed.defaults, "as_dict") else dict(parsed.defaults)}
    apply_sets(raw, cfg.set)
    stages = select(resolve_stages(raw["stages"]), cfg.only)
    missing = [s for s in REQUIRED_STAGES if s not in stages]
    if missing:
        raise ValueError(f"study config: stages {missing} are required (evaluations compare with the SFT policy and "
                         "read the reward model).")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.report_only:
        evals = [e for e in collect(out) if e["seed"] in cfg.seeds and e["stage"] in stages]
        if not evals:
            raise FileNotFoundError(f"--report_only: no seed*/*/eval.json under {out} for seeds {cfg.seeds}.")
        report = write_report(evals, stages, out, seeds=list(cfg.seeds))
        add_probes(report, cfg, out)
        print(report["table"])
        return report
    jobs: dict[str, tuple[Job, set[str]]] = {}
    for seed in cfg.seeds:
        run_dir = str(out / f"seed{seed}")
        write_testbed(cfg.testbed, seed, Path(run_dir) / "data")
        seed_jobs = plan_jobs(cfg, stages, seed, run_dir)
        for key, (job, deps) in seed_jobs.items():
            from recipes.study.stages import lightning_config

            if job.kind == "fit":
                job.config = lightning_config(job, raw["defaults"])
            jobs[key] = (job, deps)
    (out / "study_config.yaml").write_text(parser.dump(parsed), encoding="utf-8")
    start = time.perf_counter()
    results = execute(jobs, cfg.workers)
    wall = time.perf_counter() - start
    evals = [r for r in results.values() if r["kind"] == "eval"]
    report = write_report(evals, stages, out, wall_seconds=wall, seeds=list(cfg.seeds))
    add_probes(report, cfg, out)
    print(report["table"])
    print(f"\nwrote {out}/results.md, results.csv and study_*.png ({wall / 60:.1f} min wall, {cfg.workers} workers)")
    (out / "timings.json").write_text(json.dumps({k: {"seconds": r["seconds"], "cpu_seconds": r.get("cpu_seconds")}
                                                  for k, r in results.items()}, indent=1))
    return report
