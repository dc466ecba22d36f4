"""`python -m recipes evaluate` on tiny models built here: two policy folders and reward/cost folders whose tokenizer
differs from the policies'. Table, JSON and plots written; every count checked by hand from the written texts."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from recipes.evaluate import main
from recipes.evaluate.runner import build_parser
from tests.conftest import REPO, TINY_LLAMA
from tests.recipes.evaluate.test_judge import Endpoint, prefer_longer

N = 12  # prompts


def other_tokenizer():
    """A byte-level tokenizer with the byte vocabulary in reverse order: same texts, different ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(("<pad>", "<s>", "</s>", "<unk>"))}
    for ch in sorted(ByteLevel.alphabet(), reverse=True):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Policies ``a`` and ``b`` (byte tokenizer, different random weights), ``c`` (a policy on the other
    tokenizer), and a reward and a cost model on the other tokenizer."""
    from recipes.modules.models import ModelSpec, build_causal_lm
    from recipes.modules.scalar_models import build_scalar_model
    from recipes.modules.tokenizer import load_tokenizer

    root, byte, other = tmp_path_factory.mktemp("models"), load_tokenizer("builtin:byte"), other_tokenizer()
    out = {}
    for name, seed, tok, build in (("a", 1, byte, build_causal_lm), ("b", 2, byte, build_causal_lm),
                                   ("c", 3, other, build_causal_lm), ("rm", 4, other, build_scalar_model),
                                   ("cost", 5, other, build_scalar_model)):
        torch.manual_seed(seed)
        # initializer_range 0.5: peaked next-token distributions, so two policies sample different texts from the
        # same seed (at the default 0.02 both are near uniform and draw the same tokens)
        model = build(ModelSpec(config={**TINY_LLAMA, "initializer_range": 0.5}), tok)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def evaluate(folders, out_dir, *extra, policies=("a", "b")):
    return main(["--config", str(REPO / "yaml/tiny/eval.yaml"), "--out_dir", str(out_dir), "--progress", "false",
                 "--policies", json.dumps([{"name": p, "path": folders[p]} for p in policies]),
                 "--reward.path", folders["rm"], "--prompts.max_rows", str(N), "--generation.max_new_tokens", "6",
                 "--generation.batch_size", "5", "--sft", policies[0], "--reference", policies[0], "--baselines",
                 '["chosen"]', *extra])


@pytest.fixture(scope="module")
def run(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_RECIPES_CACHE", str(out / "cache"))
        report = evaluate(folders, out, "--baselines", '["chosen", "a"]', "--cost.path", folders["cost"])
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return out, report, {m: [r for r in rows if r["method"] == m] for m in ("a", "b", "chosen")}


def test_writes_the_table_the_report_and_the_plots(run):
    out, report, _ = run
    for name in ("table.md", "table.csv", "report.json", "generations.jsonl"):
        assert (out / name).stat().st_size > 0
    for name in ("scores.png", "win_tie_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| method | RM score | vs chosen W/T/L | vs a W/T/L | KL | Δhelp | harm | safety rate |" in table
    assert [r["method"] for r in csv.DictReader((out / "table.csv").read_text().splitlines())] == ["a", "b", "chosen"]
    assert json.loads((out / "report.json").read_text())["comparisons"] == report["comparisons"]


def test_counts_add_up_and_match_the_scores_by_hand(run):
    _, report, rows = run
    assert report["prompts"]["kept"] == N and all(len(r) == N for r in rows.values())
    pairs = {(c["policy"], c["baseline"]) for c in report["comparisons"]}
    assert pairs == {("a", "chosen"), ("b", "chosen"), ("b", "a")}  # no policy against itself
    for c in report["comparisons"]:
        mine, theirs = rows[c["policy"]], rows[c["baseline"]]
        diffs = [m["reward"] - t["reward"] for m, t in zip(mine, theirs)]  # tie margin 0 in the tiny config
        assert (c["win"], c["tie"], c["loss"]) == (sum(d > 0 for d in diffs), sum(d == 0 for d in diffs),
                                                   sum(d < 0 for d in diffs))
        assert c["win"] + c["tie"] + c["loss"] == c["n"] == N


def test_saferlhf_columns_and_kl_by_hand(run):
    _, report, rows = run
    mean = lambda xs: sum(xs) / len(xs)
    for m in ("a", "b"):
        s = report["safety"][m]
        assert s["delta_help"] == pytest.approx(mean([r["reward"] for r in rows[m]]) -
                                                mean([r["reward"] for r in rows["a"]]))
        assert s["harm"] == pytest.approx(mean([r["cost"] for r in rows[m]]))
        assert s["safety_rate"] == sum(r["cost"] < 0 for r in rows[m]) / N
    assert report["safety"]["a"]["delta_help"] == 0.0
    assert all(r["kl"] == 0.0 for r in rows["a"])  # the reference is policy a itself
    assert all(math.isfinite(r["kl"]) for r in rows["b"]) and report["policies"]["b"]["kl"]["mean"] > 0


def test_a_reward_model_with_another_tokenizer_reads_its_own_ids(run, folders):
    """Score three rows by hand: the RM's own tokenizer, EOS appended, one unpadded row, the head at the last token."""
    from transformers import AutoModelForSequenceClassification

    from recipes.modules.tokenizer import load_tokenizer

    _, _, rows = run
    tok, rm = load_tokenizer(folders["rm"]), AutoModelForSequenceClassification.from_pretrained(folders["rm"])
    assert tok("Write")["input_ids"] != load_tokenizer(folders["a"])("Write")["input_ids"]
    for row in rows["b"][:3]:
        ids = tok(row["prompt"] + row["response"])["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            expected = rm(torch.tensor([ids])).logits[0, 0].item()
        assert row["reward"] == pytest.approx(expected, abs=1e-4)


def test_swapping_the_two_policies_mirrors_the_result(folders, tmp_path):
    first = evaluate(folders, tmp_path / "ab", "--baselines", '["a"]', "--reference", "null")
    second = evaluate(folders, tmp_path / "ba", "--baselines", '["b"]', "--reference", "null", policies=("b", "a"))
    (b_vs_a,), (a_vs_b,) = first["comparisons"], second["comparisons"]
    assert (b_vs_a["policy"], a_vs_b["policy"]) == ("b", "a")
    assert (a_vs_b["win"], a_vs_b["tie"], a_vs_b["loss"]) == (b_vs_a["loss"], b_vs_a["tie"], b_vs_a["win"])
    texts = [(tmp_path / d / "generations.jsonl").read_text().splitlines() for d in ("ab", "ba")]
    assert sorted(texts[0]) == sorted(texts[1])  # each policy samples the same texts whatever the order


def test_the_judge_counts_match_the_judges_rule_by_hand(folders, tmp_path):
    judge = {"base_url": "", "model": "local", "template": "Q: {prompt}\n<A>{response_a}</A>\n<B>{response_b}</B>",
             "baselines": ["chosen"], "backoff_s": 0.01, "api_key_env": None}
    with Endpoint(lambda n, c: (200, prefer_longer(c))) as ep:
        report = evaluate(folders, tmp_path, "--judge", json.dumps({**judge, "base_url": ep.url}), "--reference",
                          "null")
        cached = sum(c["cached"] for c in report["judge"])  # a text both policies sampled is judged once
        assert ep.requests + cached == 2 * 2 * N  # 2 policies x 2 orders
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    chosen = [r["response"] for r in rows if r["method"] == "chosen"]
    for c in report["judge"]:
        mine = [r["response"] for r in rows if r["method"] == c["policy"]]
        signs = [(len(m) > len(t)) - (len(m) < len(t)) for m, t in zip(mine, chosen)]  # longer wins, both orders
        assert (c["win"], c["tie"], c["loss"], c["failed"]) == (signs.count(1), signs.count(0), signs.count(-1), 0)
    assert "judge vs chosen W/T/L" in (tmp_path / "table.md").read_text()
    assert len((tmp_path / "judge_cache.jsonl").read_text().splitlines()) == 2 * 2 * N - cached


def test_a_reference_with_another_tokenizer_is_refused(folders, tmp_path):
    with pytest.raises(ValueError, match="KL reference .* different tokenizer than policy 'a'"):
        evaluate(folders, tmp_path, "--reference", folders["c"], "--baselines", "[]")


@pytest.mark.parametrize("args, message", [
    (["--baselines", '["nobody"]'], "'nobody' is neither 'chosen' nor a policy name"),
    (["--prompts.source_format", "plain", "--prompts.data", '["builtin:prompts"]'], "needs a prompt source with"),
    (["--sft", "nobody"], "sft: 'nobody' is not a policy name"),
])
def test_bad_names_are_refused_before_loading(folders, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        evaluate(folders, tmp_path, *args)


def test_a_checkpoint_without_its_run_config_is_refused(folders, tmp_path):
    ckpt = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="needs its run's config.yaml.*python -m recipes.export"):
        main(["--config", str(REPO / "yaml/tiny/eval.yaml"), "--out_dir", str(tmp_path / "out"), "--policies",
              json.dumps([{"name": "x", "path": str(ckpt)}]), "--baselines", "[]", "--sft", "null",
              "--reference", "null", "--reward", "null"])


@pytest.mark.parametrize("name", ["yaml/tiny/eval.yaml", "yaml/eval_hh_llama2.yaml"])
def test_shipped_eval_configs_parse(name):
    cfg = build_parser().parse_args(["--config", str(REPO / name)])
    assert cfg.policies and cfg.out_dir and Path(REPO / name).read_text().startswith("# ")


def test_the_commented_judge_block_of_the_7b_config_parses(tmp_path):
    """Uncommenting the judge block as its comment says gives a valid judge."""
    lines = (REPO / "yaml/eval_hh_llama2.yaml").read_text().splitlines()
    start = lines.index("judge: null")
    block = [line[1:] for line in lines[start + 2:] if line.startswith("#   ")]
    path = tmp_path / "judged.yaml"
    path.write_text("\n".join(lines[:start] + ["judge:"] + block + lines[start + 2 + len(block):]) + "\n")
    judge = build_parser().parse_args(["--config", str(path)]).judge
    assert judge.model == "gpt-4o" and judge.verdicts == {"A": "[[A]]", "B": "[[B]]", "tie": "[[C]]"}
    assert "{response_b}" in judge.template and "[[C]] for a tie" in judge.system_prompt


def test_a_lightning_checkpoint_is_exported_with_its_run_config_and_evaluated(tmp_path):
    """A `fit` checkpoint (config.yaml two folders up, where the CLI saves it) is evaluated like a folder."""
    from transformers import AutoModelForCausalLM

    from recipes.__main__ import cli_main

    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(REPO / "yaml/tiny/sft.yaml"), "--trainer.max_steps", "1",
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                    "--trainer.logger.init_args.save_dir", str(root), "--data.init_args.max_rows", "40",
                    "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0"])
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "step1.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    out = tmp_path / "out"
    report = main(["--config", str(REPO / "yaml/tiny/eval.yaml"), "--out_dir", str(out), "--progress", "false",
                   "--policies", json.dumps([{"name": "sft1", "path": str(ckpt)}]), "--baselines", "[]",
                   "--sft", "null", "--reference", "null", "--reward", "null", "--prompts.max_rows", "4",
                   "--generation.max_new_tokens", "4"])
    exported = AutoModelForCausalLM.from_pretrained(out / "exported" / "sft1")
    torch.testing.assert_close(exported.model.embed_tokens.weight, cli.model.policy.model.embed_tokens.weight)
    assert report["policies"]["sft1"]["path"] == str(ckpt) and (out / "table.md").exists()


def test_an_unreachable_judge_stops_the_run_naming_it_after_the_texts_are_written(folders, tmp_path):
    from recipes.evaluate.judge import JudgeUnreachableError
    from tests.recipes.evaluate.test_judge import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = {"base_url": url, "model": "m", "template": "{prompt}{response_a}{response_b}", "max_retries": 0}
    with pytest.raises(JudgeUnreachableError, match=f"LLM judge endpoint {url}/chat/completions is unreachable"):
        evaluate(folders, tmp_path, "--judge", json.dumps(judge), "--reference", "null")
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 3 * N  # a, b, chosen


def test_oasst_markers_by_hand():
    from recipes.datamodules.eval_prompts import oasst_pair

    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    expected = ("<|prompter|>Hi there<|endoftext|><|assistant|>Hello!<|endoftext|>"
                "<|prompter|>How are you?<|endoftext|><|assistant|>")
    assert oasst_pair(prompt, " Fine, thanks.") == (expected, "Fine, thanks.")
    with pytest.raises(ValueError, match="needs HH dialogues"):
        oasst_pair("Write abc in capital letters.\n", "ABC")


def test_real_hh_prompts_with_oasst_markers(folders, tmp_path):
    """The paper's prompt source on the real harmless test file (skipped without ../shared/data): HH dialogues up to
    the last assistant turn, the chosen reply as baseline, the reward model reading OpenAssistant markers."""
    from tests.conftest import shared_file

    path = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    report = evaluate(folders, tmp_path, "--prompts", json.dumps({"data": [str(path)], "source_format": "hh",
                                                                  "max_rows": 4, "drop_invalid": True}),
                      "--reward.text_format", "oasst", "--generation.max_prompt_length", "32", "--reference", "null")
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:") for r in rows)
    assert report["policies"]["a"]["prompts_cut"] == 4  # every dialogue is longer than 32 bytes: cut and counted
    assert {c["n"] for c in report["comparisons"]} == {4}
    from transformers import AutoModelForSequenceClassification

    from recipes.modules.tokenizer import load_tokenizer

    tok, rm = load_tokenizer(folders["rm"]), AutoModelForSequenceClassification.from_pretrained(folders["rm"])
    row = next(r for r in rows if r["method"] == "chosen")  # a multi-turn history, rewritten by hand below
    turns = [t.split(":", 1)[1].strip() for t in re.split(r"\n\n(?=Human:|Assistant:)", row["prompt"])[1:-1]]
    text = "".join(f"<|{'prompter' if i % 2 == 0 else 'assistant'}|>{t}<|endoftext|>" for i, t in enumerate(turns))
    ids = tok(text + "<|assistant|>" + row["response"].strip())["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        assert row["reward"] == pytest.approx(rm(torch.tensor([ids])).logits[0, 0].item(), abs=1e-4)
