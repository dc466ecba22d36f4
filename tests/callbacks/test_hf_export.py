"""HFExport: `<default_root_dir>/hf` follows the newest export, a real folder there is left alone, fast_dev_run
exports nothing."""

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from recipes.callbacks.hf_export import HFExport


class Exportable(BoringModel):
    """A BoringModel whose export writes one marker file (the real modules write a Hugging Face folder)."""

    def export_pretrained(self, path: str, merge_lora: bool = True, is_writer: bool = True) -> str:
        if is_writer:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "config.json").write_text("{}")
        return path


def _fit(root, **kwargs) -> HFExport:
    export = HFExport()
    L.Trainer(default_root_dir=root, callbacks=[export], max_steps=1, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", **kwargs).fit(Exportable())
    return export


def test_link_follows_each_new_export_and_is_relative(tmp_path):
    first, second = tmp_path / "version_0" / "hf", tmp_path / "version_1" / "hf"
    for target in (first, second):
        target.mkdir(parents=True)
        HFExport.link(str(target), str(tmp_path / "hf"))
        assert (tmp_path / "hf").resolve() == target.resolve()
    assert (tmp_path / "hf").readlink().as_posix() == "version_1/hf"  # the run folder can move as a whole


def test_a_real_folder_in_the_links_place_is_kept_with_a_warning(tmp_path, caplog):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("an export of an older layout")
    (tmp_path / "version_0" / "hf").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        HFExport.link(str(tmp_path / "version_0" / "hf"), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "old.txt").is_file() and "is a folder, not a link" in caplog.text


def test_export_into_the_run_folder_itself_needs_no_link(tmp_path):
    export = _fit(tmp_path)  # no logger: log_dir is default_root_dir, the export is <root>/hf
    assert export.exported_to == str(tmp_path / "hf")
    assert (tmp_path / "hf").is_dir() and not (tmp_path / "hf").is_symlink()


def test_fast_dev_run_exports_nothing(tmp_path):
    export = _fit(tmp_path, fast_dev_run=1)
    assert export.exported_to is None and not (tmp_path / "hf").exists()


def test_an_explicit_dirpath_is_never_linked_nor_written_through_a_link(tmp_path):
    """Two exports in one fit (an adapter folder elsewhere, the merged model at <root>/hf, as the FSDP2 LoRA test
    does): no link is made, <root>/hf is a real folder holding the merged model, and an older run's link at that
    path is replaced by a folder instead of being written through."""
    import json
    import os

    from recipes.__main__ import cli_main

    root = tmp_path / "run"
    old = tmp_path / "older_export"
    old.mkdir()
    root.mkdir()
    os.symlink(old, root / "hf")  # as a previous fit's HFExport leaves it
    cli_main(["fit", "--config", "yaml/tiny/sft.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
              "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
              "--model.init_args.model.lora", json.dumps({"r": 2, "alpha": 4, "dropout": 0.0}),
              "--trainer.callbacks", json.dumps([
                  {"class_path": "recipes.callbacks.hf_export.HFExport",
                   "init_args": {"dirpath": str(tmp_path / "adapter"), "merge_lora": False}},
                  {"class_path": "recipes.callbacks.hf_export.HFExport", "init_args": {"dirpath": str(root / "hf")}}])])
    assert not os.path.islink(root / "hf") and (root / "hf" / "model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists() and not any(old.iterdir())
