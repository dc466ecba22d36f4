"""Sandbox tests: the three run modes, the process cap (proven harmlessly first), and an adversarial suite.

Each adversarial program returns the right answer only if its exploit worked, so a "fail" verdict shows it did not.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute, execute_many
from recipes.modules.code.host import processes_of_uid, sandbox_capabilities
from recipes.modules.code.problems import CodeProblem, evaluate_completions
from tests.modules.code.test_host_hygiene import KEYS, keys_left, sysv_objects_of

CAPS = sandbox_capabilities()
isolated = pytest.mark.skipif(not CAPS.isolated, reason=f"needs root + namespaces; this machine: {CAPS.as_dict()}")
FAST = SandboxConfig(timeout_s=1.0, startup_s=20.0)
ANSWER = CodeProblem("adversarial/answer", "", "script", ("def check(candidate):\n    assert candidate() == 42\n",),
                     entry_point="answer")


def sandbox_processes() -> list[int]:
    return [pid for uid in range(FAST.uid_base, FAST.uid_base + 16) for pid in processes_of_uid(uid)]


def processes_named(comm: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                found.append(int(entry))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "fresh-interpreter"])
def test_modes_report_output_values_and_completion(fork_server):
    config = dataclasses.replace(FAST, fork_server=fork_server)
    script = execute(ExecutionJob("print('hi')"), config)
    stdio = execute(ExecutionJob("print(int(input()) * 2)\nexit()", "stdio", ["3", "5\n"]), config)
    call = execute(ExecutionJob("def f(a, b):\n    return (a + b, [a * b])", "call", [[1, 2], [3, 4]], "f"), config)
    check = execute(ExecutionJob("def f(a, b):\n    return (a + b, [a * b])", "check",
                                 ["def check(c):\n    assert c(1, 2) == (3, [2])\n"], "f"), config)
    assert script.all_ok and script.units[0].stdout == "hi\n"
    assert check.all_ok
    assert stdio.all_ok and [u.stdout for u in stdio.units] == ["6\n", "10\n"]
    assert call.all_ok and [u.value for u in call.units] == [[3, [2]], [7, [12]]]


def test_programs_see_the_standard_library_not_this_package():
    """modules/ holds files named like stdlib modules (types.py); the harness must not put it on sys.path."""
    result = execute(ExecutionJob("import types, socket, json\nprint(types.__file__)"), FAST)
    assert result.all_ok and "/modules/" not in result.units[0].stdout


def test_stop_on_error_skips_the_remaining_units():
    job = ExecutionJob("import sys\nx = int(input())\nassert x != 2\nprint(x)", "stdio", ["1", "2", "3"])
    stopped = execute(job, FAST)
    every = execute(job, dataclasses.replace(FAST, stop_on_error=False))
    assert [u.status for u in stopped.units] == ["ok", "error", "skipped"]
    assert [u.status for u in every.units] == ["ok", "error", "ok"]
    assert "AssertionError" in stopped.units[1].stderr


def test_job_without_tests_is_refused():
    with pytest.raises(ValueError, match="no test units"):
        execute(ExecutionJob("print(1)", "stdio", []), FAST)


@isolated
def test_process_count_is_capped_harmlessly():
    """200 sleeping children requested; RLIMIT_NPROC on the sandbox uid lets at most nproc - 2 be created."""
    code = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    n += 1\nprint(n)\n")
    result = execute(ExecutionJob(code, "stdio", [""]), FAST)
    assert result.all_ok and 0 < int(result.units[0].stdout) <= FAST.nproc - 2
    assert sandbox_processes() == []  # the sleepers died with the sandbox


_DETACH = """import ctypes, os, signal, sys, time
def detach(name, ignore_term):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)
            if ignore_term:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(60)
        os._exit(0)
"""


def _adversaries(tmp_path: Path, secret: str, port: int, marker: str, setuid_id: str) -> dict[str, str]:
    host_file = tmp_path / "host.txt"
    escape = f"/tmp/sandbox-escape-{marker}"
    return {
        "infinite_loop": "def answer():\n    while True:\n        pass\n",
        "sleep_past_timeout": "import time\ndef answer():\n    time.sleep(30)\n    return 42\n",
        "fork_bomb": "import os\ndef answer():\n    while True:\n        try:\n            os.fork()\n"
                     "        except OSError:\n            pass\n",
        "memory_bomb": "def answer():\n    x = [bytearray(1 << 26) for _ in range(1000)]\n    return 42\n",
        "deep_recursion": "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1) + 1\n"
                          "def answer():\n    return f(0)\n",
        "huge_stdout": "def answer():\n    while True:\n        print('x' * 65536)\n",
        "fill_disk": "def answer():\n    with open('big', 'wb') as f:\n        f.write(b'0' * (200 << 20))\n"
                     "    return 42\n",
        "many_files": "def answer():\n    for i in range(40):\n        with open(f'f{i}', 'wb') as f:\n"
                      "            f.write(b'0' * (8 << 20))\n    return 42\n",
        "ignores_sigterm": _DETACH + f"detach('{marker}t', True)\ndef answer():\n    time.sleep(30)\n",
        "detached_grandchild": _DETACH + f"detach('{marker}d', False)\ndef answer():\n    return 0\n",
        "write_outside": f"import os\ndef answer():\n    ok = 0\n    try:\n        open({escape!r}, 'w').write('x')\n"
                         "    except OSError:\n        pass\n    for act in (lambda: open("
                         f"{str(host_file)!r}, 'w').write('pwned'), lambda: os.remove({str(host_file)!r})):\n"
                         "        try:\n            act(); ok += 1\n        except OSError:\n"
                         "            pass\n    return 42 if ok else 0\n",
        "read_parent_env": f"import os\ndef answer():\n    found = {secret!r} in str(os.environ)\n"
                           "    for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['1']:\n"
                           "        try:\n            found |= "
                           f"{secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read()\n"
                           "        except OSError:\n            pass\n    print('leak' if found else 'none')\n"
                           "    return 42 if found else 0\n",
        "network": f"import socket\ndef answer():\n    for addr in (('127.0.0.1', {port}), ('1.1.1.1', 53)):\n"
                   "        try:\n            socket.create_connection(addr, timeout=0.5)\n            return 42\n"
                   "        except OSError:\n            pass\n",
        "os_exit_before_tests": "import os\nos._exit(0)\ndef answer():\n    return 0\n",
        "sys_exit_before_tests": "import sys\ndef answer():\n    return 0\nsys.exit(0)\n",
        "exit_inside_candidate": "import sys\ndef answer():\n    sys.exit(0)\n",
        "replace_builtins": "import builtins, os, sys, atexit\nbuiltins.AssertionError = SystemExit\n"
                            "builtins.exit = builtins.quit = lambda *a: None\nsys.excepthook = lambda *a: None\n"
                            "atexit.register(lambda: os._exit(0))\nos.abort = lambda: None\n"
                            "def answer():\n    return 0\n",
        "forge_completion_record": "import os\nos.write(3, b'0' * 32)\nprint('PASSED')\nos._exit(0)\n"
                                    "def answer():\n    return 0\n",
        "kill_parent": f"import os, signal\ndef answer():\n    for pid in (os.getppid(), {os.getpid()}, 1, -1):\n"
                       "        try:\n            os.kill(pid, signal.SIGKILL)\n        except OSError:\n"
                       "            pass\n    return 0\n",
        # Hygiene across jobs (docs/execution.md): a key left for a later job of the same uid, a setuid-root binary.
        "leave_key_ipc_process": KEYS + "def answer():\n    if os.fork() == 0:\n        os.setsid()\n"
                                 "        os.execv('/bin/sleep', ['sleep', '60'])\n    _libc.shmget(0, 4096, 0o1600)\n"
                                 f"    add_key('{marker}k', {secret!r})\n    return 0\n",
        "read_key_of_earlier_job": KEYS + f"def answer():\n    return 42 if find_key('{marker}k') else 0\n",
        "setuid_root_binary": "import subprocess\ndef answer():\n    out = subprocess.run("
                              f"[{setuid_id!r}, '-u'], capture_output=True, text=True).stdout.strip()\n"
                              "    return 42 if out == '0' else 0\n",
        "read_hidden_repo": f"def answer():\n    try:\n        open({str(Path(__file__).resolve())!r}).read()\n"
                            "        return 42\n    except OSError:\n        return 0\n",
    }


@isolated
def test_adversarial_programs_fail_and_leave_the_host_untouched(tmp_path, monkeypatch, setuid_copy):
    test_process_count_is_capped_harmlessly()  # never run a fork bomb before the cap is proven harmlessly
    secret, marker = f"s3cr3t-{secrets.token_hex(8)}", f"sbx{secrets.token_hex(4)}"
    monkeypatch.setenv("RLHF_TEST_SECRET", secret)
    (tmp_path / "host.txt").write_text("original")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0)
    programs = _adversaries(tmp_path, secret, listener.getsockname()[1], marker, setuid_copy[0] or '/usr/bin/id')
    assert len(programs) >= 15
    verdicts = evaluate_completions([ANSWER] * len(programs), list(programs.values()), FAST, progress=False)
    results = dict(zip(programs, verdicts))
    assert {name: v.status for name, v in results.items() if v.passed} == {}
    assert results["infinite_loop"].status == "timeout" and results["sleep_past_timeout"].status == "timeout"
    assert results["huge_stdout"].status == "output_limit"
    assert results["os_exit_before_tests"].status == "incomplete"
    assert results["forge_completion_record"].status == "error"  # fd 3 is where U reads calls: EBADF
    assert (tmp_path / "host.txt").read_text() == "original"
    assert not Path(f"/tmp/sandbox-escape-{marker}").exists()
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert processes_named(marker + "t") == [] and processes_named(marker + "d") == []
    assert sandbox_processes() == []
    uids = range(FAST.uid_base, FAST.uid_base + 16)
    assert [uid for uid in uids if sysv_objects_of(uid) or keys_left(uid) > 0] == []  # no IPC object, no key left
    assert evaluate_completions([ANSWER], ["def answer():\n    return 42\n"], FAST, progress=False)[0].passed


@isolated
def test_detach_snippet_does_outlive_an_unsandboxed_run():
    """Control for the adversarial suite: the same snippet run bare leaves a live orphan (which we then kill)."""
    marker = f"sbx{secrets.token_hex(4)}"
    subprocess.run([sys.executable, "-c", _DETACH + f"detach('{marker}', True)"], check=True, timeout=30)
    deadline = time.monotonic() + 5
    while not (pids := processes_named(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids, "the control orphan should be alive outside the sandbox"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_degraded_mode_without_namespaces_or_setuid_still_runs_and_reaps(monkeypatch):
    """What a non-root machine gets: rlimits, a session, and orphans reaped through the subreaper scan."""
    import recipes.modules.code.execution as execution

    degraded = dataclasses.replace(CAPS, setuid=False, net_ns=False, mount_ns=False, pid_ns=False)
    monkeypatch.setattr(execution, "sandbox_capabilities", lambda python=None: degraded)
    marker = f"sbx{secrets.token_hex(4)}"
    ok = execute(ExecutionJob("print(input()[::-1])", "stdio", ["abc"]), FAST)
    orphan = execute(ExecutionJob(_DETACH + f"detach('{marker}', True)\ntime.sleep(0.2)\n"), FAST)
    checked = [execute(ExecutionJob(f"def f(x):\n    return x {op} 1\n", "check",
                                    ["def check(c):\n    assert c(1) == 2\n"], "f"), FAST).all_ok for op in "+-"]
    assert ok.all_ok and ok.units[0].stdout == "cba\n"
    assert checked == [True, False]
    assert orphan.all_ok and processes_named(marker) == []


def test_execute_many_keeps_order_and_runs_in_parallel():
    jobs = [ExecutionJob(f"print({i})") for i in range(6)]
    results = execute_many(jobs, FAST, n_workers=2, progress=False)
    assert [r.units[0].stdout for r in results] == [f"{i}\n" for i in range(6)]


def test_default_hidden_folders_include_the_checkouts_parent():
    """The repository's parent (data, canonical solutions, ../shared) stays hidden wherever the sandbox code sits in
    the package: the checkout is found by walking up to pyproject.toml, not by a fixed depth below this file."""
    from recipes.modules.code import frames

    checkout = Path(__file__).resolve().parents[3]  # tests/modules/code/<this file> -> the checkout
    assert (checkout / "pyproject.toml").is_file()
    assert frames.checkout_root() == checkout
    assert str(checkout.parent) in frames._default_hidden()
