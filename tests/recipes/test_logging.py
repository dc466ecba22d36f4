"""The optional loggers (docs/logging.md): the extras exist, every YAML block of the doc parses on a tiny config,
and a tiny fit with TensorBoard writes its event file in the run's folder (skipped without tensorboard)."""

import re

import pytest

from recipes.__main__ import cli_main
from tests.conftest import REPO

DOC = REPO / "docs" / "logging.md"


def test_logger_extras_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("tensorboard", "wandb", "mlflow"):
        assert [r for r in extras[name] if r.startswith(f"{name}>=")], name


@pytest.mark.parametrize("block", re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL), ids=["tb", "wandb", "mlflow"])
def test_every_logger_block_of_the_doc_parses(block, tmp_path, capsys):
    (tmp_path / "logger.yaml").write_text(block)
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", "yaml/tiny/sft.yaml", "--config", str(tmp_path / "logger.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    assert re.search(r"class_path: lightning\.pytorch\.loggers\.\w+Logger", capsys.readouterr().out)


def test_tiny_fit_with_tensorboard_writes_events_in_the_run_folder(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install -e '.[tensorboard]'")
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", "yaml/tiny/sft.yaml", "--trainer.logger", "TensorBoardLogger",
                    "--trainer.logger.name", "", "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
                    "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2",
                    "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--data.init_args.max_rows", "40"])
    assert type(cli.trainer.logger).__name__ == "TensorBoardLogger"
    assert list((root / "version_0").glob("events.out.tfevents.*"))
    assert list((root / "version_0" / "checkpoints").glob("*.ckpt")) and (root / "hf" / "config.json").is_file()
