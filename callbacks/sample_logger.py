"""SampleLogger: log a few of the latest rollout's prompt/response/score triples every N PPO iterations."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from recipes.modules.types import Sample

log = logging.getLogger(__name__)


class SampleLogger(Callback):
    """Every ``every_n_steps`` training steps, log the first ``num_samples`` generations of the latest rollout.

    Reads the declared ``pl_module.last_samples`` of `recipes.modules.ppo.PPOModule`: a list of
    `recipes.modules.types.Sample` ``(prompt, response, reward)``, the raw reward, written by each rollout. It writes
    them to the Python log and, when the logger has ``log_text`` (W&B) or ``experiment.add_text`` (TensorBoard), to
    the logger too.

    Example::

        trainer = L.Trainer(callbacks=[SampleLogger(every_n_steps=10, num_samples=4)])

    Args:
        every_n_steps: log after the training steps whose ``global_step`` is a multiple of this.
        num_samples: how many generations to log.
        max_chars: cut prompts and responses to this many characters in the log.
    """

    def __init__(self, every_n_steps: int = 50, num_samples: int = 4, max_chars: int = 300) -> None:
        self.every_n_steps, self.num_samples, self.max_chars = every_n_steps, num_samples, max_chars
        self.logged: list[tuple[int, list[Sample]]] = []  # (global_step, the samples cut to max_chars)

    def should_log(self, step: int) -> bool:
        """Whether to log after the training step that brought ``global_step`` to ``step``."""
        return step > 0 and step % self.every_n_steps == 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a module that does not declare ``last_samples`` (one that is not a PPO module)."""
        if not hasattr(pl_module, "last_samples"):
            raise TypeError(f"SampleLogger reads the rollout samples `last_samples` of recipes.modules.ppo.PPOModule; "
                            f"{type(pl_module).__name__} has none: remove SampleLogger from the trainer's callbacks.")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the latest rollout's samples when ``should_log(global_step)``."""
        # global_step is already incremented here: it is 1 after the first PPO iteration
        samples: list[Sample] = pl_module.last_samples
        if not samples or not trainer.is_global_zero or not self.should_log(trainer.global_step):
            return
        picked = [Sample(s.prompt[-self.max_chars:], s.response[:self.max_chars], float(s.reward))
                  for s in samples[: self.num_samples]]
        self.logged.append((trainer.global_step, picked))
        for s in picked:
            log.info("step %d | score %.3f | %r -> %r", trainer.global_step, s.reward, s.prompt, s.response)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_text"):
            logger.log_text(key="samples", columns=["prompt", "response", "score"], data=[list(x) for x in picked],
                            step=trainer.global_step)
        elif logger is not None and hasattr(getattr(logger, "experiment", None), "add_text"):
            text = "\n\n".join(f"**{s.reward:.3f}** `{s.prompt}` → `{s.response}`" for s in picked)
            logger.experiment.add_text("samples", text, global_step=trainer.global_step)
