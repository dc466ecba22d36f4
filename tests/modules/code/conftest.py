"""Fixtures of the sandbox tests: a setuid-root binary the sandbox can see."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def setuid_copy() -> Iterator[tuple[str | None, str]]:
    """(path, reason): a setuid-root copy of ``id`` where the sandbox can see it (under /usr, which its allowlist
    binds read-only and nosuid), kept only after a control run as an unprivileged uid outside the sandbox shows
    that it does give euid 0; else (None, why not)."""
    if os.geteuid() != 0:
        yield None, "needs root to make a setuid-root binary"
        return
    os.makedirs("/usr/local/lib", exist_ok=True)
    folder = tempfile.mkdtemp(prefix="rlhf-setuid-", dir="/usr/local/lib")
    try:
        os.chmod(folder, 0o755)
        binary = os.path.join(folder, "id")
        shutil.copy(shutil.which("id") or "/usr/bin/id", binary)
        os.chmod(binary, 0o4755)
        control = subprocess.run([binary, "-u"], user=63476, group=63476, extra_groups=[], capture_output=True,
                                 text=True).stdout.strip()
        yield (binary, "") if control == "0" else (None, f"a setuid-root id gives euid {control!r} here (nosuid?)")
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def setuid_id(setuid_copy: tuple[str | None, str]) -> str:
    path, reason = setuid_copy
    if path is None:
        pytest.skip(reason)
    return path
