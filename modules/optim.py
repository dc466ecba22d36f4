"""Optimizer and learning-rate schedule wiring shared by every module: warmup + cosine, stepped per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from recipes.modules.validation import at_least, positive, within

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
        at_least("WarmupCosineLR", "warmup_steps", warmup_steps, 0, "Use 0 for no warmup")
        at_least("WarmupCosineLR", "total_steps", total_steps, 1, "Use null for the trainer's estimate")
        within("WarmupCosineLR", "min_lr_ratio", min_lr_ratio, 0.0, 1.0, "The final rate is a fraction of the base")
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
    return with_scheduler(module, check_learning_rates(module, optimizer(params)), scheduler)


def joint_optimization(module: Any, parts: list[tuple[Iterable[torch.nn.Parameter], OptimizerFactory]],
                       scheduler: SchedulerFactory | None) -> dict[str, Any]:
    """One optimizer over several parameter sets, each a parameter group with its own factory's settings (learning
    rate, weight decay, betas), for an engine that takes one optimizer (DeepSpeed). For disjoint sets this steps
    exactly as one optimizer per set would (Adam's statistics are per parameter); the factories must build one
    optimizer class. The scheduler, if any, scales every group."""
    built = [optimizer([p for p in params if p.requires_grad]) for params, optimizer in parts]
    if len({type(opt) for opt in built}) > 1:
        raise ValueError(f"{type(module).__name__}: one optimizer for all parameter sets needs one optimizer class, "
                         f"got {sorted(type(opt).__name__ for opt in built)}.")
    joint = built[0]
    for other in built[1:]:
        for group in other.param_groups:
            joint.add_param_group(group)
    return with_scheduler(module, check_learning_rates(module, joint), scheduler)


def check_learning_rates(module: Any, opt: Optimizer) -> Optimizer:
    """``opt`` once every parameter group's learning rate is finite and > 0 (0 trains nothing; a negative rate
    ascends the loss)."""
    for group in opt.param_groups:
        if "lr" in group:
            positive(type(module).__name__, "optimizer lr", float(group["lr"]), "Set optimizer.init_args.lr "
                     "(critic_optimizer for PPO's critic) to a positive rate, e.g. 1e-5 for a pretrained model")
    return opt


def actor_critic_optimization(module: Any, actor: torch.nn.Module, critic: torch.nn.Module,
                              factories: tuple, max_grad_norm: float | None) -> list[dict[str, Any]] | dict[str, Any]:
    """PPO's optimization from ``(optimizer, critic_optimizer, scheduler, critic_scheduler)`` factories: one optimizer
    (and scheduler) per model, each clipped by the module itself. Under DeepSpeed, which takes one optimizer, the two
    models are two parameter groups of one optimizer (`joint_optimization`), the actor's scheduler scales both, and
    DeepSpeed clips their joint gradient norm at ``max_grad_norm``; ZeRO-2 only, since a frozen reference copy of
    ZeRO-3 partitioned weights is empty (FSDP2 shards all four models). FSDPStrategy is refused: its precision plugin
    cannot clip norms."""
    optimizer, critic_optimizer, scheduler, critic_scheduler = factories
    strategy = module.trainer.strategy
    if (name := type(strategy).__name__) == "FSDPStrategy":
        raise ValueError(f"{type(module).__name__} cannot run under FSDPStrategy (its precision plugin cannot clip "
                         "norms): use ModelParallelStrategy (FSDP2, yaml/ppo_llama2.yaml), DeepSpeed ZeRO-2 or DDP.")
    if name != "DeepSpeedStrategy":
        return [build_optimization(module, actor.parameters(), optimizer, scheduler),
                build_optimization(module, critic.parameters(), critic_optimizer, critic_scheduler)]
    if strategy.zero_stage_3 or critic_scheduler is not None:
        raise ValueError(f"{type(module).__name__} under DeepSpeed: ZeRO-2 only (a frozen reference copy of ZeRO-3 "
                         "weights is empty; use ModelParallelStrategy, FSDP2, to shard all four models), and one "
                         "scheduler for both parameter groups (unset critic_scheduler).")
    strategy.config["gradient_clipping"] = max_grad_norm or 0.0  # read when DeepSpeed starts, after this call
    return joint_optimization(module, [(actor.parameters(), optimizer), (critic.parameters(), critic_optimizer)],
                              scheduler)


def with_scheduler(module: Any, opt: Optimizer, scheduler: SchedulerFactory | None) -> dict[str, Any]:
    """``opt`` and, if given, its scheduler (stepped every optimizer step) in Lightning's return format."""
    if scheduler is None:
        return {"optimizer": opt}
    sched = scheduler(opt)
    if isinstance(sched, WarmupCosineLR) and sched.total_steps is None and module.trainer is not None:
        sched.total_steps = int(module.trainer.estimated_stepping_batches)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def adamw(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    """The safe Python default: AdamW at 1e-5, weight decay 0 (configs choose their own)."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
