"""EMAReference: hand-computed averages asserted inside the callback's hooks, eta edge cases, one base model with
LoRA, and a checkpoint round trip."""

import copy

import lightning as L
import pytest
import torch
from torch import nn

from recipes.callbacks.ema_reference import EMAReference
from recipes.modules.models import LoRASpec, ModelSpec, build_causal_lm
from recipes.modules.reference import AdapterReference, FrozenCopy
from tests.conftest import TINY_LLAMA, quiet_trainer


class FullFTModule(L.LightningModule):
    """A policy with a frozen reference copy, trained by SGD on a fixed target (BoringModel style)."""

    def __init__(self):
        super().__init__()
        self.policy = nn.Linear(4, 3)
        self.reference = FrozenCopy.freeze(copy.deepcopy(self.policy))

    def training_step(self, batch, batch_idx):
        return ((self.policy(batch) - 1.0) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=2)


class LoRAModule(L.LightningModule):
    """A tiny LoRA Llama whose reference is the policy itself (an AdapterReference: adapters disabled or named)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.policy, self.reference = tokenizer, None, None

    def configure_model(self):
        if self.policy is None:
            spec = ModelSpec(config=dict(TINY_LLAMA), lora=LoRASpec(r=4, dropout=0.0))
            self.policy = build_causal_lm(spec, self.tokenizer)
            self.reference = AdapterReference(self.policy)

    def training_step(self, batch, batch_idx):
        return self.policy(input_ids=batch).logits.float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.policy.parameters() if p.requires_grad], lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(4, 200, (8, 6)), batch_size=2)


class AssertingEMA(EMAReference):
    """Tracks the expected reference by hand: ref_k = (1 - eta) ref_{k-1} + eta policy_k, and asserts it after each
    update, inside the hook."""

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self._pairs = pl_module.reference.parameter_pairs(pl_module.policy)  # (reference, policy) tensors
        self.expected = [r.detach().clone() for r, _ in self._pairs]
        self.initial = [e.clone() for e in self.expected]
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.should_update(trainer.global_step):
            self.expected = [(1 - self.eta) * e + self.eta * p.detach() for e, (_, p) in zip(self.expected, self._pairs)]
        for e, (r, p) in zip(self.expected, self._pairs):
            torch.testing.assert_close(r, e, rtol=1e-6, atol=1e-7)
            if self.eta == 1.0 and self.should_update(trainer.global_step):  # tracks the policy
                torch.testing.assert_close(r, p.detach())
        if self.eta == 0.0:
            for i, (r, _) in enumerate(self._pairs):
                torch.testing.assert_close(r, self.initial[i], rtol=0, atol=0)
        self.checked += 1


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_full_ft_reference_is_the_hand_computed_average(eta):
    cb = AssertingEMA(eta=eta, update_every_n_steps=2, start_step=2)
    module = FullFTModule()
    quiet_trainer(max_steps=7, callbacks=[cb]).fit(module)
    assert cb.checked == 7 and cb.last_updated_step == 6  # steps 2, 4, 6
    assert not any(p.requires_grad for p in module.reference.parameters())
    if eta > 0:
        assert not torch.equal(module.reference.weight, cb.initial[0])


def test_lora_reference_is_an_adapter_on_the_one_base_model(byte_tokenizer):
    module = LoRAModule(byte_tokenizer)
    module.configure_model()
    total_before = sum(p.numel() for p in module.policy.parameters())
    adapter = sum(p.numel() for n, p in module.policy.named_parameters() if ".default." in n)
    cb = AssertingEMA(eta=0.5)
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(module)
    assert cb.checked == 3 and module.reference.adapter == "ema_reference"
    total_after = sum(p.numel() for p in module.policy.parameters())
    assert total_after == total_before + adapter  # one base model, one more adapter
    assert not any(p.requires_grad for n, p in module.policy.named_parameters() if ".ema_reference." in n)
    assert module.policy.active_adapter == "default"


class CheckRestored(EMAReference):
    """Asserts at the start of a resumed fit that the step and the EMA adapter came back from the checkpoint."""

    expected: dict | None = None
    verified = False

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        if self.expected is None:
            return
        assert self.last_updated_step == 3
        restored = {n: p for n, p in pl_module.policy.named_parameters() if ".ema_reference." in n}
        assert restored.keys() == self.expected.keys()
        for n in self.expected:
            torch.testing.assert_close(restored[n], self.expected[n], rtol=0, atol=0)
        self.verified = True


def test_state_survives_a_checkpoint_round_trip(byte_tokenizer, tmp_path):
    module = LoRAModule(byte_tokenizer)
    trainer = quiet_trainer(max_steps=3, callbacks=[CheckRestored(eta=0.5)], default_root_dir=tmp_path)
    trainer.fit(module)
    ckpt = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(ckpt)
    cb = CheckRestored(eta=0.5)
    cb.expected = {n: p.detach().clone() for n, p in module.policy.named_parameters() if ".ema_reference." in n}
    quiet_trainer(max_steps=4, callbacks=[cb], default_root_dir=tmp_path).fit(LoRAModule(byte_tokenizer),
                                                                             ckpt_path=ckpt)
    assert cb.verified and cb.last_updated_step == 4


def test_rejects_a_module_without_reference():
    class NoRef(FullFTModule):
        def __init__(self):
            super().__init__()
            self.reference = None

    with pytest.raises(TypeError, match="reference"):
        quiet_trainer(max_steps=1, callbacks=[EMAReference()]).fit(NoRef())
