"""What the commands print: a tiny fit, its resume (``--ckpt_path last``, mid-epoch) and ``python -m recipes.export``
show none of Lightning's warnings that are false here, and the progress bar never reads ``Epoch 2/-2``."""

import subprocess
import sys

import yaml

FALSE_WARNINGS = ("dataloader is not resumable", "LightningCLI's args parameter")


def _run(args: list[str], cwd) -> str:
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed[-3000:]
    return printed


def test_fit_resume_and_export_print_no_false_warning_and_no_negative_total(tmp_path):
    (tmp_path / "ckpt.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 2, "save_last": True}}]}}))
    root = tmp_path / "run"
    # `tiny/sft.yaml` is resolved to the shipped file, so the CLI passes the rewritten command line as args
    fit = ["-m", "recipes", "fit", "--config", "tiny/sft.yaml", "--config", "ckpt.yaml", "--data.init_args.max_rows",
           "200", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
           "--trainer.default_root_dir", str(root)]  # 12 batches an epoch: steps 4 and 6 are mid-epoch
    printed = {"fit": _run([*fit, "--trainer.max_steps", "4"], tmp_path),
               "resume": _run([*fit, "--trainer.max_steps", "6", "--ckpt_path", "last"], tmp_path),
               "export": _run(["-m", "recipes.export", "--config", str(root / "version_1" / "config.yaml"),
                               "--ckpt_path", str(root / "version_1" / "checkpoints" / "last.ckpt"),
                               "--out", str(tmp_path / "exported")], tmp_path)}
    assert "Restored all states from the checkpoint" in printed["resume"]
    assert (tmp_path / "exported" / "config.json").is_file()
    for command, text in printed.items():
        for warning in FALSE_WARNINGS:
            assert warning not in text, f"{command} printed {warning!r}"
        assert "/-" not in text, command
    assert "Epoch 0, steps" in printed["fit"] and "| 6/6 [" in printed["resume"]  # steps out of max_steps
