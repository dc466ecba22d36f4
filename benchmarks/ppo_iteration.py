"""One PPO iteration (rollout, score, 4 update epochs) of PPOModule under a Lightning Trainer, and the rollout sampler
`recipes.modules.generation.sample` against a bare ``transformers`` ``model.generate`` (KV cache) on the same model.

    python benchmarks/ppo_iteration.py [--prompts 16] [--new-tokens 48] [--epochs 4] [--iterations 4] [--rounds 9]
                                       [--threads 2]

Workload (issue #5): the benchmark Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 4096), 16 random
prompts of 32 tokens, 48 new tokens, temperature 1 without top-k / top-p, 4 PPO epochs in one minibatch.

1. Sampler against the floor (one process): ``sample`` and ``generate`` run on the same model, prompts and sampling
   settings, and both are forced to exactly ``new_tokens`` tokens by a stop id the model cannot emit (both still
   test for it every step). They alternate (ABAB, then BABA) over ``rounds`` rounds after one warm-up each; the
   median of the per-round ratios ``generate time / sample time`` is printed for the wall clock and for the process
   CPU clock (the CPU clock is steadier on a shared machine, with ``--threads 1``). Aim: >= 1.0x.
2. PPO iterations (another process, so its peak memory is its own): the rollout / score / train split of the fastest
   iteration after the first, and the rollout's tokens/s against the floor's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BENCH_LLAMA, run_isolated  # noqa: E402

PROMPT_LEN = 32


def make_prompts(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (n, PROMPT_LEN), generator=g)  # byte-tokenizer ids, so responses decode
    return ids, torch.ones_like(ids)


def sampler_vs_generate(prompts: int, new_tokens: int, rounds: int, threads: int) -> dict:
    """Alternating rounds of ``sample`` and ``generate``; per-round times and the median ratios."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes.modules.generation import sample

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**BENCH_LLAMA)).eval()
    ids, mask = make_prompts(prompts)
    never = BENCH_LLAMA["vocab_size"]  # a stop id outside the vocabulary: every row runs to new_tokens

    def floor() -> int:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, pad_token_id=0, eos_token_id=never)
        return out.shape[1] - PROMPT_LEN

    def ours() -> int:
        gen = sample(model, ids, mask, new_tokens, never, 0, temperature=1.0, top_k=0, top_p=1.0,
                     generator=torch.Generator().manual_seed(1))
        return gen.response_ids.shape[1]

    sides = {"generate": floor, "sample": ours}
    times = {name: {"wall": [], "cpu": []} for name in sides}
    for name, fn in sides.items():  # warm-up, and a check that both sides make exactly new_tokens tokens
        if (made := fn()) != new_tokens:
            raise RuntimeError(f"{name} made {made} tokens instead of {new_tokens}: the comparison would be unfair.")
    for r in tqdm(range(rounds), desc="sample vs generate rounds"):
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


def ppo_iteration(prompts: int, new_tokens: int, epochs: int, iterations: int, threads: int) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from recipes.modules.models import ModelSpec
    from recipes.modules.ppo import PPOModule
    from recipes.modules.reward_functions import CharacterFractionReward
    from recipes.modules.tokenizer import load_tokenizer

    class Record(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, *args):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = load_tokenizer("builtin:byte")  # pad 0, bos 1, eos 2: the ids BENCH_LLAMA uses
    module = PPOModule(model=ModelSpec(config=dict(BENCH_LLAMA)), critic=ModelSpec(config=dict(BENCH_LLAMA)),
                       reward=CharacterFractionReward(), tokenizer=tok, max_new_tokens=new_tokens, top_k=0,
                       ppo_epochs=epochs, mini_batch_size=prompts)
    ids, mask = make_prompts(prompts)
    batch = {"input_ids": ids, "attention_mask": mask, "prompts": ["p"] * prompts, "metadata": [{}] * prompts}
    record = Record()
    trainer = L.Trainer(max_steps=iterations, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=True, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, torch.utils.data.DataLoader([batch] * iterations, batch_size=None))
    rows = record.rows[1:]  # the first iteration warms up allocators
    best = min(rows, key=lambda r: r["time/rollout_s"] + r["time/train_s"])
    return {k: best[k] for k in ("time/generate_s", "time/score_s", "time/rollout_s", "time/train_s",
                                 "rollout/tokens_per_s", "ppo/response_length")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cmp = run_isolated(sampler_vs_generate, args.prompts, args.new_tokens, args.rounds, args.threads)
    ours = run_isolated(ppo_iteration, args.prompts, args.new_tokens, args.epochs, args.iterations, args.threads)
    print(f"tiny Llama (hidden 256, 4 layers, vocab 4096), {args.prompts} prompts x {PROMPT_LEN} tokens, "
          f"{args.new_tokens} new tokens, {args.epochs} PPO epochs, {args.threads} thread(s)")
    for clock in ("wall", "cpu"):
        print(f"sample vs generate, {clock:<4} clock: {cmp[f'{clock}_sample_tokens_per_s']:8.1f} vs "
              f"{cmp[f'{clock}_generate_tokens_per_s']:8.1f} tokens/s (medians); median per-round ratio "
              f"{cmp[f'{clock}_ratio']:.3f}x  rounds {cmp[f'{clock}_ratios']}")
    total = ours["time/rollout_s"] + ours["time/train_s"]
    print(f"PPO iteration {total:.3f} s = rollout {ours['time/rollout_s']:.3f} s (generate "
          f"{ours['time/generate_s']:.3f} s, score {ours['time/score_s']:.4f} s, log-probs/values the rest) + train "
          f"{ours['time/train_s']:.3f} s")
    floor = cmp["wall_generate_tokens_per_s"]
    rate = ours["rollout/tokens_per_s"]
    print(f"PPO rollout tokens/s {rate:8.1f} vs generate {floor:8.1f} (wall, median) = {rate / floor:.3f}x "
          f"({ours['ppo/response_length']:.1f} tokens per response)")
    print(f"peak memory growth of the PPO process {ours['peak_rss_mb']:.1f} MB")


if __name__ == "__main__":
    main()
