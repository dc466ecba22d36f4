"""The evaluate command (``python -m recipes evaluate --config yaml/tiny/eval.yaml``): generate with several policies
on one prompt set and score them the way the paper's Table 4 does (reward model, win/tie/loss, an optional LLM judge,
KL to the reference; docs/evaluation.md). runner: the command; policies: loading and generation; metrics: scores;
judge: the LLM-judge client; report: tables and plots."""

from __future__ import annotations

from typing import Any


def main(args: list[str] | None = None) -> Any:
    """Run the evaluation with command-line style ``args`` (see `recipes.evaluate.runner.build_parser`)."""
    from recipes.evaluate.runner import main as run

    return run(args)
