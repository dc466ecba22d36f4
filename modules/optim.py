"""Optimizer and learning-rate schedule wiring shared by every module: warmup + cosine, stepped per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class WarmupCosineLR(LambdaLR):
    """Linear warmup from 0 to the base learning rate over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` x base at ``total_steps``.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: optimizer steps of linear warmup.
        total_steps: optimizer steps of the whole run; ``None`` lets the LightningModule fill in
            ``trainer.estimated_stepping_batches`` before the first step.
        min_lr_ratio: final learning rate as a fraction of the base one.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 min_lr_ratio: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if not self.total_steps or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimization(module: Any, params: Iterable[torch.nn.Parameter], optimizer: OptimizerFactory,
                       scheduler: SchedulerFactory | None) -> dict[str, Any]:
    """Instantiate an optimizer (and scheduler, stepped every optimizer step) in Lightning's return format."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters (is everything frozen?).")
    opt = optimizer(params)
    if scheduler is None:
        return {"optimizer": opt}
    sched = scheduler(opt)
    if isinstance(sched, WarmupCosineLR) and sched.total_steps is None and module.trainer is not None:
        sched.total_steps = int(module.trainer.estimated_stepping_batches)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def adamw(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    """The safe Python default: AdamW at 1e-5, weight decay 0 (configs choose their own)."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
