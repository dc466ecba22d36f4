"""On a CUDA device: a tiny SFT fit in bf16 mixed precision trains, and its loss matches the CPU float32 loss.

Marked ``gpu``; skips cleanly without CUDA (run with ``pytest -m gpu``)."""

import lightning as L
import pytest
import torch

from recipes.datamodules.sft import SFTDataModule
from recipes.modules.models import ModelSpec
from recipes.modules.sft import SFTModule
from tests.conftest import TINY_LLAMA

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _module(tokenizer):
    return SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=tokenizer,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))


def test_tiny_sft_steps_on_cuda_in_bf16(byte_tokenizer):
    """Four optimizer steps with ``precision="bf16-mixed"``: every parameter stays float32 on the GPU, the policy's
    parameters change, and the logged loss is finite."""
    module = _module(byte_tokenizer)
    data = SFTDataModule(max_length=128, batch_size=4, max_rows=64, val_fraction=0.0)
    trainer = L.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit(module, data)
    assert trainer.global_step == 4
    params = dict(module.named_parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in params.values())
    assert all(not torch.equal(params[n].cpu(), before[n]) for n in before if params[n].requires_grad)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_bf16_loss_on_cuda_matches_float32_on_cpu(byte_tokenizer):
    """One batch: the response-token NLL under bf16 autocast on the GPU is within bf16 rounding (2 %) of the
    float32 CPU value for the same weights."""
    module = _module(byte_tokenizer)
    module.configure_model()
    data = SFTDataModule(max_length=128, batch_size=4, max_rows=16, val_fraction=0.0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def nll(device, dtype):
        module.to(device).eval()
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logprobs, mask = module(moved)
        return float(-(logprobs.float() * mask).sum() / mask.sum())

    cpu = nll(torch.device("cpu"), torch.float32)
    cuda = nll(torch.device("cuda"), torch.bfloat16)
    assert cuda == pytest.approx(cpu, rel=0.02)
