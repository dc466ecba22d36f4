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
