"""What the parent writes on the fd 0 of the sandbox's harness H: the environment frame (namespaces, mounts, the uid,
limits: all H and I need to set a sandbox up before its job is known), then the job frame and, in check mode, one
frame per unit with its trusted test program (compiled once per text). Used by `recipes.modules.code.execution`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import marshal
import os
import site
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from recipes.modules.code.host import SandboxCapabilities

TMPFS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable on a stock Linux: each gets a fresh tmpfs
PREIMPORT = ("math", "collections", "itertools", "functools", "heapq", "bisect", "re", "string", "typing",
             "fractions", "decimal", "random", "statistics", "copy", "operator", "array", "datetime", "io",
             "traceback")  # only imported up front when /root (the interpreter) is unreadable to the sandbox uid


def checkout_root() -> Path | None:
    """The source checkout this file runs from (the nearest folder above it with a ``pyproject.toml``), or None for an
    installed copy. Found by walking up, so moving this file within the package cannot change the answer."""
    return next((p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()), None)


@functools.cache
def _default_hidden() -> tuple[str, ...]:
    """Home folders and the folder holding this repository's checkout (problem files, canonical solutions, tests,
    ``../shared/data``); an installed copy hides the home folders only (name more in ``hidden_paths``)."""
    root = checkout_root()
    candidates = ["/root", "/home"] + ([str(root.parent)] if root is not None else [])
    return tuple(p for p in candidates if p != "/" and os.path.isdir(p))


@functools.cache
def _interpreter_paths(python: str) -> tuple[list[str], list[str]]:
    """Folders the sandboxed interpreter must still see (its prefix, and its venv when ``python`` lies in one) and
    its site-packages (``-S`` skips site)."""
    venv = Path(os.path.abspath(python)).parents[1]  # <venv>/bin/python, before following the link to the base
    prefixes = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(python).resolve().parents[1]),
                       *([str(venv)] if (venv / "pyvenv.cfg").is_file() else [])})
    return prefixes, [p for p in site.getsitepackages() if os.path.isdir(p)]


SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")  # bound read-only, or linked
SANDBOX_CODE = Path(__file__).resolve().with_name("sandbox")  # the child side: visible inside, read-only


@functools.cache
def _shared_lib_dirs(python: str) -> tuple[str, ...]:
    """Folders of the shared libraries the interpreter links (``ldd``; none found if it is missing)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ldd", os.path.realpath(python)], capture_output=True, text=True, timeout=30).stdout
        return tuple(sorted({os.path.dirname(os.path.realpath(w)) for w in out.split() if w.startswith("/")}))
    return ()


def _covered(path: str, by: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in by)


@functools.cache
def root_allowlist(python: str, hidden: tuple[str, ...]) -> dict[str, list]:
    """What the sandbox's root holds (`recipes.modules.code.sandbox.mounts.setup_root`): read-only binds of the
    interpreter's prefixes, its site-packages, the folders of its shared libraries, the child side's code and the
    system folders (``/usr``, ``/lib*``; the ones that are symlinks, as on merged-/usr systems, become the same
    symlinks); ``hidden`` folders that lie inside a bound tree are covered by an empty tmpfs. Nothing else."""
    prefixes, site_dirs = _interpreter_paths(python)
    wanted = [p for p in SYSTEM_PATHS if os.path.isdir(p) and not os.path.islink(p)]
    wanted += prefixes + site_dirs + list(_shared_lib_dirs(python)) + [str(SANDBOX_CODE)]
    binds: list[str] = []
    for path in sorted({os.path.realpath(p) for p in wanted if os.path.isdir(p)}, key=len):
        if path != "/" and not _covered(path, binds):
            binds.append(path)
    links = [(p, os.readlink(p)) for p in SYSTEM_PATHS if os.path.islink(p)]
    hide = [p for p in map(os.path.realpath, hidden) if _covered(p, binds)]
    return {"binds": [("bind", p) for p in binds], "hide": [("hide", p) for p in hide], "links": links}


@functools.cache
def tmpfs_parent() -> str | None:
    """Where work dirs go when the sandbox mounts its own tmpfs on them (the host dir stays an empty mount point): a
    host tmpfs if there is one, since mkdir + rmdir on a disk mounted with ``discard`` cost ~4 ms per job here."""
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        tmpfs = {fields[1] for fields in map(str.split, f) if len(fields) > 2 and fields[2] == "tmpfs"}
        return next((d for d in ("/dev/shm", "/run") if d in tmpfs and os.access(d, os.W_OK)), None)
    return None


def template(config: Any) -> bytes:
    """What the fork server builds the sandbox root from, once (`recipes.modules.code.sandbox.mounts.build_template`):
    the allowlist and the uids whose /etc/passwd lines it holds. Fork servers are kept per distinct template."""
    return marshal.dumps({"root": _root_of(config), "uids": (config.uid_base, config.uid_base + config.uid_count)})


def _root_of(config: Any) -> dict[str, list]:
    hidden = _default_hidden() if config.hidden_paths is None else config.hidden_paths
    return root_allowlist(config.python, tuple(hidden))


def environment(config: Any, caps: SandboxCapabilities, uid: int | None, workdir: str, memory_bound: str,
                cgroup_join: list[tuple[str, str]]) -> dict[str, Any]:
    """What H and I need to set a sandbox up (namespaces, mounts, the uid, limits, the cgroup H joins, the seccomp
    filter) under ``config`` (a `recipes.modules.code.execution.SandboxConfig`, not imported here: it imports this
    module): all but the job."""
    _, site_dirs = _interpreter_paths(config.python)
    return {
        "timeout": config.timeout_s, "stop_on_error": config.stop_on_error, "workdir": workdir,
        "uid": uid, "gid": uid,
        "ns": {"net": caps.net_ns, "mount": caps.mount_ns, "pid": caps.pid_ns},
        "limits": {"memory_mb": config.memory_mb, "cpu_s": int(config.timeout_s) + 1, "fsize_mb": config.fsize_mb,
                   "nproc": config.nproc if uid is not None else 0, "nofile": config.nofile,
                   "out_bytes": config.out_bytes},
        "tmpfs_mb": config.tmpfs_mb,
        "root": _root_of(config),
        "preimport": list(PREIMPORT) if uid is not None and not caps.mount_ns else [],
        "sys_path": site_dirs,
        "cgroup_join": list(cgroup_join), "memory_bound": memory_bound,
        "seccomp": {"on": bool(config.seccomp and caps.seccomp), "deny_memory_files": memory_bound == "seccomp"},
    }


def _job_spec(job: Any, nonce: str) -> dict[str, Any]:
    inputs = [json.dumps(list(x)) if job.mode == "call" else None if job.mode == "check" else x for x in job.inputs]
    return {"mode": job.mode, "code": job.code, "inputs": inputs, "fn_name": job.fn_name, "nonce": nonce}


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def job_frames(job: Any, nonce: str, python: str) -> bytes:
    """What I reads on fd 0 once the sandbox is set up: the job (an `ExecutionJob`), then (check mode) each unit's test
    program, which I reads only after it forked the program's process, so that process never has the tests (expected
    outputs) in its memory. A test goes compiled (marshal) when the sandbox runs this interpreter, else as source."""
    spec = _job_spec(job, nonce)
    if job.mode != "check":
        return frame(marshal.dumps(spec))
    same = os.path.realpath(python) == os.path.realpath(sys.executable)
    tests = []
    for test in map(str, job.inputs):
        code = _compiled(test) if same else None
        tests.append(b"c" + marshal.dumps(code) if code is not None else b"s" + test.encode())
    return b"".join(map(frame, [marshal.dumps(spec), *tests]))


@functools.lru_cache(maxsize=2048)
def _compiled(test: str) -> Any:
    """A trusted test program's code, compiled once per text (rollouts judge the same problems again and again), or
    None if it does not compile (I then reports the error for the unit). ``optimize=0`` keeps its asserts whatever
    ``-O`` this process runs with."""
    with PARSE_LOCK, contextlib.suppress(SyntaxError, ValueError):
        return compile(test, "<test>", "exec", dont_inherit=True, optimize=0)
    return None


PARSE_LOCK = threading.Lock()  # CPython 3.11's ast.parse is not thread-safe (gh-106905: "AST constructor recursion
# depth mismatch" SystemError when execute_many's workers parse records at the same time)
