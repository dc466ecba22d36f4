"""Where a run's files go: ``--trainer.default_root_dir`` alone moves logs, checkpoints and the export,
``<root>/hf`` names the newest export, ``--ckpt_path last`` resumes the newest complete checkpoint or stops."""

import csv
import os
from pathlib import Path

import pytest

import yaml
from recipes.__main__ import cli_main
from tests.conftest import REPO

FIT = ["fit", "--config", "yaml/tiny/sft.yaml", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
       "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false", "--data.init_args.max_rows", "200"]  # 12 batches an epoch
EVERY_2_STEPS = {"trainer": {"callbacks": [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
     "init_args": {"every_n_train_steps": 2, "save_last": True}},
    {"class_path": "recipes.callbacks.hf_export.HFExport"}]}}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from an empty folder, so a config's relative default (runs/tiny_sft) could only land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_root_dir_alone_moves_logs_checkpoints_and_export(in_tmp):
    root = in_tmp / "elsewhere"
    for version in (0, 1):
        cli = cli_main([*FIT, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root)])
        log_dir = root / f"version_{version}"
        assert Path(cli.trainer.log_dir) == log_dir and (log_dir / "metrics.csv").is_file()
        assert list((log_dir / "checkpoints").glob("*.ckpt")) and (log_dir / "hf" / "config.json").is_file()
        # <root>/hf always names the newest export: what yaml/tiny/eval.yaml reads after a second fit
        assert (root / "hf").resolve() == (log_dir / "hf").resolve()
    assert not (in_tmp / "runs").exists()


def test_tiny_fit_configs_keep_their_default_folder_and_eval_reads_the_newest_export():
    """Without an override each tiny fit still writes ``runs/tiny_<name>/version_N`` (the README, docs and the eval
    config name those folders), and the eval config reads ``runs/tiny_*/hf``, never one fixed version."""
    tiny = REPO / "yaml" / "tiny"
    for path in sorted(tiny.glob("*.yaml")):
        if path.stem == "eval":
            continue
        trainer = yaml.safe_load(path.read_text())["trainer"]
        init = trainer["logger"]["init_args"]
        assert trainer["default_root_dir"] == f"runs/tiny_{path.stem}", path
        assert init.get("save_dir", trainer["default_root_dir"]) == trainer["default_root_dir"], path
        assert init["name"] == "", path
    evaluation = yaml.safe_load((tiny / "eval.yaml").read_text())
    paths = [p["path"] for p in evaluation["policies"]] + [evaluation["reward"]["path"]]
    assert paths == ["runs/tiny_sft/hf", "runs/tiny_dpo/hf", "runs/tiny_reward/hf"]


def test_config_without_save_dir_logs_under_its_default_root_dir(in_tmp):
    cli = cli_main(["--config", "yaml/tiny/sft.yaml"], run=False)
    assert cli.trainer.logger.save_dir == "runs/tiny_sft" and cli.trainer.default_root_dir == "runs/tiny_sft"


def test_ckpt_path_last_resumes_the_newest_complete_checkpoint(in_tmp):
    root = in_tmp / "run"
    (in_tmp / "ckpt.yaml").write_text(yaml.safe_dump(EVERY_2_STEPS))
    common = [*FIT, "--config", "ckpt.yaml", "--trainer.default_root_dir", str(root)]
    cli_main([*common, "--trainer.max_steps", "4"])
    saved = root / "version_0" / "checkpoints" / "last.ckpt"
    cut = root / "version_0" / "checkpoints" / "epoch=0-step=6.ckpt"  # a newer save that was cut off
    cut.write_bytes(saved.read_bytes()[:1000])
    os.utime(cut, (saved.stat().st_mtime + 10,) * 2)
    cli = cli_main([*common, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert cli.config.fit.ckpt_path == str(saved)
    rows = list(csv.DictReader((root / "version_1" / "metrics.csv").read_text().splitlines()))
    assert sorted({int(r["step"]) for r in rows if r.get("train/loss")}) == [4, 5]  # steps 5 and 6: resumed at 4
    assert cli.trainer.global_step == 6


def test_ckpt_path_last_without_a_checkpoint_stops_naming_where_it_looked(in_tmp):
    root = in_tmp / "empty"
    with pytest.raises(SystemExit) as e:
        cli_main([*FIT, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(root), "--ckpt_path", "last"])
    message = str(e.value.code)
    assert "--ckpt_path last: no complete checkpoint" in message
    assert os.path.join(str(root), "*", "checkpoints", "*.ckpt") in message
    assert not root.exists()  # nothing trained


def test_fast_dev_run_writes_no_export(in_tmp):
    root = in_tmp / "smoke"
    cli_main([*FIT, "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(root)])
    assert not [p for p in in_tmp.rglob("hf") if p.exists() or p.is_symlink()]
