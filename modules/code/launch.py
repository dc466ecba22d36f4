"""Starting the sandbox's harness H (through the fork server or as a fresh interpreter) and exchanging bytes with it:
the job spec in, capped records and diagnostics out, a SIGKILL at the deadline. Used by
`recipes.modules.code.execution`."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from recipes.modules.code.host import ForkServer, sandbox_capabilities

HARNESS = Path(__file__).with_name("sandbox") / "harness.py"
# Import the harness (from its cached bytecode) rather than run it as a script. Its folder (the child side alone, so no
# file there is named like a standard-library module) goes *last* on sys.path and is dropped right after the import.
_IMPORT = f"import sys; sys.path.append({str(HARNESS.parent)!r}); import {{}}; del sys.path[-1]; "
_LAUNCH = _IMPORT.format("harness") + "sys.exit(harness.main())"
_SERVE = _IMPORT.format("forkserver") + "sys.exit(forkserver.serve(int(sys.argv[1])))"
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}


def launch(python: str, fork_server: bool) -> tuple[int, int, int, Callable[[], None], Callable[[], None]]:
    """Start H with a spec pipe on fd 0 and record/diagnostic pipes on fds 1, 2; return (spec_w, out_r, err_r, kill,
    reap). ``python`` runs H: through the fork server (if ``fork_server``) when the pid namespace makes killing H
    enough, else a fresh interpreter."""
    spec_r, spec_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        if fork_server and sandbox_capabilities(python).pid_ns:
            _, pidfd = ForkServer.get(python, _SERVE, _ENV).spawn(spec_r, out_w, err_w)

            def kill() -> None:  # H dies -> I gets PDEATHSIG -> the kernel empties the pid namespace
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)

            return spec_w, out_r, err_r, kill, lambda: os.close(pidfd)
        proc = subprocess.Popen([python, "-I", "-S", "-c", _LAUNCH], stdin=spec_r, stdout=out_w, stderr=err_w,
                                env=_ENV, start_new_session=True)

        def killpg() -> None:  # before wait(): the group id cannot have been reused yet
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        return spec_w, out_r, err_r, killpg, proc.wait
    except BaseException:
        for fd in (spec_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (spec_r, out_w, err_w):
            os.close(fd)


def communicate(python: str, fork_server: bool, payload: bytes, wall: float, cap: int) -> tuple[bytes, bytes, bool]:
    """Send the spec, read records and stderr incrementally with caps; SIGKILL H at the deadline."""
    spec_w, out_r, err_r, kill, reap = launch(python, fork_server)
    with contextlib.suppress(BrokenPipeError):
        view = memoryview(payload)
        while view:
            view = view[os.write(spec_w, view):]
    os.close(spec_w)
    out, err, timed_out = bytearray(), bytearray(), False
    deadline = time.monotonic() + wall
    poll = select.poll()
    for fd in (out_r, err_r):
        poll.register(fd, select.POLLIN)
    open_fds = {out_r: out, err_r: err}
    while open_fds:
        events = poll.poll(max(0.0, deadline - time.monotonic()) * 1000)
        if not events:
            timed_out = True
            break
        for fd, _ in events:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poll.unregister(fd)
                del open_fds[fd]
            elif len(buf := out if fd == out_r else err) < (cap if fd == out_r else 65536):
                buf.extend(chunk)  # beyond the cap we keep reading (so the child never blocks) but drop
    kill()
    reap()
    os.close(out_r)
    os.close(err_r)
    return bytes(out), bytes(err), timed_out
