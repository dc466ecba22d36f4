"""7B-scale numbers for docs/scaling.md: per-GPU memory estimates (any machine) and GPU measurements (CUDA only).

    python benchmarks/gpu_scale.py estimate            # the memory table of docs/scaling.md (arithmetic, no GPU)
    python benchmarks/gpu_scale.py measure --out runs/gpu_scale.json   # one 80 GB GPU, about 15 minutes

``measure`` builds a random-init model of Llama-2-7B's shape (no download) and reports, for LoRA-DPO, LoRA-PPO and
QLoRA-DPO, tokens/s and peak GPU memory (``torch.cuda.max_memory_allocated``), plus the agreement of the DPO loss and
its gradient norm in bf16-mixed against fp32 on the same batch. The tiny-model ratios against bare PyTorch are in
benchmarks/dpo_step.py and benchmarks/ppo_iteration.py; this script is about what fits and how fast at 7B.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

GB = 1e9
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def param_counts(cfg: dict = LLAMA2_7B) -> tuple[float, float, float]:
    """(policy, scalar model, LoRA r=16 all-linear) parameter counts of the architecture."""
    h, f, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    layer = 4 * h * h + 3 * h * f + 2 * h  # attention, MLP, two norms
    body = n * layer + v * h + h  # + embeddings + final norm
    lora = n * 16 * (4 * (h + h) + 2 * (h + f) + (f + h))
    return body + v * h, body + h, lora


def estimate(gpus: int = 8, micro: int = 4, seq: int = 512, gen_len: int = 768) -> list[dict]:
    """Per-GPU GB of the shipped set-ups (docs/scaling.md explains each term); sampling batches as in the YAMLs
    (ppo_llama2: 16 prompts at a time, ppo_llama2_lora: 64; 16 for the QLoRA row)."""
    P, Pv, L = param_counts()
    h, n, v = LLAMA2_7B["hidden_size"], LLAMA2_7B["num_hidden_layers"], LLAMA2_7B["vocab_size"]
    act = lambda rows, t: (n * rows * t * h * 2 + 34 * rows * t * h * 2 + 3 * rows * t * v * 4) / GB  # noqa: E731
    kv_of = lambda gen_batch: 2 * n * gen_batch * gen_len * h * 2 / GB  # noqa: E731  bf16 keys and values, all layers
    kv = kv_of(16)
    N, rows = gpus, micro
    out = [
        ("SFT / reward, full FT", "DDP", 16 * P / GB + act(rows, seq)),
        ("SFT / reward, full FT", f"FSDP / FSDP2 / ZeRO-3, {N} GPUs", 16 * P / N / GB + act(rows, seq)),
        ("SFT / reward, full FT", f"ZeRO-2, {N} GPUs", (2 * P + 14 * P / N) / GB + act(rows, seq)),
        ("SFT / reward, full FT", f"ZeRO-3 + offload optimizer, {N} GPUs", 4 * P / N / GB + act(rows, seq)),
        ("DPO, full FT, precomputed ref.", f"FSDP2 / ZeRO-3, {N} GPUs", 16 * P / N / GB + act(2 * rows, seq)),
        ("DPO, full FT, frozen ref. copy", f"FSDP2, {N} GPUs", (16 + 4) * P / N / GB + act(2 * rows, seq)),
        ("DPO, full FT, precomputed ref.", "FSDP2, 2 GPUs", 16 * P / 2 / GB + act(2 * rows, seq)),
        ("DPO, LoRA r16 (ref. = adapter off)", "1 GPU, bf16 base", (2 * P + 16 * L) / GB + act(2 * rows, seq)),
        ("DPO, QLoRA r16", "1 GPU, NF4 base", (0.56 * P + 16 * L) / GB + act(2 * rows, seq)),
    ]
    update = 16 * (P + Pv) / N + 4 * P / N + 2 * Pv / N  # trained policy + critic, fp32 ref. and bf16 reward shards
    rollout = 12 * (P + Pv) / N + 4 * P / N + 2 * Pv / N + 2 * P  # no grads; the policy gathered whole in bf16
    out += [("PPO, full FT (4 models): update", f"FSDP2, {N} GPUs", update / GB + 2 * act(rows, gen_len)),
            ("PPO, full FT (4 models): rollout", f"FSDP2, {N} GPUs", rollout / GB + kv),
            ("PPO, full FT (4 models): rollout, 32 at a time", f"FSDP2, {N} GPUs", rollout / GB + kv_of(32))]
    lora_ppo = 2 * P + 2 * Pv + 2 * Pv + 2 * 16 * L  # bf16 policy base, LoRA critic base, reward; two adapters
    qlora_ppo = 0.56 * P + 2 * Pv + 2 * Pv + 2 * 16 * L
    out += [("PPO, LoRA r16 (4 models)", "1 GPU, bf16 bases", lora_ppo / GB + max(kv_of(64), 2 * act(8, gen_len))),
            ("PPO, QLoRA policy (4 models)", "1 GPU", qlora_ppo / GB + max(kv, 2 * act(8, gen_len)))]
    return [{"setup": s, "strategy": st, "gb_per_gpu": round(gb, 1)} for s, st, gb in out]


def _cuda_or_exit():
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_scale.py measure needs a CUDA GPU (80 GB for the 7B runs); this machine has none. "
                 "`python benchmarks/gpu_scale.py estimate` prints the memory table anywhere.")
    return torch


def _model(torch, lora: bool, qlora_dir: str | None = None, dtype: str = "bfloat16", layers: int | None = None):
    from recipes.modules.models import LoRASpec, ModelSpec, build_causal_lm

    cfg = dict(LLAMA2_7B, **({"num_hidden_layers": layers} if layers else {}))
    spec = ModelSpec(name_or_path=qlora_dir, config=None if qlora_dir else cfg, dtype=dtype,
                     gradient_checkpointing=True, lora=LoRASpec(r=16, alpha=32, dropout=0.0) if lora else None,
                     load_in_4bit=qlora_dir is not None, extra_kwargs={"device_map": {"": 0}} if qlora_dir else {})
    if qlora_dir:  # bitsandbytes quantizes while loading onto the GPU
        return build_causal_lm(spec)
    with torch.device("cuda"):  # random init directly on the GPU
        return build_causal_lm(spec).cuda()


def _dpo_step(torch, model, batch, reference: bool = True) -> tuple:
    """One DPO loss (chosen and rejected in one forward; reference = adapter-disabled policy) and its backward."""
    from recipes.modules.adapters import reference_context
    from recipes.modules.losses import DPOLoss
    from recipes.modules.policy import completion_logprobs, sequence_logprobs

    ids, mask, comp = batch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logps = sequence_logprobs(*completion_logprobs(model, ids, mask, comp))
        with torch.no_grad(), reference_context(model):
            ref = sequence_logprobs(*completion_logprobs(model, ids, mask, comp))
    b = ids.shape[0] // 2
    loss = DPOLoss(beta=0.1)(logps[:b], logps[b:], ref[:b], ref[b:])[0].mean()
    loss.backward()
    return loss


def _batch(torch, pairs: int, seq: int, prompt: int):
    ids = torch.randint(3, 32000, (2 * pairs, seq), device="cuda")
    mask = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, prompt:] = 1
    return ids, mask, comp


def measure_dpo(torch, label: str, qlora_dir: str | None, pairs: int = 4, seq: int = 512, steps: int = 5) -> dict:
    model = _model(torch, lora=True, qlora_dir=qlora_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = _batch(torch, pairs, seq, seq // 2)
    _dpo_step(torch, model, batch), opt.step(), opt.zero_grad()  # warm-up
    torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        _dpo_step(torch, model, batch)
        opt.step(), opt.zero_grad()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"run": label, "tokens_per_s": round(2 * pairs * seq * steps / elapsed),
            "peak_gb": round(torch.cuda.max_memory_allocated() / GB, 1)}


def measure_ppo(torch, rollout: int = 64, prompt: int = 512, new: int = 256, gen_batch: int = 16) -> dict:
    """LoRA-PPO: sample ``rollout`` responses, then one PPO epoch of policy updates (micro-batch 8)."""
    from recipes.modules.generation import sample
    from recipes.modules.losses import PPOPolicyLoss
    from recipes.modules.response_logprobs import response_logprobs

    model = _model(torch, lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    prompts = torch.randint(3, 32000, (rollout, prompt), device="cuda")
    torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    start, gens = time.perf_counter(), []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(0, rollout, gen_batch):
            chunk = prompts[i:i + gen_batch]
            gens.append(sample(model, chunk, torch.ones_like(chunk), new, eos_token_id=-1, pad_token_id=0,
                               temperature=1.0).response_ids)
    torch.cuda.synchronize()
    gen_s, update_start = time.perf_counter() - start, time.perf_counter()
    ids = torch.cat([prompts, torch.cat(gens)], dim=1)
    loss_fn = PPOPolicyLoss(0.2)
    for i in range(0, rollout, 8):
        mb = ids[i:i + 8]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs, _ = response_logprobs(model, mb, torch.ones_like(mb), prompt)
        mask = torch.ones_like(logprobs)
        loss = loss_fn(logprobs, logprobs.detach(), torch.randn_like(logprobs), mask)[0]
        loss.backward()
    opt.step(), opt.zero_grad()
    torch.cuda.synchronize()
    update_s = time.perf_counter() - update_start
    return {"run": "LoRA-PPO", "generated_tokens_per_s": round(rollout * new / gen_s),
            "update_tokens_per_s": round(rollout * (prompt + new) / update_s),
            "peak_gb": round(torch.cuda.max_memory_allocated() / GB, 1)}


def measure_precision(torch, layers: int = 8) -> dict:
    """DPO loss and gradient norm of one batch in fp32 and in bf16 autocast, same weights (first ``layers``)."""
    model = _model(torch, lora=False, dtype="float32", layers=layers)
    batch = _batch(torch, 2, 256, 128)
    out = {}
    for name, enabled in (("fp32", False), ("bf16-mixed", True)):
        model.zero_grad()
        from recipes.modules.losses import DPOLoss
        from recipes.modules.policy import completion_logprobs, sequence_logprobs

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            logps = sequence_logprobs(*completion_logprobs(model, *batch))
        ref = logps.detach() + 0.5  # a fixed reference offset so the loss is not at its symmetric point
        loss = DPOLoss(beta=0.1)(logps[:2], logps[2:], ref[:2], ref[2:].flip(0))[0].mean()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
        out[name] = (loss.item(), norm.item())
    (l32, g32), (l16, g16) = out["fp32"], out["bf16-mixed"]
    return {"run": f"bf16-mixed vs fp32 ({layers} layers)", "loss_fp32": l32, "loss_bf16": l16,
            "loss_rel_diff": abs(l16 - l32) / abs(l32), "grad_norm_rel_diff": abs(g16 - g32) / g32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["estimate", "measure"])
    parser.add_argument("--gpus", type=int, default=8, help="estimate: GPUs the sharded set-ups use")
    parser.add_argument("--out", help="measure: also write the results as JSON here")
    args = parser.parse_args()
    if args.command == "estimate":
        print("| set-up | strategy | GB per GPU |\n|---|---|---|")
        for row in estimate(args.gpus):
            print(f"| {row['setup']} | {row['strategy']} | {row['gb_per_gpu']} |")
        return
    torch = _cuda_or_exit()
    sys.path.insert(0, ".")
    from tqdm.auto import tqdm

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("LoRA-DPO", lambda: measure_dpo(torch, "LoRA-DPO", None)), ("LoRA-PPO", lambda: measure_ppo(torch)),
                ("QLoRA-DPO", lambda: measure_dpo(torch, "QLoRA-DPO", _save_random(torch, tmp))),
                ("precision", lambda: measure_precision(torch))]
        for name, job in tqdm(jobs, desc="gpu_scale"):
            results.append(job())
            torch.cuda.empty_cache()
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


def _save_random(torch, folder: str) -> str:
    """A random 7B-shape model saved in bf16 (QLoRA quantizes saved weights at load)."""
    model = _model(torch, lora=False)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


if __name__ == "__main__":
    main()
