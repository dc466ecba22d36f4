"""Where the import paths of rlhf-recipes 0.1 (four top-level packages: modules, datamodules, callbacks, recipes) live
in 0.2 (one package, recipes), and the check that stops a config naming an old path before any model or data loads.
Stdlib only and quick: `python -m recipes` runs it on every command.

A 0.1 config (a run's saved config.yaml included) stops with each old path, its file and line, and the new path. A 0.1
checkpoint loads: under ``torch.load(weights_only=True)`` (the default; Lightning's ``--ckpt_path``,
``recipes.export``) its pickled ``modules.models.ModelSpec``/``LoRASpec`` read as the new classes
(``recipes.modules.models`` registers the old names), and ``python -m recipes ... --ckpt_path`` reads the old
``_class_path`` the 0.1 CLI saved under its new name. No top-level ``modules`` alias is installed (a user's own
``modules`` package must win), so what unpickles with ``weights_only=False`` cannot import an old class: DeepSpeed's
conversion in ``recipes.export`` then fails naming the new path (`explain_unpickling`), other such loads with
``No module named 'modules'``. ``SFTModule.load_from_checkpoint`` (any of the project's LightningModules) of a 0.1 CLI
checkpoint reads its old ``_class_path`` at the new path (`recipes.modules.base.ReadsOldCheckpoints`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

OLD_ROOTS = ("modules", "datamodules", "callbacks")
_KEPT = {  # files that kept their name: <root>.<name> -> recipes.<root>.<name>
    "modules": ("base", "distributed", "dpo", "export", "generation", "losses", "models", "optim", "policy", "ppo",
                "ranking", "ranking_losses", "reward", "rl_utils", "rollout", "scalar_models", "sft", "types"),
    "datamodules": ("builtin", "code", "code_synthesis", "collate", "eval_prompts", "formats", "io",
                    "online_preference", "preference", "preference_sources", "prompts", "ranking", "resumable",
                    "sampler", "sft"),
    "callbacks": ("dpo_iter", "ema_reference", "hf_export", "prediction_writer", "sample_logger"),
}
# Old module -> new module: every module of 0.1's modules/, datamodules/ and callbacks/.
MODULES: dict[str, str] = {f"{root}.{name}": f"recipes.{root}.{name}" for root, names in _KEPT.items() for name in names}
MODULES.update({
    "modules.code_eval": "recipes.modules.code.problems",
    "modules.code_metrics": "recipes.modules.code.metrics",
    "modules.code_reward": "recipes.modules.code.reward",
    "modules.execution": "recipes.modules.code.execution",
    "modules.sandbox_host": "recipes.modules.code.host",
    "modules.sandbox_launch": "recipes.modules.code.launch",
    "modules.sandbox_harness": "recipes.modules.code.sandbox.harness",
    "modules.sandbox_kernel": "recipes.modules.code.sandbox.kernel",
    "modules.sandbox_forkserver": "recipes.modules.code.sandbox.forkserver",
    "modules.rewards": "recipes.modules.reward_functions",
    "modules.judge": "recipes.evaluate.judge",
    "modules.evaluation": "recipes.evaluate.metrics",
    "datamodules.tokenizer": "recipes.modules.tokenizer",
})
_MOVED_SYMBOLS = {  # symbols that left their file: (old module, new module, names)
    ("modules.models", "recipes.modules.sharding", ("fsdp2_shard", "fsdp2_mesh_and_policy", "fsdp2_param_dtype")),
    ("modules.distributed", "recipes.modules.sharding", ("is_sharded", "is_partitioned", "unsharded",
                                                         "fsdp2_shard_scalar", "reshard", "local_part", "local_pair",
                                                         "copy_local")),
    ("modules.policy", "recipes.modules.adapters", ("reference_context", "plan_adapter", "ensure_adapter",
                                                    "add_planned_adapters", "adapter_pairs", "add_frozen_adapter",
                                                    "readd_adapter_before_load")),
    ("datamodules.preference", "recipes.datamodules.collate", ("PreferenceExample", "collate_preference")),
    ("datamodules.prompts", "recipes.datamodules.collate", ("pad_prompts",)),
    ("datamodules.ranking", "recipes.datamodules.collate", ("RankingExample", "collate_ranking")),
    ("datamodules.builtin", "recipes.modules.cache", ("cache_dir",)),
    ("datamodules.preference", "recipes.modules.cache", ("fingerprint",)),
}
# Old module.symbol -> new module.symbol, for the symbols above; they win over MODULES.
SYMBOLS: dict[str, str] = {f"{old}.{name}": f"{new}.{name}" for old, new, names in _MOVED_SYMBOLS for name in names}

_NOTE = "rlhf-recipes 0.2 installs one package, recipes"
_DOTTED = r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+"
_CLASS_PATH = re.compile(rf"""(?<![\w])(["']?)class_path\1\s*[:=]\s*["']?({_DOTTED})""")  # YAML, JSON, flow style
_BARE_KEYS = ("--model", "--data", "--trainer.callbacks", "--trainer.callbacks+")  # a class name alone is a value
_CONFIG_KEYS = ("--config", "-c")
_MAX_CONFIG_BYTES = 1 << 20  # a config file is small; anything larger is data, not read here


def new_path(path: str) -> str | None:
    """The 0.2 path of a 0.1 dotted path (a module, ``module.Symbol`` or deeper), or None when it is no old path.

    Only an old root followed by one of its 0.1 module names counts, so ``callbacks.my_own.Thing`` (a user's own
    package) and ``lightning.pytorch.callbacks.ModelCheckpoint`` are no old paths."""
    parts = path.split(".")
    symbol, module = ".".join(parts[:3]), ".".join(parts[:2])
    if symbol in SYMBOLS:
        return SYMBOLS[symbol] + path[len(symbol):]
    if module in MODULES:
        return MODULES[module] + path[len(module):]
    return None


def _moved(where: str, old: str, what: str) -> str:
    return f"{where}: class_path '{old}' moved to '{new_path(old)}' ({_NOTE}): update the {what}."


def _options(args: list[str]) -> Iterator[tuple[str, str]]:
    """(option, value) pairs of command-line arguments, ``--key value`` and ``--key=value`` alike."""
    for i, arg in enumerate(args):
        if arg.startswith("-") and "=" in arg:
            yield tuple(arg.split("=", 1))  # type: ignore[misc]
        elif arg.startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            yield arg, args[i + 1]


def _file_problems(path: str) -> list[str]:
    """One message per old class path in the config file ``path``, with its line number."""
    try:
        if os.path.getsize(path) > _MAX_CONFIG_BYTES:
            return []
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []  # the CLI's own parser reports a file it cannot read
    yaml = path.endswith((".yaml", ".yml"))
    problems = []
    for number, line in enumerate(lines, 1):
        text = re.sub(r"(^|\s)#.*", "", line) if yaml else line  # a commented-out line is no config
        problems += [_moved(f"{path}:{number}", m.group(2), "config")
                     for m in _CLASS_PATH.finditer(text) if new_path(m.group(2))]
    return problems


def find_moved(args: list[str]) -> list[str]:
    """One message per old class path in ``args`` (``class_path`` values anywhere in a value, a bare class name for
    ``--model``/``--data``/``--trainer.callbacks`` or ``--*.class_path``) and in the config files they name."""
    problems = []
    for key, value in _options(args):
        if (key in _CONFIG_KEYS or key in _BARE_KEYS) and os.path.isfile(value):
            problems += _file_problems(value)
            continue
        olds = [m.group(2) for m in _CLASS_PATH.finditer(value)]
        if key in _BARE_KEYS or key.endswith(".class_path"):
            olds.append(value.strip())
        problems += [_moved(key, old, "argument") for old in olds if new_path(old)]
    return problems


def check(args: list[str]) -> None:
    """Stop with every old class path in ``args`` and the config files they name, each with its new path."""
    problems = find_moved(args)
    if problems:
        raise SystemExit("\n".join(problems))


def upgrade_class_paths(value: Any, source: str = "the checkpoint") -> Any:
    """``value`` (nested dicts and lists, such as a checkpoint's hyperparameters) with every 0.1 ``class_path`` or
    ``_class_path`` replaced by its 0.2 path, each logged: a checkpoint cannot be edited like a config."""
    if isinstance(value, list):
        return [upgrade_class_paths(v, source) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: upgrade_class_paths(v, source) for k, v in value.items()}
    for key in ("class_path", "_class_path"):
        old = out.get(key)
        if isinstance(old, str) and new_path(old):
            out[key] = new_path(old)
            log.warning("%s: class_path '%s' read as '%s' (%s).", source, old, out[key], _NOTE)
    return out


def explain_unpickling(error: BaseException, source: str) -> None:
    """Raise a ModuleNotFoundError naming the new path when ``error`` is an unpickler failing to import a 0.1 module
    (``torch.load(..., weights_only=False)`` imports a pickled class by its old path, which 0.2 does not install);
    return for any other error."""
    name = getattr(error, "name", None) or ""
    if not isinstance(error, ModuleNotFoundError) or name.split(".")[0] not in OLD_ROOTS:
        return
    raise ModuleNotFoundError(
        f"{source}: written by rlhf-recipes 0.1, it pickles classes of '{name}', now "
        f"'{MODULES.get(name, 'recipes.' + name)}' ({_NOTE}). torch.load(..., weights_only=True) reads the old names "
        "(recipes.modules.models registers them); to unpickle it with weights_only=False, make the old name importable "
        "for that one load: sys.modules['modules'] = recipes.modules; sys.modules['modules.models'] = "
        "recipes.modules.models.", name=name) from error
