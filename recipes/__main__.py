"""`python -m recipes fit|validate|test|predict --config yaml/...`: the LightningCLI entry point (wiring only).

`python -m recipes study|evaluate ...` hand the remaining arguments to those commands' own parsers."""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.cli import LightningArgumentParser as Parser

from recipes import check_configs, legacy, resolve_configs, run_dirs, warning_filters
from recipes.argv import nested_nulls
from recipes.callbacks.atomic_checkpoint import check_checkpoint
from recipes.callbacks.progress import StepProgressBar
from recipes.datamodules.resumable import ResumableLoaderMixin

# Checkpoints written atomically in their own folder (a kill mid-save never truncates one); a config's own plugins win.
TRAINER_DEFAULTS = {"plugins": [{"class_path": "recipes.callbacks.atomic_checkpoint.AtomicCheckpointIO"}]}
# Subcommands that are not a Trainer entry point: name -> (module whose ``main(args)`` runs it, help line).
SUBCOMMANDS = {"study": ("recipes.study", "Train and compare SFT, RM, DPO, DPO-Iter and PPO on a known-gold task."),
               "evaluate": ("recipes.evaluate", "Generate with several policies and score them (paper Table 4).")}


class AlignmentCLI(LightningCLI):
    """LightningCLI with the values every recipe shares linked from the data module into the model.

    The tokenizer (hence vocab size, pad/eos ids) and the token budget are set once, on the data module. Loggers
    without a ``save_dir`` write under ``trainer.default_root_dir``; ``--ckpt_path last`` is that folder's newest
    complete checkpoint; the progress bar counts steps out of ``max_steps`` (`StepProgressBar`).
    """

    def setup_parser(self, add_subcommands: bool, *args, **kwargs) -> None:
        super().setup_parser(add_subcommands, *args, **kwargs)
        run_dirs.route_loggers_on_parse(self.parser)  # loggers without a save_dir write under default_root_dir
        for name, (_, text) in SUBCOMMANDS.items() if add_subcommands else ():  # dispatched by cli_main, listed here
            self.parser._subcommands_action.add_subcommand(name, Parser(description=text), help=text)

    def parse_arguments(self, parser, args) -> None:
        self._raw_args = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """``last`` resolved first. Then explicit values win over a checkpoint's saved hyperparameters: Lightning
        applies those on top of the parsed arguments (so ``predict --ckpt_path x --model.init_args.max_new_tokens 4``
        would be ignored); here they are applied first and the config files and command line parsed again on top."""
        before, parse, sub = self.config, self.parser.parse_object, self.config.get("subcommand")
        last = run_dirs.resolve_last(self.config[sub]) if sub else None
        check_checkpoint(last or self.config[sub].get("ckpt_path") if sub else None)  # a truncated file, named
        source = f"--ckpt_path {self.config[sub].get('ckpt_path')}" if sub else "the checkpoint"
        # A checkpoint of rlhf-recipes 0.1 names its module by its old class path: read it under the new one.
        self.parser.parse_object = lambda cfg, *a, **kw: parse(legacy.upgrade_class_paths(cfg, source), *a, **kw)
        try:
            super()._parse_ckpt_path()
        finally:
            del self.parser.parse_object
        if self.config is not before:
            raw = self._raw_args if self._raw_args is not None else sys.argv[1:]
            self.config = self.parser.parse_args(list(raw), namespace=self.config)
            self.config[sub].ckpt_path = last or self.config[sub].ckpt_path  # `--ckpt_path last`, read again

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
        parser.link_arguments("data.max_length", "model.init_args.max_length", apply_on="instantiate")

    def after_instantiate_classes(self) -> None:
        if isinstance(self.datamodule, ResumableLoaderMixin):
            warning_filters.ignore_unresumable_dataloader()

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        return super()._instantiate_trainer(config, StepProgressBar.unless_configured(config, callbacks))


def cli_main(args: ArgsType = None, run: bool = True) -> AlignmentCLI | object:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    given = list(args) if args is not None else sys.argv[1:]
    argv = resolve_configs(given)  # `--config tiny/sft.yaml` from any folder finds the shipped file
    check_configs(argv)  # a mistyped config path stops here, with the nearest shipped configs
    legacy.check(argv)  # a config naming a class path of rlhf-recipes 0.1 stops here, with the new path
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    argv = nested_nulls(argv)  # `--model.init_args.model.config null` reaches ModelSpec as None
    with warnings.catch_warnings():  # the filters hold for this run only
        warning_filters.ignore_args_with_argv()  # the args passed below replace sys.argv by design
        return AlignmentCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True},
                            args=argv if args is not None or argv != given else None, run=run,
                            auto_configure_optimizers=False, trainer_defaults=TRAINER_DEFAULTS)


if __name__ == "__main__":
    cli_main()
