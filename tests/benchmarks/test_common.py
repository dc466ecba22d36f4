"""The benchmarks' child-process runner: live-memory runs get the fixed mmap threshold (and only they), and a child
that dies is reported instead of waited on forever."""

import os

import pytest

from benchmarks.common import LIVE_MEMORY_ENV, run_isolated


def report_environment() -> dict:
    return {"threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def die() -> dict:
    os._exit(3)


@pytest.mark.slow
def test_only_live_memory_runs_get_the_fixed_threshold_and_the_parent_keeps_its_environment(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert run_isolated(report_environment)["threshold"] is None
    live = run_isolated(report_environment, live_memory=True)
    assert live["threshold"] == LIVE_MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert live["peak_rss_mb"] >= 0
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


@pytest.mark.slow
def test_a_child_that_dies_is_an_error_naming_the_function():
    with pytest.raises(RuntimeError, match=r"running die died \(exit code 3\)"):
        run_isolated(die)
