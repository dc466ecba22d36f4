"""SampleLogger: every N PPO iterations it logs the first samples of the latest rollout, with their raw scores, to
the Python log and to a logger that has ``log_text``."""

import logging

import torch
from lightning.pytorch.loggers import Logger

from recipes.callbacks.sample_logger import SampleLogger
from recipes.datamodules.prompts import PromptDataModule
from recipes.modules.reward_functions import CharacterFractionReward
from tests.conftest import quiet_trainer
from tests.modules.test_ppo import make_module


class TextLogger(Logger):
    """A logger with W&B's ``log_text`` signature that keeps what it receives."""

    def __init__(self):
        super().__init__()
        self.texts = []

    name, version = "text", 0

    def log_text(self, key, columns, data, step):
        self.texts.append((key, columns, data, step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class CheckedSampleLogger(SampleLogger):
    """Asserts inside the hook: a log entry appears exactly at the steps ``should_log`` names (2 and 4 of 5)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rollouts = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = len(self.logged)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        assert len(self.logged) == before + (trainer.global_step in (2, 4))
        self.rollouts[trainer.global_step] = list(pl_module.last_samples)  # this iteration's full triples


def test_logs_the_latest_rollout_every_n_iterations(byte_tokenizer, caplog):
    module = make_module(byte_tokenizer, max_new_tokens=6, ppo_epochs=1, max_length=64)  # as the CLI links it
    cb, logger = CheckedSampleLogger(every_n_steps=2, num_samples=2, max_chars=5), TextLogger()
    with caplog.at_level(logging.INFO, logger="recipes.callbacks.sample_logger"):
        quiet_trainer(max_steps=5, callbacks=[cb], logger=logger).fit(module, PromptDataModule(rollout_batch_size=4,
                                                                                            max_length=64))
    assert [step for step, _ in cb.logged] == [2, 4]
    assert [(key, step, len(data)) for key, _, data, step in logger.texts] == [("samples", 2, 2), ("samples", 4, 2)]
    reward = CharacterFractionReward()
    for (step, picked), (_, _, data, _) in zip(cb.logged, logger.texts):
        assert data == [list(x) for x in picked]
        full = cb.rollouts[step][:2]  # the first num_samples of that step's rollout, cut to max_chars = 5
        assert picked == [(p[-5:], r[:5], s) for p, r, s in full]
        prompts, texts, scores = zip(*full)  # the logged score is the reward of the full response
        torch.testing.assert_close(reward(list(prompts), list(texts)).float(), torch.tensor(scores).float())
    assert sum("step 4 | score" in r.getMessage() for r in caplog.records) == 2


def test_a_module_without_last_samples_is_refused():
    """A module that does not declare ``last_samples`` (not a PPO module) is a clear error at setup, not a silent no-op."""
    import lightning as L
    import pytest

    with pytest.raises(TypeError, match="LightningModule has none: remove SampleLogger"):
        SampleLogger().setup(None, L.LightningModule(), "fit")
