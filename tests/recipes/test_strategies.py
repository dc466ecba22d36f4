"""Every strategy named in a shipped YAML constructs on this CPU machine (FSDP and DeepSpeed only run on GPUs, so
their construction is what is checked here; the multi-process runs that CPU allows are in test_distributed.py).

DeepSpeed configs are never skipped: with deepspeed installed (the `dev` extra) the strategy is built as Lightning
builds it; without it, the init_args are type-checked against ``DeepSpeedStrategy``'s signature by jsonargparse
and the strategy is built with Lightning's availability flags forced on (its constructor uses nothing from
deepspeed but its logger, stubbed), so the ZeRO config dict it would hand to deepspeed is checked either way."""

import importlib.util
import logging
import sys
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Union

import pytest
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy

import yaml
from tests.conftest import REPO

STRATEGY_YAML = []
for _path in sorted((REPO / "yaml").rglob("*.yaml")):
    _strategy = (yaml.safe_load(_path.read_text()) or {}).get("trainer", {}).get("strategy")
    if isinstance(_strategy, dict):
        STRATEGY_YAML.append((_path.relative_to(REPO), _strategy))
DEEPSPEED_YAML = [(p, s) for p, s in STRATEGY_YAML if "DeepSpeed" in s["class_path"]]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture
def deepspeed_constructible(monkeypatch):
    """Let ``DeepSpeedStrategy(...)`` construct where deepspeed is absent: its constructor checks that deepspeed is
    importable and, after building the ZeRO config, sets deepspeed's logger level; nothing else touches deepspeed."""
    if not HAS_DEEPSPEED:
        import lightning.pytorch.strategies.deepspeed as ds

        monkeypatch.setattr(ds, "_DEEPSPEED_AVAILABLE", True)
        monkeypatch.setattr(ds, "_DEEPSPEED_GREATER_EQUAL_0_16", True)


@contextmanager
def _deepspeed_logger_stub(strategy: dict):
    """Without deepspeed, a stand-in ``deepspeed.utils.logging.logger`` for the constructor's one use of it; only
    while the strategy is built, so nothing else (transformers probes for deepspeed) ever sees the stand-in."""
    if HAS_DEEPSPEED or "DeepSpeed" not in strategy["class_path"]:
        yield
        return
    stub = SimpleNamespace(utils=SimpleNamespace(logging=SimpleNamespace(logger=logging.getLogger("deepspeed"))))
    sys.modules["deepspeed"] = stub
    try:
        yield
    finally:
        del sys.modules["deepspeed"]


def _build(strategy: dict) -> Strategy:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Union[Strategy, str])
    parsed = parser.parse_object({"strategy": strategy})
    with _deepspeed_logger_stub(strategy):
        return parser.instantiate_classes(parsed).strategy


@pytest.mark.parametrize("path, strategy", STRATEGY_YAML, ids=[str(p) for p, _ in STRATEGY_YAML])
def test_strategy_constructs(path, strategy, deepspeed_constructible):
    built = _build(strategy)
    assert isinstance(built, Strategy), path
    assert type(built).__name__ == strategy["class_path"].rsplit(".", 1)[-1]
    if type(built).__name__ == "FSDPStrategy":  # decoder layers resolved to classes, not left as strings
        wrap = built.kwargs["auto_wrap_policy"]  # a ModuleWrapPolicy over the resolved layer classes
        assert {cls.__name__ for cls in wrap._module_classes} == {"LlamaDecoderLayer"}, wrap


@pytest.mark.parametrize("path, strategy", DEEPSPEED_YAML, ids=[str(p) for p, _ in DEEPSPEED_YAML])
def test_deepspeed_yaml_zero_config(path, strategy, deepspeed_constructible):
    """The YAML's init_args are DeepSpeedStrategy arguments of the right types; the ZeRO dict holds its stage, and
    the offload switches add (only) the CPU offload sections; ``--trainer.strategy.init_args.stage`` turns every
    DeepSpeed YAML into the other stage (ZeRO-2 and ZeRO-3 for each); the model checkpoints its own activations."""
    args = strategy["init_args"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DeepSpeedStrategy, "ds")
    parser.parse_object({"ds": args})  # unknown names or wrong types raise here, with no instantiation
    for stage in (2, 3):
        for offload in (False, True):
            switches = {"stage": stage, "offload_optimizer": offload,
                        **({"offload_parameters": offload} if stage == 3 else {})}
            zero = _build({**strategy, "init_args": {**args, **switches}}).config["zero_optimization"]
            assert zero["stage"] == stage, path
            assert ("offload_optimizer" in zero) == offload
            assert ("offload_param" in zero) == (offload and stage == 3)
            if offload:
                assert zero["offload_optimizer"]["device"] == "cpu"
    assert _build(strategy).config["zero_optimization"]["stage"] == args["stage"]
    shipped = _build(strategy).config["zero_optimization"]
    assert "offload_optimizer" not in shipped and "offload_param" not in shipped  # the YAML ships with offload off
    config = yaml.safe_load((REPO / path).read_text())
    assert config["model"]["init_args"]["model"]["gradient_checkpointing"] is True, path
    assert "PPOModule" not in config["model"]["class_path"]  # PPO ships on FSDP2; ZeRO-2 is tested in test_distributed


@pytest.mark.parametrize("strategy", [{"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
                                       "init_args": {"stage": 3}},
                                      {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}])
def test_ppo_refuses_zero3_and_fsdp1_with_a_clear_error(strategy, deepspeed_constructible, tiny_spec, byte_tokenizer):
    """Under ZeRO-3 a frozen reference copy of partitioned weights is empty, and Lightning's FSDPStrategy cannot clip
    by norm: PPO stops at configure_optimizers and names what to use instead (ZeRO-2 runs: test_distributed.py)."""
    from recipes.modules.ppo import PPOModule
    from recipes.modules.reward_functions import CharacterFractionReward

    module = PPOModule(model=tiny_spec, critic=tiny_spec, reward=CharacterFractionReward(), tokenizer=byte_tokenizer)
    module._trainer = SimpleNamespace(strategy=_build(strategy))
    with pytest.raises(ValueError, match="under (DeepSpeed|FSDPStrategy).*ModelParallelStrategy"):
        module.configure_optimizers()


def test_every_strategy_family_is_shipped():
    names = {s["class_path"].rsplit(".", 1)[-1] for _, s in STRATEGY_YAML}
    assert {"FSDPStrategy", "DeepSpeedStrategy"} <= names
    stages = {s["init_args"]["stage"] for _, s in DEEPSPEED_YAML}
    assert stages == {2, 3}


def test_zero3_init_loads_pretrained_weights_into_partitions(tmp_path):
    """Under ``deepspeed.zero.Init`` (where Lightning's ZeRO-3 runs ``configure_model``, here with bf16 as
    ``precision: bf16-mixed`` sets it), `build_causal_lm` from a saved folder gives partitioned parameters that
    gather to the saved weights (in bf16); plain ``from_pretrained`` there fails with a size mismatch. On such
    partitioned models the DPO reference cache key tells them apart, the HF export gathers the real weights, the EMA
    pairs are the partitions, and a DPO frozen reference copy is refused. CPU, one gloo process; needs deepspeed
    (the `dev` extra)."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch
    from transformers import AutoModelForCausalLM

    from recipes.callbacks.ema_reference import local_pair
    from recipes.modules.dpo import DPOModule
    from recipes.modules.export import save_pretrained
    from recipes.modules.models import ModelSpec, build_causal_lm
    from recipes.modules.reference_pass import model_fingerprint
    from recipes.modules.tokenizer import load_tokenizer
    from tests.conftest import TINY_LLAMA

    folder = tmp_path / "tiny"
    build_causal_lm(ModelSpec(config=dict(TINY_LLAMA, vocab_size=64))).save_pretrained(folder)
    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        try:
            config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = build_causal_lm(ModelSpec(name_or_path=str(folder)))
            params = dict(model.named_parameters())
            assert all(p.numel() == 0 for p in params.values())  # partitioned at init
            with deepspeed.zero.GatheredParameters(list(params.values())):
                for name, param in params.items():
                    assert torch.equal(param.data, saved[name].to(torch.bfloat16)), name
            # the precomputed-reference cache key reads the ZeRO-3 partitions, not the empty placeholders: another
            # model of the same shapes gets another key, the same weights the same key
            with deepspeed.zero.Init(config_dict_or_path=config):
                same = build_causal_lm(ModelSpec(name_or_path=str(folder)))
                # a random init with a tokenizer's pad id: transformers zeroes the padding row, which on an empty
                # placeholder failed until build_causal_lm told transformers that ZeRO-3 is on
                other = build_causal_lm(ModelSpec(config=dict(TINY_LLAMA)), load_tokenizer("builtin:byte"))
            keys = [model_fingerprint(policy) for policy in (model, same, other)]
            assert keys[0] == keys[1] != keys[2]
            # the HF export gathers the partitions one weight at a time (a plain save would write the placeholders)
            save_pretrained(model, None, str(tmp_path / "export"))
            exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.bfloat16).state_dict()
            assert all(torch.equal(exported[name], saved[name].to(torch.bfloat16)) for name in params)
            # EMA lerps ZeRO-3 partitions (on the placeholders it would silently do nothing)
            ref, pol = local_pair(0, next(model.parameters()), next(same.parameters()))
            assert ref.numel() > 0 and ref.shape == pol.shape
            # a frozen copy of partitioned weights would be empty: refused with what to use instead
            dpo = DPOModule(model=ModelSpec(name_or_path=str(folder)), reference_mode="frozen_copy")
            with deepspeed.zero.Init(config_dict_or_path=config), pytest.raises(ValueError, match="frozen_copy"):
                dpo.configure_model()
        finally:
            torch.distributed.destroy_process_group()


def test_fsdp_strategy_clips_by_norm_through_the_fsdp_root(tiny_spec, byte_tokenizer):
    """Lightning's FSDP precision plugin refuses ``gradient_clip_val`` by norm (the shipped FSDP YAMLs set 1.0), so
    `recipes.modules.base.AlignmentModule` hands it to the FSDP root's ``clip_grad_norm_``; a GPU is needed to run FSDP
    itself, so the hook is checked against a recording stand-in for the wrapped root."""
    from lightning.pytorch.strategies import FSDPStrategy

    from recipes.modules.sft import SFTModule

    calls = []
    strategy = FSDPStrategy()
    strategy.model = SimpleNamespace(clip_grad_norm_=calls.append)
    module = SFTModule(model=tiny_spec, tokenizer=byte_tokenizer)
    module._trainer = SimpleNamespace(strategy=strategy)
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert calls == [1.0]


@pytest.mark.parametrize("path, strategy", [(p, s) for p, s in STRATEGY_YAML if "ModelParallel" in s["class_path"]],
                         ids=[str(p) for p, s in STRATEGY_YAML if "ModelParallel" in s["class_path"]])
def test_model_parallel_sizes_cover_every_process(path, strategy):
    """ModelParallelStrategy refuses to start unless data_parallel_size x tensor_parallel_size is the world size, and
    its "auto" data-parallel size means the number of nodes (not of GPUs): the YAML states the sizes outright."""
    trainer = yaml.safe_load((REPO / path).read_text())["trainer"]
    sizes = strategy["init_args"]
    assert isinstance(sizes["data_parallel_size"], int) and isinstance(sizes["tensor_parallel_size"], int), path
    world = trainer.get("devices", 1) * trainer.get("num_nodes", 1)
    assert sizes["data_parallel_size"] * sizes["tensor_parallel_size"] == world, path


DEEPSPEED_STEP = """
import sys
import deepspeed
import torch
from recipes.modules.tokenizer import load_tokenizer
from recipes.modules.models import ModelSpec
from recipes.modules.sft import SFTModule
from tests.conftest import TINY_LLAMA

stage, out = int(sys.argv[1]), sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
module = SFTModule(model=ModelSpec(config=dict(TINY_LLAMA)), tokenizer=load_tokenizer("builtin:byte"))
module.configure_model()


class Wrapped(torch.nn.Module):  # as lightning.pytorch.overrides.base._LightningModuleWrapperBase names it
    def __init__(self, inner):
        super().__init__()
        self._forward_module = inner

    def forward(self, ids):
        return self._forward_module.policy(input_ids=ids).logits.float().pow(2).mean()


model = Wrapped(module)
initial = {name: p.detach().clone() for name, p in module.policy.named_parameters()}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                  config={"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1})
engine.backward(engine(torch.tensor([[5, 6, 7, 8]])))
engine.step()
engine.save_checkpoint(out + "/ckpt", tag="checkpoint", client_state={})  # as DeepSpeedStrategy.save_checkpoint
params = dict(module.policy.named_parameters())
with deepspeed.zero.GatheredParameters(list(params.values())):
    trained = {name: p.detach().clone() for name, p in params.items()}
torch.save({"initial": initial, "trained": trained}, out + "/weights.pt")
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_exports_to_the_trained_weights(stage, tmp_path):
    """A ZeRO-2 / ZeRO-3 checkpoint in the layout Lightning's DeepSpeedStrategy writes (the engine's
    ``save_checkpoint(dir, tag="checkpoint")`` of the LightningModule wrapped as ``_forward_module``), made by a real
    DeepSpeed engine on the CPU after one optimizer step, becomes with ``python -m recipes.export`` a Hugging Face
    folder holding exactly the trained weights. Needs deepspeed (the `dev` extra); the engine runs in its own
    process (deepspeed keeps global state)."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.conftest import TINY_LLAMA

    config = yaml.safe_load((REPO / "yaml" / "tiny" / "sft.yaml").read_text())
    config["model"]["init_args"]["model"]["config"] = dict(TINY_LLAMA)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29550 + stage), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for cmd in ([sys.executable, "-c", DEEPSPEED_STEP, str(stage), str(tmp_path)],
                [sys.executable, "-m", "recipes.export", "--config", str(tmp_path / "config.yaml"),
                 "--ckpt_path", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    weights = torch.load(tmp_path / "weights.pt")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() <= weights["trained"].keys()
    for name, value in exported.items():
        torch.testing.assert_close(value, weights["trained"][name], rtol=0, atol=0, msg=name)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[name], weights["initial"][name])  # the step moved it; the export holds the move
