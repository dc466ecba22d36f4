"""One PPO iteration (rollout, score, 4 update epochs) of PPOModule under a Lightning Trainer, with the rollout's
token throughput against a bare ``transformers`` ``model.generate`` (KV cache, same sampling) on the same model.

    python benchmarks/ppo_iteration.py [--prompts 16] [--new-tokens 48] [--epochs 4] [--iterations 4] [--repeats 2]

Prints the rollout / score / train time split of an iteration and rollout tokens/s against the floor (aim: >= 1.0x).
Each side runs in its own process (2 threads); the best of ``repeats`` runs of each is kept.
"""

from __future__ import annotations

import argparse
import os
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


def bare_generate(prompts: int, new_tokens: int, iterations: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**BENCH_LLAMA)).eval()
    ids, mask = make_prompts(prompts)
    rates = []
    for _ in range(iterations):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, top_k=0,
                                 temperature=1.0, pad_token_id=0, eos_token_id=2)
        elapsed = time.perf_counter() - start
        response = out[:, PROMPT_LEN:]
        ended = (response == 2).cumsum(1)
        tokens = int(((ended == 0) | ((ended == 1) & (response == 2))).sum())
        rates.append(tokens / elapsed)
    return {"tokens_per_s": max(rates[1:])}


def ppo_iteration(prompts: int, new_tokens: int, epochs: int, iterations: int) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from datamodules.tokenizer import load_tokenizer
    from modules.models import ModelSpec
    from modules.ppo import PPOModule
    from modules.rewards import CharacterFractionReward

    class Record(Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, *args):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    torch.manual_seed(0)
    tok = load_tokenizer("builtin:byte")  # pad 0, bos 1, eos 2: the ids BENCH_LLAMA uses
    module = PPOModule(model=ModelSpec(config=dict(BENCH_LLAMA)), critic=ModelSpec(config=dict(BENCH_LLAMA)),
                       reward=CharacterFractionReward(), tokenizer=tok, max_new_tokens=new_tokens, top_k=0,
                       ppo_epochs=epochs, mini_batch_size=prompts)
    ids, mask = make_prompts(prompts)
    batch = {"input_ids": ids, "attention_mask": mask, "prompts": ["p"] * prompts, "metadata": [{}] * prompts}
    record = Record()
    trainer = L.Trainer(max_steps=iterations, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
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
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs = [(run_isolated(bare_generate, args.prompts, args.new_tokens, args.iterations),
             run_isolated(ppo_iteration, args.prompts, args.new_tokens, args.epochs, args.iterations))
            for _ in range(args.repeats)]
    floor = max(r[0]["tokens_per_s"] for r in runs)
    ours = min((r[1] for r in runs), key=lambda r: r["time/rollout_s"] + r["time/train_s"])
    total = ours["time/rollout_s"] + ours["time/train_s"]
    print(f"PPO iteration, tiny Llama (hidden 256, 4 layers, vocab 4096), {args.prompts} prompts x "
          f"{PROMPT_LEN} tokens, {args.new_tokens} new tokens, {args.epochs} PPO epochs, 2 threads")
    print(f"iteration {total:.3f} s = rollout {ours['time/rollout_s']:.3f} s (generate {ours['time/generate_s']:.3f} "
          f"s, score {ours['time/score_s']:.4f} s, log-probs/values rest) + train {ours['time/train_s']:.3f} s")
    rate = ours["rollout/tokens_per_s"]
    print(f"rollout tokens/s             {rate:10.1f}        floor (HF generate) {floor:10.1f}        "
          f"ratio {rate / floor:6.3f}x")
    print(f"peak memory growth           {runs[0][1]['peak_rss_mb']:10.1f} MB")


if __name__ == "__main__":
    main()
