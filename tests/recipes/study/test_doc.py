"""docs/study.md cannot go stale: its results block is written by the study's report code (`--doc`), and a fresh
run of the README's default study (one seed) reproduces every seed-0 row the doc shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recipes import config_path
from recipes.study.report import BEGIN, END, PLOTS

DOC = Path(__file__).resolve().parents[3] / "docs" / "study.md"
ROW = re.compile(r"^\| [AB] \| 0 \| .*\|$", re.M)  # the per-run table: | track | seed | method | ...


def _block(text: str) -> str:
    assert BEGIN in text and END in text, "docs/study.md lost its study block markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def test_doc_block_names_its_command_and_embeds_the_plots():
    block = _block(DOC.read_text(encoding="utf-8"))
    assert "Command: `python -m recipes study --config yaml/study/tiny.yaml" in block
    for name in PLOTS:
        assert f"](img/{name})" in block and (DOC.parent / "img" / name).exists()
    assert len(ROW.findall(block)) >= 30  # both tracks' seed-0 rows are there to compare


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 8 minutes on 2 idle cores (111 jobs); the suite's 900 s is too tight under load
def test_a_fresh_default_study_reproduces_the_docs_seed0_rows(tmp_path):
    from recipes.study import main

    report = main(["--config", str(config_path("study/tiny.yaml")), "--out", str(tmp_path)])
    fresh = ROW.findall(report["table"])
    documented = ROW.findall(_block(DOC.read_text(encoding="utf-8")))
    assert fresh == documented, ("docs/study.md is stale: regenerate it with the command in its study block "
                                 "(python -m recipes study ... --doc docs/study.md)")
