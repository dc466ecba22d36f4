"""Filters for the Lightning warnings that are false for this project, each matched by its message and the module
that emits it (lightning 2.6 texts), so that every other warning, from there or anywhere, still shows."""

from __future__ import annotations

import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning


def ignore_unresumable_dataloader() -> None:
    """Lightning warns on every mid-epoch resume that the dataloader "is not resumable", because it tests whether
    the ``DataLoader`` object itself is stateful. Here the data module is: `ResumableLoaderMixin.state_dict` records
    the micro-batches consumed in the epoch and, on restore, `ResumableSampler` skips exactly those samples, so the
    resumed run sees the batches an uninterrupted run would (tests/datamodules). Install it only for such a module."""
    warnings.filterwarnings(
        "ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader "
        r"is not resumable", category=PossibleUserWarning, module=r"lightning\.pytorch\.loops\.training_epoch_loop")


def ignore_args_with_argv() -> None:
    """LightningCLI warns when it gets ``args`` while ``sys.argv`` holds arguments too, in case a caller meant them to
    merge. `cli_main` passes ``args`` that replace ``sys.argv`` by design: the command line itself with the config
    paths resolved, or the arguments its caller gave (`recipes.export` a config it wrote for one CPU process, the
    study runner each stage's config), never meant to merge with the caller's own command line."""
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python",
                            module=r"lightning\.pytorch\.cli")
