"""recipes.modules.guards on the shared base: a non-finite loss or gradient stops SFT, DPO, reward and ranking runs at
once, naming the step, the quantity and the cause, before the optimizer applies it; a checkpoint of non-finite weights
is refused, so the last good file stays on disk and loads with finite weights."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from recipes.datamodules.preference import PreferenceDataModule
from recipes.datamodules.ranking import RankingDataModule
from recipes.datamodules.sft import SFTDataModule
from recipes.modules.dpo import DPOModule
from recipes.modules.guards import NonFiniteError, all_finite, check_weights, non_finite_rows
from recipes.modules.models import ModelSpec
from recipes.modules.ranking import RankingModule
from recipes.modules.reward import RewardModule
from recipes.modules.sft import SFTModule
from tests.conftest import TINY_LLAMA, quiet_trainer

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def sft(lr=1e-2, optimizer=torch.optim.AdamW, **kwargs):
    data = SFTDataModule(data="builtin:sft", prompt_format="plain", max_length=48, batch_size=4, max_rows=24,
                         val_fraction=0)
    module = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer,
                       optimizer=lambda p: optimizer(p, lr=lr), **kwargs)
    return module, data


def module_and_data(cls):
    if cls is SFTModule:
        return sft()
    if cls is RankingModule:
        data = RankingDataModule(max_length=48, batch_size=4, max_rows=24, val_fraction=0)
    else:
        data = PreferenceDataModule(max_length=48, batch_size=4, max_rows=24, val_fraction=0)
    return cls(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=data.tokenizer, max_length=48), data


def nan_loss_at(module, batch_idx):
    """Make the module's training loss nan at one batch (as a blown-up forward would)."""
    step, bad = module.training_step, batch_idx

    def training_step(batch, batch_idx):  # Lightning passes batch_idx by this name
        return step(batch, batch_idx) * (NAN if batch_idx == bad else 1.0)

    module.training_step = training_step


def checkpointing(*callbacks):
    return quiet_trainer(limit_val_batches=0, max_steps=6, enable_checkpointing=True, callbacks=list(callbacks))


def weights_finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_all_finite_and_non_finite_rows():
    """Rows 1 (a nan) and 3 (an inf) of a (4, 2) tensor are named; a 1-d tensor names its own entries."""
    x = torch.tensor([[0.0, 1.0], [NAN, 2.0], [3.0, 4.0], [5.0, -INF]])
    assert non_finite_rows(x) == [1, 3] and non_finite_rows(torch.tensor([1.0, INF, NAN])) == [1, 2]
    assert not all_finite([torch.ones(2), x]) and all_finite([torch.ones(2), torch.zeros(0)]) and all_finite([])


def test_a_too_high_learning_rate_stops_at_the_gradient_before_the_step():
    """SGD at lr 1e12: the first step makes the weights huge (still finite); the second backward's gradients
    overflow. The run stops before that step is applied, blames the learning rate and leaves the weights finite."""
    module, data = sft(lr=1e12, optimizer=torch.optim.SGD)
    trainer = quiet_trainer(limit_val_batches=0, max_steps=5)
    with pytest.raises(NonFiniteError, match=r"SFTModule, global step 1: the gradient norm is nan .*parameters have "
                                             r"non-finite gradients.*learning rate is too high \(lr 1e\+12\)"):
        trainer.fit(module, data)
    assert trainer.global_step == 1 and weights_finite(module)


@pytest.mark.parametrize("cls", [SFTModule, DPOModule, RewardModule, RankingModule], ids=lambda c: c.__name__)
def test_a_non_finite_loss_stops_the_run_at_once(cls):
    """The loss of batch 2 is nan: the run stops in that step, naming global step 2 (two optimizer steps taken)."""
    module, data = module_and_data(cls)
    nan_loss_at(module, 2)
    trainer = quiet_trainer(limit_val_batches=0, max_steps=5)
    with pytest.raises(NonFiniteError, match=rf"{cls.__name__}, global step 2: the loss is non-finite \(nan"):
        trainer.fit(module, data)
    assert trainer.global_step == 2 and weights_finite(module)


def test_a_non_finite_gradient_of_a_finite_loss_names_the_parameter():
    """An inf gradient on lm_head at global step 1 only: the loss is finite, the step is refused, and the weights
    are those after step 1 (nothing was applied)."""
    module, data = sft()
    after_first = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                after_first.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer = quiet_trainer(limit_val_batches=0, max_steps=5, callbacks=[Snapshot()])
    module.configure_model()
    module.policy.lm_head.weight.register_hook(lambda g: g * INF if trainer.global_step == 1 else g)
    with pytest.raises(NonFiniteError, match=r"global step 1: the gradient norm is (inf|nan) \(1 of \d+ parameters "
                                             r"have non-finite gradients here: lm_head.weight\)"):
        trainer.fit(module, data)
    assert all(torch.equal(p, after_first[n]) for n, p in module.named_parameters())


def test_the_guard_can_be_turned_off():
    """guard_non_finite: false lets a nan loss through (the run goes on and ends with non-finite weights)."""
    module, data = sft(guard_non_finite=False)
    nan_loss_at(module, 1)
    quiet_trainer(limit_val_batches=0, max_steps=3).fit(module, data)
    assert not weights_finite(module)


def test_a_nan_at_step_k_leaves_the_last_good_checkpoint_loadable(tmp_path):
    """A checkpoint after every step, keeping one: the nan loss in batch 3 stops the run before step 4, so the file of
    step 3 stays on disk; it loads, with finite weights equal to the module's (no bad update was applied)."""
    module, data = sft()
    nan_loss_at(module, 3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=1)
    with pytest.raises(NonFiniteError, match="global step 3"):
        checkpointing(checkpoint).fit(module, data)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch=0-step=3.ckpt"]
    loaded = SFTModule.load_from_checkpoint(tmp_path / "epoch=0-step=3.ckpt", tokenizer=data.tokenizer,
                                            weights_only=False)
    assert weights_finite(loaded)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), module.parameters()))


def test_a_checkpoint_of_non_finite_weights_is_refused_and_the_good_one_kept(tmp_path):
    """A callback corrupts a weight after step 2 (as a buggy weight update would): ModelCheckpoint's save of step 2
    is refused, so it never rotates out the good file of step 1."""

    class Corrupt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.policy.lm_head.weight[0, 0] = NAN

    module, data = sft()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=1)
    with pytest.raises(NonFiniteError, match=r"SFTModule, global step 2: refusing to write a checkpoint from "
                                             r"non-finite weights \(policy.lm_head.weight\); the last good"):
        checkpointing(Corrupt(), checkpoint).fit(module, data)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch=0-step=1.ckpt"]
    loaded = SFTModule.load_from_checkpoint(tmp_path / "epoch=0-step=1.ckpt", tokenizer=data.tokenizer,
                                            weights_only=False)
    assert weights_finite(loaded)


def test_check_weights_outside_a_trainer():
    module, _ = sft()
    module.configure_model()
    check_weights(module)  # finite: passes
    with torch.no_grad():
        next(module.policy.parameters())[0] = math.inf
    with pytest.raises(NonFiniteError, match="policy.model.embed_tokens.weight"):
        module.on_save_checkpoint({})
