"""Guards against numbers that silently go bad: a non-finite loss, gradient, reward, advantage or weight stops the run
at once, naming the global step, the quantity and its likely cause. They only read values and raise: a finite run's
arithmetic and random draws are unchanged. Every process takes the same decision, so all of them stop together."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from recipes.modules.distributed import all_reduce_sum

OPT_OUT = "(set the module's guard_non_finite: false to let the run go on regardless)"


class NonFiniteError(FloatingPointError):
    """A loss, gradient, reward, advantage or weight holds nan or inf."""


def _local(t: Tensor) -> Tensor:
    """This process's part of a tensor: an FSDP2 DTensor's shard, a ZeRO-3 parameter's partition, else the tensor."""
    if hasattr(t, "to_local"):
        return t.to_local()
    return getattr(t, "ds_tensor", t)


@torch.no_grad()
def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor (this process's part of it) is finite; one device sync."""
    flags = [torch.isfinite(t).all() for t in map(_local, tensors) if t.numel()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True


def non_finite_rows(x: Tensor) -> list[int]:
    """Indices along dim 0 of the rows of ``x`` holding a nan or inf."""
    bad = ~torch.isfinite(x.detach())
    return (bad.flatten(1).any(1) if bad.dim() > 1 else bad).nonzero().flatten().tolist()


def _agreed(ok: bool, trainer: Any) -> bool:
    """``ok`` on every process (an ``all`` over ranks): all raise together rather than one raising and one hanging."""
    return trainer.strategy.reduce_boolean_decision(ok, all=True) if trainer is not None else ok


def _names(names: Sequence[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _where(module: nn.Module) -> str:
    trainer = getattr(module, "_trainer", None)
    step = trainer.global_step if trainer is not None else 0
    return f"{type(module).__name__}, global step {step}"


def _likely_cause(module: nn.Module) -> str:
    """The weights, when they are already non-finite; else the usual suspects of a finite model's blow-up."""
    bad = [name for name, p in module.named_parameters() if not all_finite([p])]
    if bad:
        return f"the weights are already non-finite ({_names(bad)}): the model was loaded that way"
    trainer = getattr(module, "_trainer", None)
    rates = [float(g["lr"]) for opt in (trainer.optimizers if trainer is not None else []) for g in opt.param_groups]
    lr = f" (lr {', '.join(f'{r:.3g}' for r in rates)})" if rates else ""
    return (f"likely the learning rate is too high{lr}: lower optimizer.init_args.lr, add warmup or gradient clipping "
            "(trainer.gradient_clip_val), and prefer bf16-mixed or 32-true precision over fp16")


def check_loss(module: nn.Module, loss: Tensor, quantity: str = "loss") -> None:
    """Raise `NonFiniteError` if ``loss`` is nan or inf on any process (before its backward)."""
    if _agreed(all_finite([loss.detach()]), getattr(module, "_trainer", None)):
        return
    raise NonFiniteError(f"{_where(module)}: the {quantity} is non-finite ({float(loss.detach().sum()):.4g} on this "
                         f"process); the run stops before the optimizer step, so the weights and the last checkpoint "
                         f"stay finite. Cause: {_likely_cause(module)} {OPT_OUT}.")


def check_gradients(module: nn.Module, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
    """Raise `NonFiniteError` if any gradient is nan or inf on any process (after backward, before the step)."""
    grads = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if _agreed(all_finite(g for _, g in grads), getattr(module, "_trainer", None)):
        return
    bad = [name for name, g in grads if not all_finite([g])]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_local(g).float()).cpu() for _, g in grads]))
    raise NonFiniteError(f"{_where(module)}: the gradient norm is {float(norm)} ({len(bad)} of {len(grads)} "
                         f"parameters have non-finite gradients here: {_names(bad) or 'none on this process'}); the "
                         f"optimizer step was not taken, so the weights and the last checkpoint stay finite. Cause: "
                         f"{_likely_cause(module)} {OPT_OUT}.")


def check_weights(module: nn.Module) -> None:
    """Raise `NonFiniteError` instead of writing a checkpoint of non-finite weights (the previous one is kept)."""
    params = list(module.named_parameters())
    if _agreed(all_finite(p for _, p in params), getattr(module, "_trainer", None)):
        return
    bad = [name for name, p in params if not all_finite([p])]
    raise NonFiniteError(f"{_where(module)}: refusing to write a checkpoint from non-finite weights "
                         f"({_names(bad) or 'on another process'}); the last good checkpoint is kept. Resume from it "
                         f"with a lower learning rate {OPT_OUT}.")


def check_scores(scores: Tensor, texts: Sequence[str], reward_fn: Any, where: str = "") -> None:
    """Refuse the non-finite scores of ``reward_fn``, naming the rows, their scores and responses (on every process)."""
    rows = non_finite_rows(scores)
    if not int(all_reduce_sum(torch.tensor(float(len(rows)), device=scores.device))):
        return
    shown = "; ".join(f"row {i}: {float(scores[i])} for {texts[i][:40]!r}" for i in rows[:3])
    source = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    raise NonFiniteError(f"{where}reward function {source} returned non-finite scores for rows {rows} of "
                         f"{len(scores)} ({shown or 'on another process'}): fix the reward function (a division by "
                         "zero or a log of 0 on an empty or unusual response?); nothing has been trained on them.")


def check_advantages(module: nn.Module, advantages: Tensor, parts: dict[str, Tensor]) -> None:
    """Raise `NonFiniteError` if PPO's advantages are non-finite, naming the rows and which input (``parts``: the
    per-token rewards, the critic's values, the log-probs) is non-finite there."""
    rows = non_finite_rows(advantages)
    if _agreed(not rows, getattr(module, "_trainer", None)):
        return
    culprits = [name for name, x in parts.items() if not all_finite([x])] or ["none of its inputs on this process"]
    raise NonFiniteError(f"{_where(module)}: the advantages are non-finite for rows {rows} of {len(advantages)}; "
                         f"non-finite: {', '.join(culprits)}. Nothing has been trained on them. Cause: "
                         f"{_likely_cause(module)} {OPT_OUT}.")
