"""Adversarial suite, containment: programs that reach past the sandbox (files outside its allowlist, writes outside
it, the host's /proc, devices, setuid binaries, user namespaces, keys, ptrace, kernel interfaces). Each attack is
first shown to be real: it wins outside any sandbox as an unprivileged uid (``outside``), or inside the sandbox with
the seccomp filter switched off (``no_seccomp``). Then it must fail in the sandbox, and the host is checked after
each. The memory attacks are in test_memory_bound.py; docs/execution.md, "Threat model for containment".
"""

from __future__ import annotations

import dataclasses
import os
import site
import sys

import pytest

from recipes.modules.code import frames
from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute
from recipes.modules.code.host import sandbox_capabilities
from recipes.modules.code.problems import evaluate_completions
from tests.modules.code.attacks import (
    SYSTEM_PYTHON,
    Bait,
    assert_host_clean,
    clear_drops,
    make_bait,
    outside,
    remove_bait,
)
from tests.modules.code.test_execution import ANSWER

CAPS = sandbox_capabilities()
CONFIG = SandboxConfig(timeout_s=4.0, startup_s=20.0)
NO_SECCOMP = dataclasses.replace(CONFIG, seccomp=False)
isolated = pytest.mark.skipif(not CAPS.isolated, reason=f"needs root + namespaces; this machine: {CAPS.as_dict()}")
filtered = pytest.mark.skipif(not CAPS.seccomp, reason="libseccomp is not usable here: no system-call filter")

LIBC = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
"""
ATTACKS = {  # name: (what answer() does, returning 42 only if it won; the control that shows it is real)
    "read_files_outside_the_allowlist": ("""
def answer():
    found = 0
    for path in {canaries!r}:
        try:
            found += 'canary' in open(path).read()
        except OSError:
            pass
    return 42 if found else 0
""", "outside"),
    "read_a_dataset_copy": ("""
import gzip
def answer():
    try:
        return 42 if b'canonical_solution' in gzip.open({dataset!r}).read() else 0
    except OSError:
        return 0
""", "outside"),
    "write_outside_the_work_dir": ("""
import os
def answer():
    made = 0
    for folder in {drops!r} + ['/tmp', '/var/tmp']:
        try:
            open(os.path.join(folder, 'rlhf-dropped-{token}'), 'w').write('x')
            made += folder not in ('/tmp', '/var/tmp')  # those two are the sandbox's own tmpfs: harmless inside
        except OSError:
            pass
    return 42 if made else 0
""", "outside"),
    "host_processes_in_proc": ("""
import os
def answer():
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if {marker!r}.encode() in open(f'/proc/{{pid}}/cmdline', 'rb').read():
                return 42
        except OSError:
            pass
    return 0
""", "outside"),
    "devices_and_sysfs": ("""
import os
def answer():
    opened = 0
    for path in ('/dev/ptmx', '/dev/tty', '/dev/kmsg', '/sys/kernel/uevent_seqnum', '/sys/fs/cgroup/memory/memory.stat',
                 '/sys/class/net/lo/address'):
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
            opened += 1
        except OSError:
            pass
    return 42 if opened else 0
""", "outside"),
    "setuid_root_binary_in_the_allowlist": ("""
import subprocess
def answer():
    return 42 if subprocess.run([{setuid!r}, '-u'], capture_output=True, text=True).stdout.strip() == '0' else 0
""", "outside"),
    "user_namespace_mounts_its_own_tmpfs": (LIBC + """
def answer():
    pid = os.fork()
    if pid == 0:  # a user namespace gives the program every capability over a mount namespace of its own
        ok = libc.unshare(0x10000000 | 0x00020000) == 0
        ok = ok and libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, b'size=2g') == 0
        os._exit(0 if ok else 1)
    return 42 if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 else 0
""", "no_seccomp"),
    "clone_into_a_user_namespace": (LIBC + """
def answer():
    pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # raw clone(CLONE_NEWUSER | SIGCHLD): not via unshare
    if pid == 0:
        os._exit(0)
    return 42 if pid > 0 and os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 else 0
""", "no_seccomp"),
    "kernel_keyring": (LIBC + """
def answer():
    return 42 if libc.syscall(248, b'user', b'rlhf-{token}', b'secret', 6, -4) > 0 else 0  # add_key into @u
""", "no_seccomp"),
    "ptrace_a_sibling": (LIBC + """
import time
def answer():
    child = os.fork()
    if child == 0:
        time.sleep(10)
        os._exit(0)
    won = libc.ptrace(16, child, 0, 0) == 0  # PTRACE_ATTACH: then read or rewrite its memory
    os.kill(child, 9)
    os.waitpid(child, 0)
    return 42 if won else 0
""", "no_seccomp"),
    "io_uring_and_kernel_interfaces": (LIBC + """
def answer():
    params = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(128)
    won = libc.syscall(425, 8, params) >= 0  # io_uring_setup: its operations bypass any system-call filter
    won |= libc.syscall(323, 0) >= 0  # userfaultfd
    won |= libc.syscall(298, attr, 0, -1, -1, 0) >= 0  # perf_event_open
    won |= libc.syscall(321, 0, attr, 48) >= 0  # bpf(BPF_MAP_CREATE)
    return 42 if won else 0
""", "no_seccomp"),
}


@pytest.fixture(scope="module")
def host_bait():
    made = make_bait()
    yield made
    remove_bait(*made)


def _program(name: str, bait: Bait, setuid: str) -> str:
    code, _ = ATTACKS[name]
    return code.format(canaries=[p for p, text in bait.canaries.items() if text], drops=bait.drops,
                       token=bait.token, marker=bait.marker, setuid=setuid,
                       dataset=next(p for p, text in bait.canaries.items() if not text))


def _wins_in(config: SandboxConfig, program: str) -> bool:
    return evaluate_completions([ANSWER], [program], config, progress=False)[0].passed


def _answer(config: SandboxConfig, program: str):
    """What ``answer()`` returned in the sandbox (call mode): 0 shows the attack ran to its end and lost."""
    result = execute(ExecutionJob(program, "call", [[]], "answer"), config)
    return result.units[0].value if result.all_ok else result.units[0].status


@isolated
@pytest.mark.parametrize("name", list(ATTACKS))
def test_containment_attack_is_real_then_fails_in_the_sandbox(name, host_bait, setuid_copy):
    (bait, _, listener), setuid = host_bait, setuid_copy[0]
    control = ATTACKS[name][1]
    if name.startswith("setuid") and setuid is None:
        pytest.skip(setuid_copy[1])
    program = _program(name, bait, setuid or "/usr/bin/id")
    if control == "outside":
        if SYSTEM_PYTHON is None:
            pytest.skip("no system python3 to run the control outside the sandbox")
        assert outside(program) == "42", f"control: {name} should win outside the sandbox as an unprivileged uid"
        clear_drops(bait)
    else:
        if not CAPS.seccomp:
            pytest.skip("libseccomp is not usable here: this attack is not stopped on this machine")
        assert _wins_in(NO_SECCOMP, program), f"control: {name} should win in the sandbox without its seccomp filter"
        assert_host_clean(bait, listener)
    assert not _wins_in(CONFIG, program), f"{name} won inside the sandbox"
    assert_host_clean(bait, listener)
    assert _answer(CONFIG, program) == 0  # it ran to its end (no crash passing for a defence) and lost
    assert_host_clean(bait, listener)


ROOT = """
import os
def f():
    mounts = [line.split() for line in open('/proc/self/mountinfo')]
    status = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return (sorted(os.listdir('/')), sorted(os.listdir('/etc')), sorted(os.listdir('/dev')),
            {m[4]: m[5] for m in mounts}, status['NoNewPrivs'].strip(), status['Seccomp'].strip(), os.getcwd())
"""


@isolated
@pytest.mark.parametrize("fork_server", [True, False], ids=["shared-root", "root-per-job"])
def test_the_root_holds_only_the_allowlist_read_only_and_nosuid(fork_server):
    """The fork server's root (built once) and a fresh interpreter's (built per job) are the same allowlist."""
    result = execute(ExecutionJob(ROOT, "call", [[]], "f"), dataclasses.replace(CONFIG, fork_server=fork_server))
    assert result.all_ok, result
    top, etc, dev, mounts, nnp, mode, cwd = result.units[0].value
    # Beyond the fixed folders, only the first component of a path to a bound folder (the interpreter's prefix, its
    # venv, the sandbox's own code: /root, /work, /check, wherever this checkout and its venv happen to be).
    bound = {os.path.realpath(p).split("/")[1] for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                           *site.getsitepackages(), str(frames.SANDBOX_CODE)}}
    fixed = {"bin", "sbin", "lib", "lib64", "lib32", "libx32", "usr", "etc", "dev", "proc", "tmp", "var", "sandbox"}
    assert set(top) <= fixed | bound, set(top) - fixed - bound
    assert "srv" not in top and "sys" not in top and "home" not in top and "mnt" not in top
    assert set(etc) <= {"group", "hosts", "ld.so.cache", "localtime", "passwd"}
    assert set(dev) == {"null", "zero", "full", "random", "urandom", "fd", "stdin", "stdout", "stderr", "shm"}
    writable = {"/tmp", "/var/tmp", "/dev/shm", "/sandbox", "/proc"} | {f"/dev/{d}" for d in
                                                                       ("null", "zero", "full", "random", "urandom")}
    for point, options in mounts.items():
        flags = options.split(",")
        assert point in writable or "ro" in flags, (point, options)
        assert point.startswith("/dev/") and point != "/dev/shm" or "nosuid" in flags, (point, options)
    assert nnp == "1" and cwd == "/sandbox"
    assert mode == ("2" if CAPS.seccomp else "0")  # 2: a filter is loaded


@isolated
def test_the_interpreter_and_child_code_are_reachable_and_stdlib_programs_run():
    code = ("import json, subprocess, sys, os, sqlite3, decimal, hashlib, ssl\n"
            f"print(os.path.isdir({str(frames.SANDBOX_CODE)!r}), subprocess.run([sys.executable, '-c', 'print(6 * 7)'],"
            " capture_output=True, text=True).stdout.strip())\n")
    result = execute(ExecutionJob(code), CONFIG)
    assert result.all_ok and result.units[0].stdout == "True 42\n", result


@isolated
def test_without_libseccomp_the_other_layers_stay_and_no_filter_is_claimed(monkeypatch):
    """A machine without libseccomp (simulated: the probe's answer): the program runs unfiltered (Seccomp 0 in its
    status), the allowlist and no_new_privs still apply, and the capability report says seccomp=False."""
    import recipes.modules.code.execution as execution

    without = dataclasses.replace(CAPS, seccomp=False)
    monkeypatch.setattr(execution, "sandbox_capabilities", lambda python=None: without)
    result = execute(ExecutionJob(ROOT, "call", [[]], "f"), CONFIG)
    assert result.all_ok, result
    top, _, _, _, nnp, mode, _ = result.units[0].value
    assert mode == "0" and nnp == "1" and "srv" not in top and without.as_dict()["seccomp"] is False


@isolated
def test_an_interpreter_in_a_venv_under_tmp_still_runs_itself_inside(tmp_path):
    """The sandbox's own /tmp is a private tmpfs; an allowed folder below a temp dir (here a venv under the host's
    /tmp, as CI makes one) is bound again over it, read-only, so the program can still run its interpreter."""
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert str(venv).startswith("/tmp/")
    code = ("import os, subprocess, sys\n"
            "print(sys.executable.startswith('/tmp/'), subprocess.run([sys.executable, '-c', 'print(6 * 7)'],"
            " capture_output=True, text=True).stdout.strip())\n"
            "open(os.path.dirname(os.path.dirname(sys.executable)) + '/x', 'w')\n")  # the venv itself
    result = execute(ExecutionJob(code), dataclasses.replace(CONFIG, python=str(venv / "bin" / "python")))
    unit = result.units[0]
    assert unit.stdout == "True 42\n", result
    assert "Read-only file system" in unit.stderr, unit.stderr  # bound read-only, like every allowed folder
