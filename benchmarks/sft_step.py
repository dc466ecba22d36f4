"""SFTModule's training step under a Lightning Trainer against a bare-PyTorch loop on the same model and batches.

    python benchmarks/sft_step.py [--steps 30] [--batch 8] [--seq 192] [--repeats 2]

Workload: the benchmark Llama (hidden 256, 4 layers, vocab 4096), random batches of 8 x 192 tokens whose last 1/2-3/4
are the response, token-mean NLL, AdamW 1e-5. The floor (issue #19) applies the LM head only at the positions that
predict a response token: hidden states from the base model gathered there, then ``lm_head``, then
``logit_y - logsumexp``. Prints seconds per step and peak-memory growth for both, and their ratios (aim: <= 1.05x).
Each side runs in its own process (2 threads) so peak memory is its own; the sides alternate (floor first on even
repeats, ours first on odd ones) and each keeps its best run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import BENCH_LLAMA, gathered_logprobs, loadavg, ratio_line, run_isolated  # noqa: E402


def make_batches(n: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, BENCH_LLAMA["vocab_size"], (batch, seq), generator=g)
        prompt = torch.randint(seq // 4, seq // 2, (batch,), generator=g)
        completion = (torch.arange(seq)[None] >= prompt[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion})
    return out


def bare(steps: int, batch: int, seq: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**BENCH_LLAMA))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = make_batches(steps, batch, seq)
    times = []
    for b in batches:
        start = time.perf_counter()
        logprobs, _ = gathered_logprobs(model, b["input_ids"], b["attention_mask"], b["completion_mask"].bool())
        loss = -logprobs.mean()  # the token mean over every response token of the batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"s_per_step": sum(times[3:]) / len(times[3:])}


def lightning_run(steps: int, batch: int, seq: int) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from recipes.modules.models import ModelSpec
    from recipes.modules.sft import SFTModule

    class Timer(Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, *args):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    cfg = dict(BENCH_LLAMA)
    module = SFTModule(model=ModelSpec(config=cfg), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5))
    timer = Timer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, torch.utils.data.DataLoader(make_batches(steps, batch, seq), batch_size=None))
    return {"s_per_step": sum(timer.times[3:]) / len(timer.times[3:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # Alternate the two sides and keep each one's best run, so background load hits both alike.
    runs: dict[str, list[dict]] = {"floor": [], "ours": []}
    sides = (("floor", bare), ("ours", lightning_run))
    print(f"load average before: {loadavg()}")
    for r in range(args.repeats):
        for name, fn in (sides if r % 2 == 0 else sides[::-1]):
            runs[name].append(run_isolated(fn, args.steps, args.batch, args.seq))
    memory = {name: run_isolated(fn, args.steps, args.batch, args.seq, live_memory=True)["peak_rss_mb"]
              for name, fn in sides}  # untimed: the live tensors' peak (benchmarks.common.LIVE_MEMORY_ENV)
    print(f"load average after: {loadavg()}")
    floor, ours = ({k: min(run[k] for run in runs[side]) for k in runs[side][0]} for side in ("floor", "ours"))
    print(f"SFT step, tiny Llama (hidden 256, 4 layers, vocab 4096), batch {args.batch} x {args.seq} tokens, "
          f"2 threads, best of {args.repeats}")
    print(ratio_line("time per step", ours["s_per_step"], floor["s_per_step"], "s"))
    print(ratio_line("peak memory, malloc-cached", ours["peak_rss_mb"], floor["peak_rss_mb"], "MB"))
    print(ratio_line("peak memory growth, live", memory["ours"], memory["floor"], "MB"))


if __name__ == "__main__":
    main()
