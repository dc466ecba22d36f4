"""Every strategy named in a shipped YAML constructs on this CPU machine (FSDP and DeepSpeed only run on GPUs, so
their construction is what is checked here; the multi-process runs that CPU allows are in test_distributed.py)."""

from typing import Union

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy

from tests.conftest import REPO

STRATEGY_YAML = []
for _path in sorted((REPO / "yaml").rglob("*.yaml")):
    _strategy = (yaml.safe_load(_path.read_text()) or {}).get("trainer", {}).get("strategy")
    if isinstance(_strategy, dict):
        STRATEGY_YAML.append((_path.relative_to(REPO), _strategy))


@pytest.mark.parametrize("path, strategy", STRATEGY_YAML, ids=[str(p) for p, _ in STRATEGY_YAML])
def test_strategy_constructs(path, strategy):
    if "DeepSpeed" in strategy["class_path"]:
        pytest.importorskip("deepspeed", reason="DeepSpeed configs construct only where deepspeed is installed")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Union[Strategy, str])
    built = parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
    assert isinstance(built, Strategy), path
    assert type(built).__name__ == strategy["class_path"].rsplit(".", 1)[-1]
    if type(built).__name__ == "FSDPStrategy":  # decoder layers resolved to classes, not left as strings
        wrap = built.kwargs["auto_wrap_policy"]  # a ModuleWrapPolicy over the resolved layer classes
        assert {cls.__name__ for cls in wrap._module_classes} == {"LlamaDecoderLayer"}, wrap


def test_some_strategy_yaml_exists():
    assert any("FSDP" in s["class_path"] for _, s in STRATEGY_YAML)
