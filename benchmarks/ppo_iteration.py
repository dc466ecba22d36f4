"""One PPO iteration (rollout, score, 4 update epochs) of PPOModule under a Lightning Trainer against a bare-PyTorch
PPO floor in the same process, and the rollout sampler `recipes.modules.generation.sample` against a bare
``transformers`` ``model.generate`` (KV cache) on the same model.

    python benchmarks/ppo_iteration.py [--prompts 16] [--new-tokens 48] [--epochs 4] [--iterations 7] [--rounds 9]
                                       [--threads 2] [--reward model|function] [--skip-sampler] [--skip-memory]
                                       [--precision 32-true|bf16-mixed]

Workload (issue #19): policy, critic and reward model all the benchmark Llama (hidden 256, 4 layers, 4 heads,
intermediate 688, vocab 4096; the reward model a random one-label sequence classifier saved to a folder and read
through `recipes.modules.reward_functions.SequenceClassifierReward`), 16 random lowercase prompts of 48-80 byte tokens
(left-padded to the longest), 48 new tokens at temperature 1 without top-k / top-p, 4 PPO epochs in one minibatch,
PPOModule's defaults otherwise (KL 0.1 k1, GAE gamma = lambda = 1, whitened advantages, clip 0.2 and value clip 0.2,
reward clip 20, gradient norm 1 per model, AdamW 1e-5). ``--reward function`` scores with `CharacterFractionReward`.

1. Sampler against ``generate`` (own process): both forced to exactly ``new_tokens`` tokens by a stop id the model
   cannot emit; alternating rounds (ABAB, then BABA), the median per-round ratio for the wall and the CPU clock.
2. PPO iteration against the floor (one process): a callback runs one floor iteration before (odd steps) or after
   (even steps) each of PPOModule's, so both see the same load; the first pair warms up. Per phase (sampling,
   scoring, the whole rollout, the update epochs, the iteration) the medians and the median per-pair ratio.
   The floor (`BarePPO`) is the same math in its cheapest exact form: prompts' left padding trimmed to the longest
   prompt, sampling in a plain loop on the KV cache `generation.preallocated_cache` builds (a buffer written in place;
   transformers' ``DynamicCache`` copies the cache every step), draws by inverse CDF, the reward model's head only at
   the last token, the policy's LM head and the critic's value head only at the positions that predict a response
   token (hidden states gathered first), no pad tail past the longest response, GAE as a reverse cumulative sum
   (gamma = lambda = 1), and each update's losses as plain token means. The old log-probs are recomputed by a full
   forward, as PPOModule does, so the first ratio is exactly 1 (KV-cache logits may round differently).
3. Peak memory (``--skip-memory`` skips it): each side alone in a fresh process for 2 iterations, untimed, under
   `benchmarks.common.LIVE_MEMORY_ENV` (the live tensors' peak, not what malloc kept cached).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BENCH_LLAMA, loadavg, ratio_line, run_isolated  # noqa: E402
from benchmarks.ppo_floor import BarePPO  # noqa: E402

PHASES = ("generate", "score", "rollout", "train", "iteration", "iteration_cpu")  # *_cpu: process CPU seconds


def make_prompts(n: int, seed: int = 0):
    """``n`` random lowercase texts of 48-80 characters, byte-tokenized (one token each, no BOS) and left-padded to
    the longest: ``(input_ids, attention_mask, texts)``, the texts being what a reward model reads as the prompt."""
    import random

    import torch

    from recipes.modules.tokenizer import load_tokenizer

    rng, tok = random.Random(seed), load_tokenizer("builtin:byte")
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(48, 80))) for _ in range(n)]
    rows = tok(texts, add_special_tokens=True)["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    return ids, mask, texts


def save_reward_model(folder: str) -> str:
    """A random one-label BENCH_LLAMA sequence classifier and the byte tokenizer, saved as a reward-model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from recipes.modules.tokenizer import load_tokenizer

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**BENCH_LLAMA, num_labels=1))
    model.save_pretrained(folder)
    load_tokenizer("builtin:byte").save_pretrained(folder)
    return folder


def sampler_vs_generate(prompts: int, new_tokens: int, rounds: int, threads: int) -> dict:
    """Alternating rounds of ``sample`` and ``generate``; per-round times and the median ratios."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes.modules.generation import sample

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**BENCH_LLAMA)).eval()
    ids, mask, _ = make_prompts(prompts)
    never = BENCH_LLAMA["vocab_size"]  # a stop id outside the vocabulary: every row runs to new_tokens

    def floor() -> int:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, pad_token_id=0, eos_token_id=never)
        return out.shape[1] - ids.shape[1]

    def ours() -> int:
        gen = sample(model, ids, mask, new_tokens, never, 0, temperature=1.0, top_k=0, top_p=1.0,
                     generator=torch.Generator().manual_seed(1))
        return gen.response_ids.shape[1]

    sides = {"generate": floor, "sample": ours}
    times = {name: {"wall": [], "cpu": []} for name in sides}
    for name, fn in sides.items():  # warm-up, and a check that both sides make exactly new_tokens tokens
        if (made := fn()) != new_tokens:
            raise RuntimeError(f"{name} made {made} tokens instead of {new_tokens}: the comparison would be unfair.")
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name]()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    out = {}
    for clock in ("wall", "cpu"):
        floor_s, ours_s = times["generate"][clock], times["sample"][clock]
        out[f"{clock}_ratio"] = statistics.median(f / o for f, o in zip(floor_s, ours_s))
        out[f"{clock}_ratios"] = [round(f / o, 3) for f, o in zip(floor_s, ours_s)]
        for name, series in (("generate", floor_s), ("sample", ours_s)):
            out[f"{clock}_{name}_tokens_per_s"] = prompts * new_tokens / statistics.median(series)
    return out


def build_ours(reward, new_tokens: int, epochs: int, prompts: int):
    from recipes.modules.models import ModelSpec
    from recipes.modules.ppo import PPOModule
    from recipes.modules.reward_functions import CharacterFractionReward, SequenceClassifierReward
    from recipes.modules.tokenizer import load_tokenizer

    reward_fn = SequenceClassifierReward(reward) if reward else CharacterFractionReward()
    return PPOModule(model=ModelSpec(config=dict(BENCH_LLAMA)), critic=ModelSpec(config=dict(BENCH_LLAMA)),
                     reward=reward_fn, tokenizer=load_tokenizer("builtin:byte"), max_new_tokens=new_tokens, top_k=0,
                     ppo_epochs=epochs, mini_batch_size=prompts)


def ppo_paired(reward: str | None, prompts: int, new_tokens: int, epochs: int, iterations: int, threads: int,
               sides: tuple[str, ...] = ("ours", "floor"), precision: str = "32-true") -> dict:
    """``iterations`` of PPOModule under a Trainer, each paired with one floor iteration (before it on odd steps,
    after it on even ones); per-iteration phase seconds of each side. ``sides`` runs only one of them (memory).
    ``precision`` is the Trainer's; with ``bf16-mixed`` the floor's iterations run under the same CPU autocast."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from recipes.modules.reward_functions import CharacterFractionReward

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ids, mask, texts = make_prompts(prompts)
    floor = None
    if "floor" in sides:
        floor = BarePPO(reward or CharacterFractionReward(), new_tokens, epochs, prompts)
        if precision == "bf16-mixed":  # what Lightning's MixedPrecision plugin wraps each training step in on a CPU
            bare_iteration = floor.iteration

            def autocast_iteration(*args):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return bare_iteration(*args)

            floor.iteration = autocast_iteration
        elif precision != "32-true":
            raise ValueError(f"--precision {precision}: this benchmark runs 32-true or bf16-mixed")
    rows: dict[str, list[dict]] = {"ours": [], "floor": []}
    if "ours" not in sides:
        for _ in range(iterations):
            rows["floor"].append(floor.iteration(ids, mask, texts))
        return rows

    class Paired(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if floor is not None and batch_idx % 2 == 1:
                rows["floor"].append(floor.iteration(ids, mask, texts))
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            rows["ours"].append({"generate": m["time/generate_s"], "score": m["time/score_s"],
                                 "rollout": m["time/rollout_s"], "train": m["time/train_s"],
                                 "iteration": time.perf_counter() - self.start,
                                 "iteration_cpu": time.process_time() - self.cpu, "entropy": m["ppo/entropy"]})
            if floor is not None and batch_idx % 2 == 0:
                rows["floor"].append(floor.iteration(ids, mask, texts))

    module = build_ours(reward, new_tokens, epochs, prompts)
    batch = {"input_ids": ids, "attention_mask": mask, "prompts": texts, "metadata": [{}] * prompts}
    trainer = L.Trainer(max_steps=iterations, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Paired()],
                        precision=precision)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * iterations, batch_size=None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=7, help="paired iterations (the first one warms up)")
    parser.add_argument("--rounds", type=int, default=9, help="sampler-vs-generate rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reward", choices=("model", "function"), default="model")
    parser.add_argument("--skip-sampler", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true",
                        help="bf16-mixed: Lightning's CPU autocast for ours, the same autocast for the floor "
                        "(an inexact change: the issue's workload is 32-true)")
    args = parser.parse_args()
    print(f"load average before: {loadavg()}")
    with tempfile.TemporaryDirectory() as folder:
        reward = save_reward_model(folder) if args.reward == "model" else None
        work = (args.prompts, args.new_tokens, args.epochs)
        cmp = None if args.skip_sampler else run_isolated(sampler_vs_generate, args.prompts, args.new_tokens,
                                                          args.rounds, args.threads)
        paired = run_isolated(ppo_paired, reward, *work, args.iterations, args.threads, ("ours", "floor"),
                              args.precision)
        memory = {} if args.skip_memory else {side: run_isolated(ppo_paired, reward, *work, 2, args.threads, (side,),
                                                                  args.precision, live_memory=True)
                                              for side in ("floor", "ours")}
    print(f"load average after: {loadavg()}")
    print(f"PPO iteration, tiny Llama (hidden 256, 4 layers, vocab 4096) as policy, critic and reward "
          f"{'model' if reward else 'function'}; {args.prompts} prompts x 48-80 tokens, {args.new_tokens} new tokens, "
          f"{args.epochs} PPO epochs in one minibatch, {args.threads} thread(s), precision {args.precision}")
    if cmp is not None:
        for clock in ("wall", "cpu"):
            print(f"sample vs generate, {clock:<4} clock: {cmp[f'{clock}_sample_tokens_per_s']:8.1f} vs "
                  f"{cmp[f'{clock}_generate_tokens_per_s']:8.1f} tokens/s (medians); median per-round ratio "
                  f"{cmp[f'{clock}_ratio']:.3f}x  rounds {cmp[f'{clock}_ratios']}")
    ours, floor = paired["ours"][1:], paired["floor"][1:]  # the first pair warms up
    print(f"[ours vs bare PPO floor, same process, median of {len(ours)} alternating pairs after one warm-up]")
    for phase in PHASES:
        o, f = statistics.median(r[phase] for r in ours), statistics.median(r[phase] for r in floor)
        pair = statistics.median(a[phase] / b[phase] for a, b in zip(ours, floor))
        print(ratio_line(f"  {phase}", o, f, "s") + f"  (median per-pair {pair:.3f}x)")
    print(f"  entropy of the sampling policy (same math): ours {statistics.median(r['entropy'] for r in ours):.4f}, "
          f"floor {statistics.median(r['entropy'] for r in floor):.4f} nats")
    if memory:
        print(ratio_line("  peak memory growth", memory["ours"]["peak_rss_mb"], memory["floor"]["peak_rss_mb"], "MB"))


if __name__ == "__main__":
    main()
