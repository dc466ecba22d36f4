"""SFTModule: the loss against a hand-computed value, training, exact resume, export."""

import math

import pytest
import torch
from torch import nn

from recipes.datamodules.sft import SFTDataModule
from recipes.modules.models import ModelSpec
from recipes.modules.sft import SFTModule
from tests.conftest import TINY_LLAMA, quiet_trainer


class FixedLogits(nn.Module):
    """A stand-in LM whose logits are given, to check the loss arithmetic alone."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        logits = self.logits + self.w
        if isinstance(logits_to_keep, torch.Tensor):  # transformers' boolean form: the (N, V) kept positions
            return type("Out", (), {"logits": logits[logits_to_keep]})
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


def test_sft_loss_hand_computed_with_prompt_masked():
    """Sequence [1, 1, 0, 1]: prompt [1, 1], response [0, 1]; vocabulary {0, 1}.

    Logits at position 0 predict the prompt token 1 with p = e^-20 (terrible) but are masked out.
    Position 1 has logits [ln 3, 0]: p(0) = 3/4. Position 2 has logits [0, ln 3]: p(1) = 3/4.
    Loss = -(ln 3/4 + ln 3/4) / 2 = ln(4/3) = 0.287682.
    """
    ln3 = math.log(3.0)
    logits = torch.tensor([[[10.0, -10.0], [ln3, 0.0], [0.0, ln3], [5.0, 5.0]]])
    module = SFTModule(model=ModelSpec(config={"model_type": "llama"}))
    module.policy = FixedLogits(logits)
    batch = {"input_ids": torch.tensor([[1, 1, 0, 1]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "completion_mask": torch.tensor([[0, 0, 1, 1]])}
    loss, tokens = module._nll(batch)
    assert tokens == 2
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-6)


def _module_and_data(max_rows=64, **module_kwargs):
    data = SFTDataModule(tokenizer="builtin:byte", data="builtin:sft", prompt_format="plain", max_length=64,
                         batch_size=4, max_rows=max_rows, val_fraction=0.125)
    module = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **module_kwargs)
    return module, data


def test_sft_fits_and_changes_parameters():
    module, data = _module_and_data()
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    quiet_trainer(max_steps=2).fit(module, data)
    assert all(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())


def test_sft_validation_loss_falls():
    module, data = _module_and_data(max_rows=200)
    trainer = quiet_trainer(max_steps=40, limit_val_batches=4)
    first = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    trainer.fit(module, data)
    last = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    assert last < first - 1.0, (first, last)


def test_micro_batches_accumulated_equal_one_large_batch():
    """With sequence-mean reduction, 2 micro-batches x accumulate 2 give the gradient of one batch of 4 (SGD)."""
    torch.manual_seed(0)
    mod_a, data = _module_and_data(loss_reduction="sequence")
    data.setup("fit")
    mod_a.configure_model()
    mod_b, _ = _module_and_data(loss_reduction="sequence")
    mod_b.policy = __import__("copy").deepcopy(mod_a.policy)
    batch = data.collate(data.train_set[:4])
    halves = [data.collate(data.train_set[:2]), data.collate(data.train_set[2:4])]
    mod_a._nll(batch)[0].backward()
    for half in halves:
        (mod_b._nll(half)[0] / 2).backward()
    for (n, pa), (_, pb) in zip(mod_a.policy.named_parameters(), mod_b.policy.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_resume_mid_epoch_matches_uninterrupted(tmp_path):
    """Stop after 5 steps (mid-epoch: 14 batches an epoch), resume from that checkpoint to step 9: the same
    parameters as 9 uninterrupted steps."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None, save_every=None):
        L.seed_everything(7, verbose=False)
        module, data = _module_and_data()
        callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1)] \
            if save_every else []
        trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(save_every),
                                limit_val_batches=0)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in module.policy.named_parameters()}

    full = run(9)
    run(5, save_every=5)
    ckpt = next(tmp_path.glob("*step=5*.ckpt"))
    resumed = run(9, ckpt_path=str(ckpt))
    for n, p in full.items():
        torch.testing.assert_close(resumed[n], p, msg=n)


def test_lora_sft_changes_adapter_only():
    from recipes.modules.models import LoRASpec

    module, data = _module_and_data()
    module.spec.lora = LoRASpec(r=4, alpha=8, dropout=0.0)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    quiet_trainer(max_steps=2).fit(module, data)
    for n, p in module.policy.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("grouped", [False, True])
def test_each_epochs_padding_fraction_is_logged_as_a_metric(grouped):
    data = SFTDataModule(tokenizer="builtin:byte", data="builtin:sft", prompt_format="plain", max_length=64,
                         batch_size=4, max_rows=24, val_fraction=0.0, group_by_length=grouped)
    module = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, data)
    logged = float(trainer.callback_metrics["data/padding_fraction"])
    assert 0.0 < logged < 1.0 and logged == pytest.approx(data.padding_fraction)
