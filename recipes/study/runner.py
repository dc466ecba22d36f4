"""``python -m recipes study``: train and compare the study's methods on its tracks' built-in testbeds.

Parse the study config, write each seed's testbed per track, run every stage's fit and evaluation as a dependency
graph over ``workers`` processes (with a progress bar), then write the report (`recipes.study.report`)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

import yaml
from recipes.study.findings import Finding
from recipes.study.scoring import EvalSpec
from recipes.study.stages import Job, data_dir, lightning_config, resolve_stages, run_job, stage_dependencies
from recipes.study.testbed import TestbedSpec, write_testbed

log = logging.getLogger(__name__)


@dataclass
class Track:
    """One track of the study: its testbed and the stages every evaluation of the track reads.

    Args:
        title: what the track is, as the report names it.
        testbed: the track's testbed (its own prompts, gold reward, demonstrations and pairs).
        sft: the stage whose policy is the reference of every evaluation (KL, win-rate) in the track.
        reward: the learned reward model whose score of each policy's samples is reported; None: none is learned.
    """

    title: str = ""
    testbed: TestbedSpec = field(default_factory=TestbedSpec)
    sft: str = "sft"
    reward: str | None = None


def track_needs(track: Track) -> list[str]:
    """The stages every evaluation of ``track`` waits for."""
    return [track.sft] + ([track.reward] if track.reward else [])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m recipes study", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="the study YAML, e.g. yaml/study/tiny.yaml")
    parser.add_argument("--seeds", type=list[int], default=[0], help="seeds to run, e.g. [0,1,2,3,4]")
    parser.add_argument("--out", type=str, default="runs/study", help="output folder")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (1 thread each)")
    parser.add_argument("--tracks", type=dict[str, Track], default={"A": Track()},
                        help="track name -> {title, testbed, sft, reward}")
    parser.add_argument("--eval", type=EvalSpec, default=EvalSpec())
    parser.add_argument("--defaults", type=dict, default={}, help="merged into every stage's config")
    parser.add_argument("--stages", type=dict, default={}, help="stage name -> {track, label, role, extends, "
                        "frontier, standardize, config}")
    parser.add_argument("--findings", type=list[Finding], default=[], help="the claims the report judges")
    parser.add_argument("--doc", type=str | None, default=None,
                        help="also write the report into this markdown file between its study markers (docs/study.md)")
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
    """Apply ``PATH=VALUE`` overrides (VALUE read as YAML) to the nested dict ``tree`` in place, before ``extends`` is
    resolved (so stages extending the one set inherit it). Missing mappings inside a stage's ``config`` are created;
    a missing stage or top-level key is an error."""
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: write PATH=VALUE, e.g. stages.dpo.config.trainer.max_steps=50.")
        path, raw = item.split("=", 1)
        keys, node = path.split("."), tree
        for depth, key in enumerate(keys[:-1]):
            if key not in node and depth >= 3:  # inside stages.NAME.config: an override the stage lacked
                node[key] = {}
            if not isinstance(node.get(key), dict):
                raise TypeError(f"--set {item!r}: '{key}' is not a mapping under stages/defaults of the study config "
                                "(testbed and eval values are options: e.g. --tracks.B.testbed.num_sft 500).")
            node = node[key]
        node[keys[-1]] = yaml.safe_load(raw)


def plan_jobs(cfg: Any, stages: dict[str, dict[str, Any]], seed: int, run_dir: str,
              defaults: dict[str, Any]) -> dict[str, tuple[Job, set[str]]]:
    """Every job of one seed with the keys of the jobs it waits for: a fit per stage, an eval per policy or reward
    stage (which also waits for its track's SFT and reward stages)."""
    jobs: dict[str, tuple[Job, set[str]]] = {}
    for name, entry in stages.items():
        track = cfg.tracks[entry["track"]]
        common = dict(seed=seed, run_dir=run_dir, testbed=track.testbed, eval=cfg.eval, label=entry["label"],
                      track=entry["track"], role=entry["role"], sft=track.sft, reward=track.reward)
        fit = Job("fit", name, config=entry["config"], standardize=entry["standardize"], **common)
        fit.config = lightning_config(fit, defaults)
        deps = stage_dependencies(entry["config"]) | ({track.sft} if entry["standardize"] else set())
        jobs[fit.key] = (fit, {f"seed{seed}/fit:{dep}" for dep in deps})
        if entry["role"] != "helper":
            config = {}
            if entry["role"] == "reward":
                train_pairs = str(fit.config["data"]["init_args"]["data"])
                config["pairs_test"] = train_pairs.removesuffix(".jsonl") + "_test.jsonl"  # written by the testbed
            ev = Job("eval", name, config=config, **common)
            jobs[ev.key] = (ev, {fit.key} | {f"seed{seed}/fit:{s}" for s in track_needs(track)})
    return jobs


def select(stages: dict[str, dict[str, Any]], tracks: dict[str, Track],
           only: list[str] | None) -> dict[str, dict[str, Any]]:
    """The stages in ``only`` plus everything they (and their evaluations) depend on; all stages when None."""
    if only is None:
        return stages
    unknown = set(only) - set(stages)
    if unknown:
        raise ValueError(f"--only: no stage(s) {sorted(unknown)}; stages are {sorted(stages)}.")
    keep, todo = set(), list(only)
    while todo:
        name = todo.pop()
        keep.add(name)
        track = tracks[stages[name]["track"]]
        todo += [d for d in stage_dependencies(stages[name]["config"]) | set(track_needs(track)) if d not in keep]
    return {k: v for k, v in stages.items() if k in keep}


def check_tracks(stages: dict[str, dict[str, Any]], tracks: dict[str, Track]) -> None:
    """Every stage names a track; every track with stages has its SFT and reward stages."""
    for name, entry in stages.items():
        if entry["track"] not in tracks:
            raise ValueError(f"study config: stages.{name}.track is {entry['track']!r}; tracks are {sorted(tracks)} "
                             "(every stage names its track).")
    for t, track in tracks.items():
        if not any(entry["track"] == t for entry in stages.values()):
            continue  # not run (--only)
        for need in track_needs(track):
            if need not in stages or stages[need]["track"] != t:
                raise ValueError(f"study config: tracks.{t} reads stage {need!r}, which is not a stage of track {t}.")


def die_with_parent(parent: int) -> None:
    """A worker's initializer: on Linux, ask the kernel to SIGKILL this process when the process that started it
    dies (``prctl(PR_SET_PDEATHSIG)``), so a study killed by any signal, ``kill -9`` included, leaves no worker
    training on; exits at once if that parent is already gone. Elsewhere it does nothing."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def worker_pool(workers: int) -> cf.ProcessPoolExecutor:
    """``workers`` spawned processes (fresh interpreters: no forked torch thread pools) that die with this one."""
    import os

    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                  initializer=die_with_parent, initargs=(os.getpid(),))


def execute(jobs: dict[str, tuple[Job, set[str]]], workers: int) -> dict[str, dict[str, Any]]:
    """Run the job graph over ``workers`` spawned processes, at most ``workers`` jobs in flight, the ready job of the
    earliest seed first (so seeds finish one after another); a failed job fails the study, naming the job."""
    from tqdm.auto import tqdm

    results: dict[str, dict[str, Any]] = {}
    pending, running, started = dict(jobs), {}, {}
    with worker_pool(workers) as pool, \
            tqdm(total=len(jobs), desc="study", unit="job") as bar:
        while pending or running:
            ready = [k for k, (_, deps) in pending.items() if deps <= results.keys()]
            for key in ready[:max(0, workers - len(running))]:  # pending keeps seed-major order
                running[pool.submit(run_job, pending.pop(key)[0])] = key
                started[key] = time.perf_counter()
            if not running:
                missing = {k: sorted(d - results.keys()) for k, (_, d) in pending.items()}
                raise RuntimeError(f"study: jobs wait on jobs that do not exist: {missing}")
            done, _ = cf.wait(running, timeout=2.0, return_when=cf.FIRST_COMPLETED)
            if not done:  # a long job: show what runs and for how long, so the bar never sits still
                now = time.perf_counter()
                bar.set_postfix_str(", ".join(f"{k} {now - started[k]:.0f}s" for k in running.values()))
                continue
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


def run_command(args: list[str]) -> str:
    """The command that produces the study's numbers: these arguments less ``--report_only`` (which rewrites the
    report of a run made without it)."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--report_only":
            skip = True
        elif not a.startswith("--report_only="):
            kept.append(a)
    return " ".join(["python -m recipes study", *kept])


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
    stages = select(resolve_stages(raw["stages"]), cfg.tracks, cfg.only)
    check_tracks(stages, cfg.tracks)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    study = {"tracks": cfg.tracks, "findings": cfg.findings, "stages": stages, "seeds": list(cfg.seeds),
             "command": run_command(list(args) if args is not None else sys.argv[1:])}
    if cfg.report_only:
        evals = [e for e in collect(out) if e["seed"] in cfg.seeds and e["stage"] in stages]
        if not evals:
            raise FileNotFoundError(f"--report_only: no seed*/*/eval.json under {out} for seeds {cfg.seeds}.")
        run = out / "run.json"  # the wall time of the run that made the evaluations
        wall = json.loads(run.read_text(encoding="utf-8"))["wall_seconds"] if run.exists() else 0.0
        report = write_report(evals, study, out, wall_seconds=wall, doc=cfg.doc)
        print(report["table"])
        return report
    jobs: dict[str, tuple[Job, set[str]]] = {}
    for seed in cfg.seeds:
        run_dir = str(out / f"seed{seed}")
        for t in {entry["track"] for entry in stages.values()}:
            write_testbed(cfg.tracks[t].testbed, seed, data_dir(run_dir, t))
        jobs.update(plan_jobs(cfg, stages, seed, run_dir, raw["defaults"]))
    (out / "study_config.yaml").write_text(parser.dump(parsed), encoding="utf-8")
    start = time.perf_counter()
    results = execute(jobs, cfg.workers)
    wall = time.perf_counter() - start
    (out / "run.json").write_text(json.dumps({"wall_seconds": wall, "workers": cfg.workers, "seeds": cfg.seeds}))
    evals = [r for r in results.values() if r["kind"] == "eval"]
    report = write_report(evals, study, out, wall_seconds=wall, doc=cfg.doc)
    print(report["table"])
    print(f"\nwrote {out}/results.md, results.csv and study_*.png ({wall / 60:.1f} min wall, {cfg.workers} workers)")
    (out / "timings.json").write_text(json.dumps({k: {"seconds": r["seconds"], "cpu_seconds": r.get("cpu_seconds")}
                                                  for k, r in results.items()}, indent=1))
    return report
