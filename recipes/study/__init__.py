"""The study command (``python -m recipes study --config yaml/study/tiny.yaml``): SFT, reward model, DPO, DPO-Iter
and the PPO Table-3 ladder trained and compared on a built-in task with a known gold reward (docs/study.md)."""

from __future__ import annotations

from typing import Any


def main(args: list[str] | None = None) -> Any:
    """Run the study with command-line style ``args`` (see `recipes.study.runner.build_parser`)."""
    from recipes.study.runner import main as run

    return run(args)
