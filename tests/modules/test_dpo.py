"""DPOModule: the three reference modes agree, precomputed mode holds one model and caches, the named reference
adapter, metric names, and the tiny config learning the built-in preference rule."""

import copy
import csv
import math
from pathlib import Path

import pytest
import torch

from recipes.__main__ import cli_main
from recipes.datamodules.preference import PreferenceDataModule
from recipes.modules import reference_pass
from recipes.modules.dpo import METRICS, DPOModule
from recipes.modules.losses import DPOLoss
from recipes.modules.models import LoRASpec, ModelSpec
from recipes.modules.policy import masked_completion_logps
from recipes.modules.reference import FrozenCopy
from tests.conftest import TINY_LLAMA, quiet_trainer

MODES = ("frozen_copy", "disabled_adapter", "precomputed")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on shared, busy cores two threads run 3-4x slower."""
    torch.set_num_threads(1)


@pytest.fixture
def data():
    dm = PreferenceDataModule(max_length=48, batch_size=4, max_rows=24, val_fraction=0.25)
    dm.setup("fit")
    return dm


def _modules(data, modes, lora):
    """One module per mode, same starting weights; precomputed takes its table; then every policy moves away
    from the reference identically (LoRA B, or all weights, nudged), so the reference terms are not trivial."""
    spec = ModelSpec(config=dict(TINY_LLAMA), lora=LoRASpec(r=4, alpha=8, dropout=0.0) if lora else None)
    out, start = {}, None
    for mode in modes:
        torch.manual_seed(0)
        module = DPOModule(model=spec, tokenizer=data.tokenizer, reference_mode=mode, cache_reference=False)
        module.configure_model()
        start = start or copy.deepcopy(module.policy.state_dict())
        module.policy.load_state_dict(start)
        if isinstance(module.reference, FrozenCopy):
            module.reference.load_state_dict(start)
        if mode == "precomputed":
            module.precompute_reference(data)
        with torch.no_grad():
            for name, param in module.policy.named_parameters():
                if param.requires_grad and (not lora or "lora_B" in name):
                    param.add_(0.05 * torch.cos(torch.arange(param.numel(), dtype=param.dtype)).view_as(param))
        out[mode] = module
    return out


def _loss_and_grads(module, batch, split="train"):
    loss, metrics = module._step(batch, split)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}


def test_three_reference_modes_same_loss_and_gradients_lora(data):
    modules = _modules(data, MODES, lora=True)
    batch = data.collate(data.train_set[:4])
    results = {mode: _loss_and_grads(m, batch) for mode, m in modules.items()}
    loss, metrics, grads = results["frozen_copy"]
    assert metrics["rewards/margins"].abs().max() > 1e-3  # the policy really differs from the reference
    for mode in MODES[1:]:
        other_loss, other_metrics, other_grads = results[mode]
        torch.testing.assert_close(other_loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other_metrics["rewards/chosen"], metrics["rewards/chosen"], atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-5, rtol=1e-5, msg=f"{mode} {name}")
    n_policy = sum(p.numel() for p in modules["precomputed"].policy.parameters())
    assert not any(isinstance(modules[m].reference, torch.nn.Module) for m in ("precomputed", "disabled_adapter"))
    assert sum(p.numel() for p in modules["precomputed"].parameters()) == n_policy
    assert sum(p.numel() for p in modules["frozen_copy"].parameters()) == 2 * n_policy


def test_full_finetune_frozen_copy_equals_precomputed_with_one_model(data):
    modules = _modules(data, ("frozen_copy", "precomputed"), lora=False)
    batch = data.collate(data.val_set[:4])
    (loss_a, _, grads_a), (loss_b, _, grads_b) = (_loss_and_grads(modules[m], batch, "val") for m in modules)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    precomputed = modules["precomputed"]
    assert not isinstance(precomputed.reference, torch.nn.Module)  # no reference model held
    assert sum(p.numel() for p in precomputed.parameters()) == sum(p.numel() for p in precomputed.policy.parameters())
    assert set(precomputed.reference.tables) == {"train", "val"}
    assert precomputed.reference.tables["train"].shape == (len(data.train_set), 2)


def test_precomputed_cache_is_reused_and_keyed_by_data(data, tmp_path, monkeypatch):
    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       reference_mode="precomputed", reference_cache_dir=str(tmp_path))
    module.configure_model()
    module.precompute_reference(data)
    files = sorted(tmp_path.glob("ref_logps-*.pt"))
    assert len(files) == 2  # train and validation
    first = {k: v.clone() for k, v in module.reference.tables.items()}
    monkeypatch.setattr(reference_pass, "pass_logps", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    module.precompute_reference(data)
    for split, table in first.items():
        torch.testing.assert_close(module.reference.tables[split], table)
    data.train_set = data.train_set[:-1]  # other data -> another key -> a recompute
    with pytest.raises(pytest.fail.Exception):
        module.precompute_reference(data)


def test_reference_pass_closed_form_with_a_zero_head_and_logits_only_at_completion_tokens(data):
    """With the LM head zeroed every logit is 0, so every token's log-prob is -log V (V = vocab size): a row sums to
    -n log V over its n response tokens (the mean is -log V). The head sees exactly the sum of the response lengths
    (no prompt or padding position), here 2 pairs, chosen and rejected."""
    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer, cache_reference=False)
    module.configure_model()
    head = module.policy.get_output_embeddings()
    torch.nn.init.zeros_(head.weight)
    seen = []
    head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    pairs = data.train_set[:2]
    lengths = torch.tensor([len(p[k]) for k in ("chosen_ids", "rejected_ids") for p in pairs], dtype=torch.float)
    log_v = math.log(module.policy.config.vocab_size)
    with torch.no_grad():
        total = masked_completion_logps(module.policy, data.collate(pairs))
        mean = masked_completion_logps(module.policy, data.collate(pairs), average=True)
    torch.testing.assert_close(total, -lengths * log_v, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(mean, torch.full((4,), -log_v), atol=1e-5, rtol=1e-5)
    assert seen == [int(lengths.sum())] * 2


def test_reference_pass_sorted_larger_batches_equal_one_pair_at_a_time(data):
    """The pass sorts pairs by length and runs batches of ``reference_batch_size`` (5 here: uneven last batch); each
    row of the table still equals that pair's log-probs computed alone by the training forward (`_logps`)."""
    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       reference_mode="precomputed", cache_reference=False, reference_batch_size=5)
    module.configure_model()
    module.precompute_reference(data)
    with torch.no_grad():
        alone = torch.stack([module._logps(module.policy, data.collate([p])) for p in data.train_set])  # (N, 2)
    torch.testing.assert_close(module.reference.tables["train"], alone, atol=1e-4, rtol=1e-5)


def test_precomputed_fit_checkpoints_the_table_and_resume_reuses_it(data, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       reference_mode="precomputed", cache_reference=False,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)])
    trainer.fit(module, data)
    ckpt = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=True)
    torch.testing.assert_close(ckpt["reference_logps"]["train"], module.reference.tables["train"])
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    fresh = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                      reference_mode="precomputed", cache_reference=False)
    fresh.on_load_checkpoint({})
    fresh._trainer = trainer  # global_step 2: the policy is no longer the reference
    with pytest.raises(RuntimeError, match="cannot be recomputed"):
        fresh.reference.logprobs(lambda model: pytest.fail("a table runs no model"), torch.tensor([0]), "train")


def test_named_reference_adapter_is_used(data):
    """With a named reference adapter (``reference.use_adapter``), the reference forward runs that adapter (here a
    copy of the policy's own, so the implicit rewards are exactly 0); before, the adapter is disabled."""
    module = _modules(data, ("disabled_adapter",), lora=True)["disabled_adapter"]
    module.policy.add_adapter("ema", module.policy.peft_config["default"])
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if ".ema." in name:
                param.copy_(dict(module.policy.named_parameters())[name.replace(".ema.", ".default.")])
    batch = data.collate(data.train_set[:4])
    _, metrics = module._step(batch, "train")
    assert metrics["rewards/chosen"].abs().max() > 1e-4
    module.reference.use_adapter("ema")
    _, metrics = module._step(batch, "train")
    torch.testing.assert_close(metrics["rewards/chosen"], torch.zeros(4), atol=1e-6, rtol=0)
    assert module.policy.active_adapter == "default"


def test_reference_free_loss_holds_no_reference(data):
    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       loss=DPOLoss(reference_free=True))
    module.configure_model()
    assert module.mode == "none" and module.reference is None
    loss, _ = module._step(data.collate(data.train_set[:2]), "train")
    assert torch.isfinite(loss)


def test_disabled_adapter_without_lora_is_refused(data):
    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), reference_mode="disabled_adapter")
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        module.configure_model()


def test_tiny_config_raises_heldout_accuracy(tmp_path):
    """yaml/tiny/dpo.yaml shortened to 30 steps on 400 rows (seeded): held-out val/rewards/accuracies (0 at the
    start: policy == reference, every implicit reward 0) reaches >= 0.85 on the 20 held-out pairs (0.95 measured);
    every dashboard metric is logged."""
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", "yaml/tiny/dpo.yaml", "--trainer.max_steps", "30",
                    "--trainer.val_check_interval", "15", "--trainer.enable_progress_bar", "false",
                    "--trainer.callbacks", "[]",
                    "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                    "--data.init_args.max_rows", "400"])
    rows = list(csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()))
    accuracies = [float(r["val/rewards/accuracies"]) for r in rows if r.get("val/rewards/accuracies")]
    assert len(accuracies) == 2 and accuracies[-1] >= 0.85, accuracies
    logged = set(rows[0])
    assert {"train/loss", *METRICS, "val/loss", *(f"val/{m}" for m in METRICS)} <= logged
    assert cli.model.reference is not None  # the yaml's frozen copy
