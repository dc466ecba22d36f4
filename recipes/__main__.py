"""`python -m recipes fit|validate|test|predict --config yaml/...`: the LightningCLI entry point (wiring only).

`python -m recipes study|evaluate ...` hand the remaining arguments to those commands' own parsers."""

from __future__ import annotations

import logging

from lightning.pytorch.cli import ArgsType, LightningCLI

from recipes import legacy, resolve_configs


class AlignmentCLI(LightningCLI):
    """LightningCLI with the values every recipe shares linked from the data module into the model.

    The tokenizer (hence vocab size, pad/eos ids) and the token budget are set once, on the data module.
    """

    def parse_arguments(self, parser, args) -> None:
        self._raw_args = args
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Explicit values win over a checkpoint's saved hyperparameters: Lightning applies those on top of the
        parsed arguments (so ``predict --ckpt_path x --model.init_args.max_new_tokens 4`` would be ignored); here
        they are applied first and the config files and command line are parsed again on top of them."""
        before, parse = self.config, self.parser.parse_object
        sub = self.config.get("subcommand")
        source = f"--ckpt_path {self.config[sub].get('ckpt_path')}" if sub else "the checkpoint"
        # A checkpoint of rlhf-recipes 0.1 names its module by its old class path: read it under the new one.
        self.parser.parse_object = lambda cfg, *a, **kw: parse(legacy.upgrade_class_paths(cfg, source), *a, **kw)
        try:
            super()._parse_ckpt_path()
        finally:
            del self.parser.parse_object
        if self.config is not before:
            import sys

            raw = self._raw_args if self._raw_args is not None else sys.argv[1:]
            self.config = self.parser.parse_args(list(raw), namespace=self.config)

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.epilog = ("Also: `python -m recipes study --config yaml/study/tiny.yaml` (the SFT/DPO/DPO-Iter/PPO "
                         "study) and `python -m recipes evaluate --config yaml/tiny/eval.yaml` (score policies).")
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
        parser.link_arguments("data.max_length", "model.init_args.max_length", apply_on="instantiate")


# Subcommands that are not a Trainer entry point: name -> module whose ``main(args)`` runs it.
SUBCOMMANDS = {"study": "recipes.study", "evaluate": "recipes.evaluate"}


def cli_main(args: ArgsType = None, run: bool = True) -> AlignmentCLI | object:
    import importlib
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    given = list(args) if args is not None else sys.argv[1:]
    argv = resolve_configs(given)  # `--config tiny/sft.yaml` from any folder finds the shipped file
    legacy.check(argv)  # a config naming a class path of rlhf-recipes 0.1 stops here, with the new path
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    return AlignmentCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv if args is not None or argv != given else None,
        run=run,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    cli_main()
