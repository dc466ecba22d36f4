"""Sandbox hygiene across jobs: the machine-wide uid lease, a fresh keyring per job, the release check that nothing of
the uid is left (processes, SysV IPC, keys, files), and no_new_privs against setuid-root binaries.

The seccomp filter denies the key system calls outright (tests/modules/code/test_containment.py); the key tests here
switch it off (``seccomp=False``) to check the layer below it, which must hold where libseccomp is missing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipes.modules.code import host
from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute
from recipes.modules.code.host import key_count, lease_uid, processes_of_uid, sandbox_capabilities

CAPS = sandbox_capabilities()
isolated = pytest.mark.skipif(not CAPS.isolated, reason=f"needs root + namespaces; this machine: {CAPS.as_dict()}")
root = pytest.mark.skipif(not CAPS.setuid, reason="needs root (setuid to a sandbox uid)")
SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(os.uname().machine)  # add_key, keyctl
keys = pytest.mark.skipif(SYSCALLS is None or not os.path.exists("/proc/key-users"),
                          reason="needs kernel keyrings and known syscall numbers")
# Programs in the sandbox call the key syscalls through ctypes, as an attacker without keyutils would.
KEYS = textwrap.dedent(f"""
    import ctypes, os
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
    ADD_KEY, KEYCTL = {SYSCALLS or (0, 0)}
    def add_key(desc, payload, ring=-4):  # -4: the user keyring @u
        return _libc.syscall(ADD_KEY, b"user", desc.encode(), payload.encode(), len(payload), ring)
    def find_key(desc):
        for ring in (-3, -4, -5):  # session, user, user-session: KEYCTL_SEARCH
            if _libc.syscall(KEYCTL, 10, ring, b"user", desc.encode(), 0) > 0:
                return True
        buf = ctypes.create_string_buffer(256)
        for line in open("/proc/keys"):  # and by id, straight from /proc/keys (KEYCTL_READ)
            if desc in line and _libc.syscall(KEYCTL, 11, int(line.split()[0], 16), buf, 256) > 0:
                return True
        return False
""")


def sysv_objects_of(uid: int) -> int:
    found = 0
    for kind in ("shm", "sem", "msg"):
        header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        names = header.split()
        found += sum(uid in (int(f["uid"]), int(f["cuid"])) for f in (dict(zip(names, r.split())) for r in rows))
    return found


def keys_left(uid: int) -> int:
    """Keys of ``uid`` beyond the keyrings every used uid keeps (user, user-session, persistent)."""
    return key_count(uid) - host._uid_keyrings()


_HOLDER = """
import json, sys, time
sys.path.insert(0, {repo!r})
from recipes.modules.code.host import lease_uid
spans = []
while len(spans) < 20:
    try:
        with lease_uid({base}, 1) as lease:  # one uid: the two holders must take turns
            start = time.monotonic()
            time.sleep(0.01)
            spans.append((lease.uid, start, time.monotonic()))
    except RuntimeError:  # "all 1 uids ... are in use": the other holder has it
        time.sleep(0.002)
print(json.dumps(spans))
"""


@root
def test_uid_lease_is_machine_wide_whatever_tmpdir(tmp_path):
    """Two evaluators with different TMPDIR (the PPO incident) never hold the same uid at the same time."""
    code = _HOLDER.format(repo=str(Path(__file__).resolve().parents[3]), base=63480)
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        env = dict(os.environ, TMPDIR=str(tmp_path / name), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True))
    spans = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for uid, start, end in spans[0]:
        assert not [s for s in spans[1] if s[0] == uid and s[1] < end and start < s[2]], f"uid {uid} held twice"
    assert {s[0] for s in spans[0]} == {s[0] for s in spans[1]} == {63480}
    folder = host.lock_dir()
    assert folder.stat().st_uid == 0 and folder.stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())


def test_lock_dir_refuses_a_folder_others_can_write(tmp_path, monkeypatch):
    bad = tmp_path / "locks"
    bad.mkdir(mode=0o777)
    bad.chmod(0o777)
    monkeypatch.setattr(host, "LOCK_DIRS", (str(bad),))
    with pytest.raises(RuntimeError, match="mode 0700"):
        host.lock_dir()


@isolated
@keys
def test_a_key_added_by_one_job_is_gone_for_the_next_job_on_the_same_uid():
    """Job 1 adds a secret to the uid's user keyring (@u, which outlives every process); job 2, leased the same uid,
    searches every keyring it can name and every key /proc/keys shows it: not found. Afterwards the host holds no
    key of that uid beyond its empty keyrings."""
    config = SandboxConfig(timeout_s=2.0, startup_s=20.0, uid_base=63470, uid_count=1,  # forces the same uid
                           seccomp=False)
    desc = f"rlhf-planted-{os.getpid()}"
    plant = execute(ExecutionJob(KEYS + f"def f():\n    return add_key({desc!r}, 'hunter2') > 0\n", "call", [[]],
                                 "f"), config)
    look = execute(ExecutionJob(KEYS + f"def f():\n    return find_key({desc!r})\n", "call", [[]], "f"), config)
    assert plant.all_ok and plant.units[0].value is True, plant
    assert plant.leftovers["keys"] == 1
    assert look.all_ok and look.units[0].value is False, "job 2 read job 1's key"
    assert keys_left(63470) <= 0
    seen = subprocess.run(["cat", "/proc/keys"], user=63470,
                          group=63470, extra_groups=[], capture_output=True, text=True, check=True).stdout
    assert desc not in seen and "user " not in seen  # the uid itself sees no key left, only its empty keyrings


_LITTER = KEYS + """
def litter():
    if os.fork() == 0:  # a background process in its own session (os, not subprocess: see the setuid-only test)
        os.setsid()
        os.execv("/bin/sleep", ["sleep", "60"])
    shm = _libc.shmget(0, 4096, 0o1600)  # IPC_PRIVATE | IPC_CREAT
    for name in ("/tmp/rlhf-litter", "litter"):
        open(name, "w").write("x")
    return shm >= 0 and add_key("rlhf-litter", "x") > 0
assert litter()
"""


def _run_litter(config: SandboxConfig):
    result = execute(ExecutionJob(_LITTER), config)
    assert result.all_ok, result
    uid = config.uid_base
    assert processes_of_uid(uid) == [] and sysv_objects_of(uid) == 0 and keys_left(uid) <= 0
    return result


@isolated
@keys
def test_what_a_job_leaves_behind_is_cleaned_and_reported():
    """A background process, a SysV shared memory segment and a key: inside the namespaces the first two die with
    the job (and I counts them), the key outlives it and the host's release check removes and counts it."""
    result = _run_litter(SandboxConfig(timeout_s=2.0, startup_s=20.0, uid_base=63472, uid_count=1, seccomp=False))
    assert result.leftovers == {"processes": 1, "ipc": 1, "keys": 1, "files": 0}


@root
@keys
def test_without_namespaces_the_host_check_removes_processes_ipc_keys_and_files(monkeypatch):
    """Where unshare is not allowed (setuid only) the host's release check is all that cleans up after the job."""
    import recipes.modules.code.execution as execution
    import recipes.modules.code.launch as launch

    setuid_only = dataclasses.replace(CAPS, net_ns=False, mount_ns=False, pid_ns=False)
    for module in (execution, launch):  # launch then starts a fresh interpreter per job, as such a machine would
        monkeypatch.setattr(module, "sandbox_capabilities", lambda python=None: setuid_only)
    result = _run_litter(SandboxConfig(timeout_s=2.0, startup_s=20.0, uid_base=63474, uid_count=1, seccomp=False))
    assert result.leftovers["processes"] >= 1 and result.leftovers["ipc"] == 1 and result.leftovers["keys"] == 1
    assert result.leftovers["files"] >= 1  # /tmp/litter on the host's own /tmp (the work dir goes anyway)
    assert not Path("/tmp/rlhf-litter").exists()


@isolated
def test_no_new_privs_stops_setuid_root_binaries(setuid_id):
    code = (f"import subprocess\ndef f():\n    status = open('/proc/self/status').read()\n"
            f"    nnp = [l.split()[1] for l in status.splitlines() if l.startswith('NoNewPrivs')]\n"
            f"    return nnp, subprocess.run([{setuid_id!r}, '-u'], capture_output=True, text=True).stdout.strip()\n")
    result = execute(ExecutionJob(code, "call", [[]], "f"), SandboxConfig(timeout_s=2.0, startup_s=20.0))
    assert result.all_ok, result
    nnp, euid = result.units[0].value
    assert nnp == ["1"] and euid not in ("0", "") and int(euid) >= 63000


def test_lease_outside_root_is_not_used(monkeypatch):
    """The lease needs root (it setuid's); an evaluator that is not root never reaches lock_dir()."""
    if os.geteuid() == 0:
        with lease_uid(63478, 1) as lease:
            assert lease.uid == 63478 and (host.lock_dir() / "63478.lock").read_bytes().rstrip() == b"held"
        assert (host.lock_dir() / "63478.lock").read_bytes().rstrip() == b"clean"
