"""Dataset mixtures: ``data`` as a list of weighted sources in their own formats, for every data module; the weight
semantics, per-source counts, exact mid-epoch resume, validation errors and a YAML list through the CLI."""

import random
from types import SimpleNamespace

import pytest
import torch

from recipes.datamodules.mixture import DataSource, check_sources, weighted
from recipes.datamodules.preference import PreferenceDataModule
from recipes.datamodules.prompts import PromptDataModule
from recipes.datamodules.ranking import RankingDataModule
from recipes.datamodules.sft import SFTDataModule
from recipes.datamodules.unpaired import UnpairedDataModule
from tests.conftest import REPO, write_jsonl

PAIRS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]


def test_weights_use_whole_copies_then_a_seeded_subset():
    """10 rows: weight 2 is every row twice; 0.5 a subset of 5 in file order, the same for the same seed; 1.3 every
    row once, then 3 of them again."""
    rows = list(range(10))
    assert weighted(rows, 2.0, random.Random(0)) == rows + rows
    half = weighted(rows, 0.5, random.Random("a"))
    assert len(half) == 5 and half == sorted(half) and half == weighted(rows, 0.5, random.Random("a"))
    assert any(weighted(rows, 0.5, random.Random(s)) != half for s in "bcdef")
    more = weighted(rows, 1.3, random.Random(0))
    assert more[:10] == rows and len(more) == 13 and set(more[10:]) <= set(rows)


@pytest.mark.parametrize("data, match", [
    ([], r"SFTDataModule: data is \[\]; give a source"),
    ([{"path": "a.jsonl", "weight": 0}], r"data\[0\] 'a.jsonl': weight is 0; it must be a number > 0"),
    ([{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": -1.0}], r"data\[1\] 'b.jsonl': weight is -1.0"),
    ([{"path": "a.jsonl", "weight": float("nan")}], r"data\[0\] 'a.jsonl': weight is nan"),
    ([{"path": "a.jsonl", "wieght": 0.5}], r"data\[0\] 'a.jsonl' has unknown field\(s\) wieght; a source has path, "
                                           r"weight, source_format, split, max_rows"),
    ([{"weight": 0.5}], r"data\[0\] has no path"),
    ([{"path": "a.jsonl", "source_format": "hh"}], r"data\[0\] 'a.jsonl': source_format 'hh' is not one of alpaca"),
    ([{"path": "a.jsonl", "max_rows": 0}], r"data\[0\] 'a.jsonl': max_rows is 0"),
    ([3], r"data\[0\] is 3; a source is a mapping"),
])
def test_bad_mixtures_are_refused_naming_the_source(data, match):
    with pytest.raises(ValueError, match=match):
        SFTDataModule(data=data)


def test_a_plain_path_is_no_mixture_and_one_source_of_weight_one_reads_the_same():
    assert check_sources("M", "builtin:sft", ["alpaca"]) is None
    plain = SFTDataModule(max_rows=60, max_length=128)
    mixed = SFTDataModule(data=[DataSource("builtin:sft")], max_rows=60, max_length=128)
    for dm in (plain, mixed):
        dm.setup("fit")
    assert mixed.train_set == plain.train_set and mixed.val_set == plain.val_set
    assert mixed.hparams.data == [{"path": "builtin:sft", "weight": 1.0, "source_format": None, "split": None,
                                   "max_rows": None}]  # plain values: a checkpoint loads with weights_only=True


def test_sft_mixture_of_two_formats_weighted_and_counted(tmp_path, caplog):
    """builtin:sft (Alpaca, 40 rows, 4 held out, weight 0.5: 18 of 36) + a prompt/response file (10 rows, 1 held
    out, weight 2: 18): 36 training and 5 validation examples, each source held out on its own."""
    other = str(write_jsonl(tmp_path / "other.jsonl", PAIRS))
    dm = SFTDataModule(data=[{"path": "builtin:sft", "weight": 0.5, "max_rows": 40},
                             {"path": other, "weight": 2.0, "source_format": "prompt_response"}],
                       prompt_format="plain", val_fraction=0.1, max_length=128)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    counts = {k: v for k, v in dm.counts.items() if k.startswith("data[")}
    sft = "data[0] builtin:sft"
    assert counts == {f"{sft}: rows read": 40, f"{sft}: rows held out": 4, f"{sft}: rows used": 18,
                      f"data[1] {other}: rows read": 10, f"data[1] {other}: rows held out": 1,
                      f"data[1] {other}: rows used": 18}
    assert len(dm.train_set) == 36 and len(dm.val_set) == 5
    decoded = [dm.tokenizer.decode(e["prompt_ids"]) for e in dm.train_set[18:]]
    assert decoded[:9] == decoded[9:] and all(p.startswith("p") for p in decoded)  # two whole copies
    assert f"Mixture data[1] {other}: 10 usable rows, 1 held out, 18 training rows per epoch" in caplog.text
    again = SFTDataModule(data=dm.hparams.data, prompt_format="plain", val_fraction=0.1, max_length=128)
    again.setup("fit")
    assert again.train_set == dm.train_set  # deterministic given the seed


def test_preference_prompt_ranking_and_unpaired_mixtures(tmp_path):
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"}
                                                         for i in range(8)]))
    pref = PreferenceDataModule(data=[{"path": "builtin:preference", "max_rows": 20}, {"path": pairs, "weight": 1.5}],
                                val_fraction=0.0, max_length=64)
    pref.setup("fit")
    assert len(pref.train_set) == 20 + 12 and [e["index"] for e in pref.train_set] == list(range(32))
    assert pref.counts[f"data[1] {pairs}: rows used"] == 12

    hh = str(REPO / "tests" / "fixtures" / "saferlhf" / "pairs.jsonl")
    prompts = PromptDataModule(data=[{"path": "builtin:prompts", "weight": 0.25, "max_rows": 40},
                                     {"path": hh, "source_format": "saferlhf"}], rollout_batch_size=4)
    prompts.setup("fit")
    n_hh = prompts.counts[f"{hh}: kept"]
    assert len(prompts.train_set) == 10 + n_hh and prompts.counts["data[0] builtin:prompts: rows used"] == 10
    assert prompts.counts["builtin:prompts: rows"] == 40

    ranking = RankingDataModule(data=[{"path": "builtin:ranking", "max_rows": 10},
                                      {"path": pairs, "source_format": "pairs", "weight": 0.5}], val_fraction=0.0)
    ranking.setup("fit")
    assert len(ranking.train_set) == 14 and all(len(e["response_ids"]) == 2 for e in ranking.train_set[10:])

    kto = UnpairedDataModule(data=[{"path": pairs, "weight": 2.0}], val_fraction=0.25, max_length=64)
    kto.setup("fit")
    assert len(kto.train_set) == 2 * 2 * 6 and len(kto.val_set) == 2 * 2  # pairs -> 2 rows; 2 of 8 held out
    assert kto.counts == {f"data[0] {pairs}: rows read": 8, f"data[0] {pairs}: rows held out": 2,
                          f"data[0] {pairs}: rows used": 12}


def test_resume_mid_epoch_on_a_mixture_gives_the_uninterrupted_batches(tmp_path):
    """7 batches an epoch over a two-source mixture: consume 3, save the state, restore it into a fresh module; its
    loader yields batches 4 to 7 of the uninterrupted epoch, and the next epoch is the uninterrupted one too."""
    trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    other = str(write_jsonl(tmp_path / "other.jsonl", PAIRS))

    def module():
        dm = SFTDataModule(data=[{"path": "builtin:sft", "weight": 0.5, "max_rows": 20},
                                 {"path": other, "weight": 1.5, "source_format": "prompt_response"}],
                           prompt_format="plain", val_fraction=0.0, batch_size=4, max_length=128, seed=3)
        dm.trainer = trainer
        dm.setup("fit")
        return dm

    first, batches = module(), []
    loader = first.train_dataloader()
    for batch in loader:
        batches.append(first.on_before_batch_transfer(batch, 0))
        if len(batches) == 3:
            state = first.state_dict()
    assert len(first.train_set) == 10 + 15 and len(batches) == 7 and state == {"consumed_batches": 3}
    loader.sampler.set_epoch(1)
    next_epoch = list(loader)
    resumed = module()
    resumed.load_state_dict(state)
    resumed_loader = resumed.train_dataloader()
    rest = list(resumed_loader)
    assert len(rest) == 4
    for a, b in zip(rest, batches[3:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["completion_mask"], b["completion_mask"])
    resumed_loader.sampler.set_epoch(1)
    for a, b in zip(list(resumed_loader), next_epoch, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_a_yaml_list_of_sources_runs_through_the_cli(tmp_path):
    import json

    from recipes.__main__ import cli_main

    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2}}
    other = write_jsonl(tmp_path / "other.jsonl", PAIRS)
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("data:\n  init_args:\n    data:\n"
                       "      - {path: builtin:sft, weight: 0.5, max_rows: 100}\n"
                       f"      - {{path: {other}, weight: 2.0, source_format: prompt_response}}\n")
    cli = cli_main(["fit", "--config", str(REPO / "yaml" / "tiny" / "sft.yaml"), "--config", str(mixture),
                    "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_val_batches", "1",
                    "--trainer.callbacks", json.dumps([checkpoint])])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.sources == [DataSource("builtin:sft", 0.5, max_rows=100),
                                      DataSource(str(other), 2.0, "prompt_response")]
    assert cli.datamodule.counts[f"data[1] {other}: rows used"] == 2 * 9  # 1 of 10 held out (val_fraction 0.05)
    checkpoint = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=True)  # as LightningCLI's --ckpt_path reads
    assert checkpoint["datamodule_hyper_parameters"]["data"][1] == {"path": str(other), "weight": 2.0, "source_format":
                                                                    "prompt_response", "split": None, "max_rows": None}


def test_a_mixture_reads_the_builtin_code_sft_set():
    """`CodeSynthesisSFTDataModule` resolves ``builtin:code_sft`` inside a mixture too (a seeded half of it here)."""
    from recipes.datamodules.code_synthesis import CodeSynthesisSFTDataModule
    from recipes.datamodules.mixture import DataSource

    whole = CodeSynthesisSFTDataModule(data="builtin:code_sft", source_format="prompt_response", prompt_format="plain",
                                       max_length=64, val_fraction=0.0)
    half = CodeSynthesisSFTDataModule(data=[DataSource(path="builtin:code_sft", weight=0.5)],
                                      source_format="prompt_response", prompt_format="plain", max_length=64,
                                      val_fraction=0.0)
    whole.setup("fit"), half.setup("fit")
    assert len(half.train_set) == len(whole.train_set) // 2
