"""`python -m recipes evaluate --config yaml/tiny/eval.yaml`: generate with each policy on a prompt set, then score
with a reward model (and a cost model), compare with baselines (win/tie/loss by reward-model score, optionally by an
LLM judge in both orders), measure the KL to a reference, and write the Table-4-shaped table, a JSON report and plots.
The steps live in `recipes.evaluate.policies`, `recipes.evaluate.metrics`, `recipes.evaluate.judge` and
`recipes.evaluate.report`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from recipes.datamodules.eval_prompts import WITH_CHOSEN, PromptSetSpec, load_eval_prompts, oasst_pair
from recipes.evaluate import report as eval_report
from recipes.evaluate.metrics import safety_summary, score_summary, win_tie_loss
from recipes.evaluate.policies import (
    GenerationSpec,
    PolicySpec,
    check_same_tokenizer,
    generate,
    load_policy,
    release_memory,
    resolve_folder,
)

log = logging.getLogger(__name__)
CHOSEN = eval_report.CHOSEN


@dataclass
class ScorerSpec:
    """A reward or cost model: a sequence-classification folder with one label (an exported ``RewardModule`` or any
    Hugging Face one) or a ``.ckpt`` (exported first). Texts are re-tokenized with its own tokenizer, so it may use
    another vocabulary than the policies (`recipes.modules.reward_functions.SequenceClassifierReward`).

    Args:
        path: the folder or checkpoint. config: a checkpoint's run config (default: two folders up).
        tokenizer: its tokenizer, when the folder holds none. append_eos: end each text with its EOS, as in training.
        batch_size: rows per forward. max_length: longer texts lose tokens from the left (counted). dtype: weights.
        text_format: ``as_is`` (prompt + response as the policies saw them) or ``oasst`` (HH dialogues rewritten in
            OpenAssistant's ``<|prompter|>``/``<|assistant|>`` markers, for its reward models).
    """

    path: str
    config: str | None = None
    tokenizer: str | None = None
    append_eos: bool = True
    batch_size: int = 16
    max_length: int | None = None
    dtype: str = "float32"
    text_format: Literal["as_is", "oasst"] = "as_is"


@dataclass
class JudgeSpec:
    """An LLM judge at an OpenAI-compatible endpoint (see `recipes.evaluate.judge.ChatJudge` for each field).

    ``baselines`` lists what each policy is judged against (judging costs calls: 2 per prompt and pair); ``cache``
    defaults to ``<out_dir>/judge_cache.jsonl``; the API key is read from the ``api_key_env`` variable, never YAML.
    """

    base_url: str
    model: str
    template: str
    system_prompt: str = ""
    verdicts: dict[str, str] = field(default_factory=lambda: {"A": "[[A]]", "B": "[[B]]", "tie": "[[C]]"})
    baselines: list[str] = field(default_factory=lambda: [CHOSEN])
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    cache: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m recipes evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--config", action=ActionConfigFile, help="a YAML with the values below")
    p.add_argument("--out_dir", type=str, required=True, help="where the table, report, plots and texts go")
    p.add_argument("--prompts", type=PromptSetSpec, default=PromptSetSpec())
    p.add_argument("--policies", type=list[PolicySpec], required=True, help="the methods, one table row each")
    p.add_argument("--generation", type=GenerationSpec, default=GenerationSpec())
    p.add_argument("--reward", type=ScorerSpec | None, default=None, help="the (helpfulness) reward model")
    p.add_argument("--cost", type=ScorerSpec | None, default=None, help="SafeRLHF cost model (negative: safe)")
    p.add_argument("--baselines", type=list[str], default=[CHOSEN], help="'chosen' or policy names")
    p.add_argument("--tie_margin", type=float, default=0.0, help="|score difference| <= margin is a tie")
    p.add_argument("--sft", type=str | None, default=None, help="the SFT policy's name (Δhelp is measured from it)")
    p.add_argument("--reference", type=str | None, default=None, help="KL reference: a policy name or folder")
    p.add_argument("--judge", type=JudgeSpec | None, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str | None, default=None, help="default: cuda when available, else cpu")
    p.add_argument("--progress", type=bool, default=True)
    return p


def check_names(cfg: Any, has_chosen: bool) -> None:
    """Refuse a config whose baselines, sft or reference name nothing, before any model is loaded."""
    names = [p.name for p in cfg.policies]
    if len(set(names)) != len(names) or CHOSEN in names:
        raise ValueError(f"policies: names must be unique and not '{CHOSEN}', got {names}.")
    judged = cfg.judge.baselines if cfg.judge else []
    for where, b in [("baselines", b) for b in cfg.baselines] + [("judge.baselines", b) for b in judged]:
        if b == CHOSEN and not has_chosen:
            raise ValueError(f"{where}: '{CHOSEN}' needs a prompt source with chosen responses (hh, saferlhf, "
                             f"generic); prompts.source_format is '{cfg.prompts.source_format}'.")
        if b != CHOSEN and b not in names:
            raise ValueError(f"{where}: '{b}' is neither '{CHOSEN}' nor a policy name ({names}).")
    if cfg.baselines and cfg.reward is None:
        raise ValueError("baselines are compared by reward-model score: set `reward`, or `baselines: []`.")
    if cfg.sft is not None and cfg.sft not in names:
        raise ValueError(f"sft: '{cfg.sft}' is not a policy name ({names}).")
    if cfg.cost is not None and (cfg.reward is None or cfg.sft is None):
        raise ValueError("cost (SafeRLHF evaluation) needs `reward` (the helpfulness model) and `sft` (Δhelp's base).")


def score(spec: ScorerSpec, name: str, out_dir: str, prompts: list[str], texts: dict[str, list[str]], device: str,
          counts: dict[str, Any], progress: bool = True) -> dict[str, torch.Tensor]:
    """Score every method's responses with one reward/cost model (loaded once, released after)."""
    from tqdm.auto import tqdm

    from recipes.modules.reward_functions import SequenceClassifierReward

    folder = resolve_folder(name, spec.path, spec.config, out_dir)
    model = SequenceClassifierReward(folder, spec.tokenizer, spec.append_eos, spec.batch_size, spec.max_length,
                                     spec.dtype).to(device)
    scores, chunk = {}, 8 * spec.batch_size  # the bar advances every 8 forward passes
    with tqdm(total=len(prompts) * len(texts), desc=f"scoring ({name})", disable=not progress) as bar:
        for method, responses in texts.items():
            shown = (prompts, responses) if spec.text_format == "as_is" else \
                tuple(map(list, zip(*(oasst_pair(p, r) for p, r in zip(prompts, responses)))))
            parts = []
            for start in range(0, len(prompts), chunk):
                parts.append(model(shown[0][start:start + chunk], shown[1][start:start + chunk]))
                bar.update(len(parts[-1]))
            scores[method] = torch.cat(parts)
    counts[f"{name}: texts cut from the left to max_length"] = model.truncated
    if model.truncated:
        log.warning("%s model: %d texts cut from the left to max_length=%s", name, model.truncated, spec.max_length)
    del model
    release_memory()
    return scores


def generate_all(cfg: Any, folders: dict[str, str], prompts: list[str], device: str
                 ) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every policy's responses (one policy loaded at a time, with the KL reference beside it): (texts, per-response
    columns for ``generations.jsonl``, per-policy report entries)."""
    reference = ref_tok = None
    if cfg.reference:  # a policy's name, or a folder (then loaded in the first policy's dtype)
        ref_folder = folders.get(cfg.reference) or resolve_folder("reference", cfg.reference, None, cfg.out_dir)
        ref_dtype = next((p.dtype for p in cfg.policies if p.name == cfg.reference), cfg.policies[0].dtype)
        reference, ref_tok = load_policy(ref_folder, ref_dtype, device)
    texts: dict[str, list[str]] = {}
    policies: dict[str, dict[str, Any]] = {}
    columns: dict[str, dict[str, Any]] = {}
    for p in cfg.policies:
        model, tok = load_policy(folders[p.name], p.dtype, device)
        if reference is not None:
            check_same_tokenizer(tok, ref_tok, p.name, cfg.reference)
        gen = generate(model, tok, prompts, cfg.generation, cfg.seed, device, reference, cfg.progress,
                       f"generating ({p.name})")
        del model
        release_memory()
        texts[p.name] = gen.responses
        columns[p.name] = {"response": gen.responses, "response_tokens": gen.response_tokens,
                           "ended_with_eos": gen.ended_with_eos, "kl": gen.kl}
        policies[p.name] = {"path": p.path, "prompts_cut": gen.prompts_cut,
                            "responses_without_eos": len(gen.ended_with_eos) - sum(gen.ended_with_eos),
                            "mean_response_tokens": sum(gen.response_tokens) / len(gen.response_tokens),
                            "kl": score_summary(torch.tensor(gen.kl)) if gen.kl is not None else None}
    del reference
    release_memory()
    return texts, columns, policies


def run(cfg: Any) -> dict[str, Any]:
    """Run the evaluation described by a parsed, instantiated config; return the report (also written)."""
    check_names(cfg, cfg.prompts.source_format in WITH_CHOSEN)
    os.makedirs(cfg.out_dir, exist_ok=True)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folders = {p.name: resolve_folder(p.name, p.path, p.config, cfg.out_dir) for p in cfg.policies}
    prompt_tok = None
    if cfg.prompts.prompt_format == "chat":  # rendered with the first policy's chat template
        from recipes.modules.tokenizer import load_tokenizer

        prompt_tok = load_tokenizer(folders[cfg.policies[0].name])
    data = load_eval_prompts(cfg.prompts, prompt_tok)
    texts, columns, policies = generate_all(cfg, folders, data.prompts, device)
    if data.chosen is not None:
        texts[CHOSEN] = data.chosen
        columns[CHOSEN] = {"response": data.chosen}
    report: dict[str, Any] = {"prompts": data.counts, "tie_margin": cfg.tie_margin, "policies": policies,
                              "comparisons": [], "judge": [], "safety": None}
    rewards = score(cfg.reward, "reward", cfg.out_dir, data.prompts, texts, device, data.counts,
                    cfg.progress) if cfg.reward else {}
    for method, values in rewards.items():
        columns[method]["reward"] = values.tolist()
        (policies[method] if method in policies else report.setdefault(CHOSEN, {}))["reward"] = score_summary(values)
        for b in cfg.baselines if method in policies else []:
            if b != method:
                result = win_tie_loss(values, rewards[b], cfg.tie_margin)
                report["comparisons"].append({"policy": method, "baseline": b, "by": "reward", **result.as_dict()})
    if cfg.cost is not None:
        costs = score(cfg.cost, "cost", cfg.out_dir, data.prompts, {p: texts[p] for p in policies}, device,
                      data.counts, cfg.progress)
        report["safety"] = {m: safety_summary(rewards[m], rewards[cfg.sft], c) for m, c in costs.items()}
        for m, c in costs.items():
            columns[m]["cost"], policies[m]["cost"] = c.tolist(), score_summary(c)
    files = {"generations": eval_report.write_generations(os.path.join(cfg.out_dir, "generations.jsonl"),
                                                          data.prompts, columns)}
    if cfg.judge is not None:
        report["judge"] = run_judge(cfg, data.prompts, texts)
    files["table_md"], files["table_csv"] = eval_report.write_table(report, cfg.out_dir)
    if rewards:
        files["scores_png"] = eval_report.plot_scores({m: v.tolist() for m, v in rewards.items()},
                                                      os.path.join(cfg.out_dir, "scores.png"))
    bars = report["comparisons"] + [dict(c, by="judge") for c in report["judge"]]
    if bars:
        files["win_tie_loss_png"] = eval_report.plot_win_tie_loss(bars, os.path.join(cfg.out_dir, "win_tie_loss.png"))
    report["files"] = {**files, "report": os.path.join(cfg.out_dir, "report.json")}
    report["config"] = {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in vars(cfg).items()
                        if k != "config"}
    report["config"]["policies"] = [asdict(p) for p in cfg.policies]
    eval_report.write_json(report, cfg.out_dir)
    with open(files["table_md"], encoding="utf-8") as f:
        print(f.read())
    return report


def run_judge(cfg: Any, prompts: list[str], texts: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Judge each policy against each of ``judge.baselines`` in both orders (resumable through the cache)."""
    from recipes.evaluate.judge import ChatJudge

    j = cfg.judge
    cache = j.cache or os.path.join(cfg.out_dir, "judge_cache.jsonl")
    judge = ChatJudge(j.base_url, j.model, j.template, j.system_prompt, j.verdicts, j.temperature, j.max_tokens,
                      j.timeout_s, j.max_retries, j.backoff_s, cache, j.api_key_env, j.concurrency)
    out = []
    for p in cfg.policies:
        for b in j.baselines:
            if b != p.name:
                comparison = judge.compare(prompts, texts[p.name], texts[b], cfg.progress, f"judging {p.name} vs {b}")
                out.append({"policy": p.name, "baseline": b, **comparison.as_dict()})
    return out


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (a config and overrides) and run the evaluation; return the report."""
    parser = build_parser()
    cfg = parser.instantiate(parser.parse_args(args))
    return run(cfg)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
