"""AlignmentModule: the four modules built on it keep their saved hyperparameters (old checkpoints load), log their
epoch metrics under the stage, and hand the right network to the optimizer and the export."""

import pytest
import torch

from recipes.modules.base import AlignmentModule
from recipes.modules.dpo import DPOModule
from recipes.modules.models import ModelSpec
from recipes.modules.ranking import RankingModule
from recipes.modules.reward import RewardModule
from recipes.modules.sft import SFTModule
from tests.conftest import TINY_LLAMA

# What each module saved before the shared base existed (hparams of a checkpoint written then), beyond ``model``.
OLD_HPARAMS = {
    SFTModule: {"loss_reduction": "token", "max_length": 32, "max_new_tokens": 128, "temperature": 0.0},
    DPOModule: {"reference_mode": "auto", "average_logprobs": False, "cache_reference": True,
                "reference_cache_dir": None, "max_length": 32},
    RewardModule: {"use_margin": True, "max_length": 32},
    RankingModule: {"max_length": 32},
}
NEW_HPARAMS = {cls: {"guard_non_finite": True} for cls in OLD_HPARAMS}  # added since, with a default
NEW_HPARAMS[DPOModule]["reference_batch_size"] = None


@pytest.mark.parametrize("cls", list(OLD_HPARAMS), ids=lambda c: c.__name__)
def test_hparams_unchanged_and_an_old_checkpoint_loads(cls, tmp_path):
    spec = ModelSpec(config=dict(TINY_LLAMA))
    module = cls(model=spec, max_length=32)
    assert isinstance(module, AlignmentModule)
    assert dict(module.hparams) == {"model": spec, **OLD_HPARAMS[cls], **NEW_HPARAMS.get(cls, {})}
    module.configure_model()
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"model": spec, **OLD_HPARAMS[cls]},
                "pytorch-lightning_version": "2.6.0"}, path)
    loaded = cls.load_from_checkpoint(path, weights_only=False)  # strict: every weight lands in the same place
    assert dict(loaded.hparams) == dict(module.hparams)
    for (name, value), (loaded_name, loaded_value) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert loaded_name == name and torch.equal(loaded_value, value), name


def test_subclass_arguments_are_saved_but_objects_are_not():
    """tokenizer, optimizer, scheduler and loss are objects configured in YAML, not hyperparameters."""
    module = DPOModule(model=ModelSpec(config=dict(TINY_LLAMA)), optimizer=torch.optim.SGD,
                       reference_mode="precomputed", reference_batch_size=64)
    assert module.hparams.reference_mode == "precomputed" and module.hparams.reference_batch_size == 64
    assert not {"tokenizer", "optimizer", "scheduler", "loss"} & set(module.hparams)
    assert module.optimizer_factory is torch.optim.SGD and module.policy is None and module.network is None


def test_epoch_metrics_logged_under_the_stage_and_reset(monkeypatch):
    """Reward validation losses 2.0 (weight 1) and 4.0 (weight 3): weighted mean (2 + 12) / 4 = 3.5; margins 1 and
    -1: mean 0; accuracy of predictions [1, 0] against all-ones targets: 0.5."""
    module = RewardModule(model=ModelSpec(config=dict(TINY_LLAMA)))
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    module.val_loss.update(torch.tensor(2.0), weight=1)
    module.val_loss.update(torch.tensor(4.0), weight=3)
    module.val_margin.update(torch.tensor([1.0, -1.0]))
    module.val_accuracy.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    module.on_test_epoch_end()
    assert logged == {"test/loss": 3.5, "test/rewards/accuracies": 0.5, "test/rewards/margins": 0.0}
    assert module.val_loss.update_count == 0  # reset for the next epoch


@pytest.mark.parametrize("cls", [SFTModule, RewardModule], ids=lambda c: c.__name__)
def test_optimizer_gets_the_network_of_the_module(cls, byte_tokenizer):
    """The policy (SFT) or the scalar model (reward, held as ``self.model``) is what the optimizer steps."""
    module = cls(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=byte_tokenizer, max_length=32)
    module.configure_model()
    network = module.policy if cls is SFTModule else module.model
    assert module.network is network
    optimizer = module.configure_optimizers()["optimizer"]
    assert [p for group in optimizer.param_groups for p in group["params"]] == list(network.parameters())


def test_an_unsharded_network_under_model_parallel_is_refused(byte_tokenizer):
    """ModelParallelStrategy synchronizes only FSDP2-sharded parameters: a network left unsharded would train a
    separate copy on every rank, so configure_model refuses it at once."""

    class Unsharded(SFTModule):
        def build_network(self):
            return torch.nn.Linear(2, 2)

    module = Unsharded(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=byte_tokenizer)
    module._device_mesh = object()  # what the strategy sets before configure_model
    with pytest.raises(RuntimeError, match="unsharded network under ModelParallelStrategy"):
        module.configure_model()
