"""A non-editable install (``pip install .`` and a built wheel) holds one top-level package, ``recipes``, with its
configs and the sandbox child side, and runs the CLI and the README's example from a user's folder whose own
``modules``, ``callbacks`` and ``datamodules`` packages would clash with the 0.1 layout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

USER_PACKAGE = 'OWNER = "user"  # a research repo\'s own package named {name}, unrelated to rlhf-recipes\n'
WHERE_FROM = '''
import json
from pathlib import Path

import lightning as L


class ImportCheck(L.Callback):
    """The user's own callback: asserts, at the end of fit, which packages the run imported."""

    def on_fit_end(self, trainer, pl_module):
        import modules
        import recipes

        where = {"recipes": recipes.__file__, "modules": modules.__file__, "module": type(pl_module).__module__}
        assert Path(recipes.__file__).is_relative_to(TARGET), where
        assert modules.OWNER == "user" and type(pl_module).__module__ == "recipes.modules.sft", where
        Path("imports.json").write_text(json.dumps(where))
'''


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
           "--quiet"]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _copy_source(dest: Path) -> Path:
    """The files git would commit (tracked, plus new ones not ignored), so no build/ or egg-info comes along."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    for rel in filter(None, listed.stdout.split("\0")):
        if (REPO / rel).is_file():  # a tracked file deleted in the working tree is no source
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


@pytest.fixture(scope="module", params=["pip-install", "wheel"])
def target(request, tmp_path_factory) -> Path:
    """A folder holding the package installed non-editable, by ``pip install --target`` or from a built wheel."""
    root = tmp_path_factory.mktemp(request.param)
    source = _copy_source(root / "source")
    if request.param == "pip-install":
        _pip("install", "--no-build-isolation", "--target", str(root / "target"), str(source), cwd=root)
    else:
        _pip("wheel", "--no-build-isolation", "-w", str(root / "wheels"), str(source), cwd=root)
        wheels = [str(p) for p in (root / "wheels").glob("*.whl")]
        assert len(wheels) == 1, wheels
        _pip("install", "--target", str(root / "target"), *wheels, cwd=root)
    return root / "target"


@pytest.fixture
def user_repo(target) -> Path:
    """A fresh folder beside the install, holding a user's own ``modules``, ``callbacks`` and ``datamodules``."""
    repo = target.parent / "user"
    shutil.rmtree(repo, ignore_errors=True)
    for name in ("modules", "callbacks", "datamodules"):
        (repo / name).mkdir(parents=True)
        (repo / name / "__init__.py").write_text(USER_PACKAGE.format(name=name))
    check = WHERE_FROM.replace("TARGET", repr(str(target)))
    (repo / "callbacks" / "__init__.py").write_text(USER_PACKAGE.format(name="callbacks") + check)
    return repo


def _run(args: list[str], target: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python args`` with only the install on PYTHONPATH, every cache in the temporary folder, one thread."""
    tmp = target.parent
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "RLHF_RECIPES_CACHE": str(tmp / "cache"),
           "HF_HOME": str(tmp / "hf_home"), "MPLCONFIGDIR": str(tmp / "mpl"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


@pytest.mark.slow
def test_installs_one_top_level_package(target):
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}  # bin: the script
    assert top == {"recipes"}
    for rel in ("recipes/configs/tiny/sft.yaml", "recipes/modules/code/sandbox/harness.py",
                "recipes/datamodules/sft.py", "recipes/callbacks/ema_reference.py", "recipes/legacy.py"):
        assert (target / rel).is_file(), rel
    assert not (target / "recipes" / "configs" / "__init__.py").exists()  # yaml/ stays a folder of data


@pytest.mark.slow
def test_cli_fit_runs_from_a_users_folder(target, user_repo):
    """``python -m recipes fit --config tiny/sft.yaml`` finds the shipped config and imports only the install, while
    the user's ``callbacks.ImportCheck`` (a class path under a 0.1 root name, not flagged) checks it at fit end."""
    root = target.parent / "run"
    _run(["-m", "recipes", "fit", "--config", "tiny/sft.yaml", "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--data.init_args.max_rows", "40",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
          "--trainer.logger.init_args.save_dir", str(root), "--trainer.callbacks+=callbacks.ImportCheck"],
         target, cwd=user_repo)
    assert (user_repo / "imports.json").is_file()  # the check ran
    assert list(root.glob("version_*/checkpoints/*.ckpt")) and list(root.glob("version_*/hf/config.json"))
    assert sorted(p.name for p in user_repo.iterdir()) == ["callbacks", "datamodules", "imports.json", "modules"]


@pytest.mark.slow
def test_installed_config_path_is_a_real_file(target, user_repo):
    """``config_path`` gives a file of the install (not a MultiplexedPath), for ``--config x`` and ``--config=x``."""
    check = textwrap.dedent(f"""
        from pathlib import Path

        from recipes import config_path, resolve_configs

        path = config_path("tiny/sft.yaml")
        assert isinstance(path, Path) and path.is_file() and path.is_relative_to({str(target)!r}), path
        assert resolve_configs(["fit", "--config=yaml/tiny/sft.yaml", "-c", "tiny/sft.yaml"]) == [
            "fit", f"--config={{path}}", "-c", str(path)]
    """)
    _run(["-c", check], target, cwd=user_repo)


def test_resolve_configs_finds_shipped_configs_from_any_folder(tmp_path, monkeypatch):
    from recipes import config_path, resolve_configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("trainer: {}\n")
    shipped = str(config_path("tiny/sft.yaml"))
    assert resolve_configs(["fit", "--config", "tiny/sft.yaml", "--config=yaml/tiny/sft.yaml", "--config", "mine.yaml",
                            "--trainer.max_steps", "2", "--config", "missing.yaml"]) == [
        "fit", "--config", shipped, f"--config={shipped}", "--config", "mine.yaml", "--trainer.max_steps", "2",
        "--config", "missing.yaml"]  # a file here wins; a missing one is left for the parser to report


@pytest.mark.slow
def test_readme_python_example_runs_from_a_users_folder(target, user_repo):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Using a module from plain Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "max_steps=100" in code and 'export_pretrained("my-model")' in code
    check = textwrap.dedent(f"""
        from pathlib import Path

        import callbacks
        import datamodules
        import modules
        import recipes

        assert Path(recipes.__file__).is_relative_to({str(target)!r}), recipes.__file__
        assert modules.OWNER == datamodules.OWNER == callbacks.OWNER == "user", modules.__file__
    """)
    after = "\nfrom transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained('my-model')\n"
    script = user_repo / "example.py"
    script.write_text(check + code.replace("max_steps=100", "max_steps=2, enable_progress_bar=False") + after)
    _run([str(script)], target, cwd=user_repo)
    assert (user_repo / "my-model" / "config.json").is_file()
