"""Starting the sandbox's harness H (through the fork server or as a fresh interpreter) and exchanging bytes with it:
the environment and job frames in, capped records and diagnostics out, a SIGKILL at the deadline. Used by
`recipes.modules.code.execution`."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from recipes.modules.code import frames
from recipes.modules.code.capabilities import sandbox_capabilities

log = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("sandbox") / "harness.py"
# Import the harness (from its cached bytecode) rather than run it as a script. Its folder (the child side alone, so no
# file there is named like a standard-library module) goes *last* on sys.path and is dropped right after the import.
_IMPORT = f"import sys; sys.path.append({str(HARNESS.parent)!r}); import {{}}; del sys.path[-1]; "
_LAUNCH = _IMPORT.format("harness") + "sys.exit(harness.main())"
_SERVE = _IMPORT.format("forkserver") + "sys.exit(forkserver.serve(int(sys.argv[1]), sys.argv[2:]))"
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}


class ForkServer:
    """One long-lived root harness process that forks a fresh H per job (see
    `recipes.modules.code.sandbox.forkserver.serve`).

    Requests are serialized by a lock (a round trip is a fork, ~1 ms); the server exits when this object's socket
    closes, i.e. when this process dies. `spawn` restarts a server that died once before giving up.
    """

    _instances: dict[tuple[int, str, str, bytes | None], ForkServer] = {}
    _create_lock = threading.Lock()

    def __init__(self, python: str, launch: str, env: dict[str, str], template: bytes | None = None) -> None:
        self.python, self.launch, self.env, self.template = python, launch, env, template
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [self.python, "-I", "-S", "-c", self.launch, str(theirs.fileno())]
        if self.template is not None:  # the server builds the sandbox root once, on this (host-side empty) folder
            mountpoint = tempfile.mkdtemp(prefix="sandbox-root-", dir=frames.tmpfs_parent())
            atexit.register(shutil.rmtree, mountpoint, ignore_errors=True)
            argv += [mountpoint, self.template.hex()]
        self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, env=self.env, start_new_session=True)
        theirs.close()
        self.sock = ours

    @classmethod
    def get(cls, python: str, launch: str, env: dict[str, str], template: bytes | None = None) -> ForkServer:
        """The server of this process for ``python`` and ``template`` (`recipes.modules.code.frames.template`)."""
        key = (os.getpid(), python, launch, template)  # a forked child (a DataLoader worker) gets its own server
        with cls._create_lock:
            if key not in cls._instances:
                cls._instances[key] = cls(python, launch, env, template)
            return cls._instances[key]

    def spawn(self, spec_fd: int, out_fd: int, err_fd: int) -> tuple[int, int]:
        """Fork an H whose fds 0, 1, 2 are the given descriptors; return its pid and a pidfd (caller closes it)."""
        with self.lock:
            for attempt in range(2):
                try:
                    socket.send_fds(self.sock, [b"job"], [spec_fd, out_fd, err_fd])
                    msg, fds, _, _ = socket.recv_fds(self.sock, 16, 1)
                    if len(msg) == 8 and len(fds) == 1:
                        return int.from_bytes(msg, "little"), fds[0]
                except OSError as e:
                    log.warning("sandbox fork server failed (%s); restarting it", e)
                if attempt == 0:
                    self.close()
                    self._start()
        raise RuntimeError("sandbox: the fork server does not answer; see its stderr above")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def launch(python: str, fork_server: bool, template: bytes | None = None
           ) -> tuple[int, int, int, Callable[[], None], Callable[[], None]]:
    """Start H with a spec pipe on fd 0 and record/diagnostic pipes on fds 1, 2; return (spec_w, out_r, err_r, kill,
    reap). ``python`` runs H: through the fork server (if ``fork_server``; one per ``template``) when the pid
    namespace makes killing H enough, else a fresh interpreter."""
    spec_r, spec_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        if fork_server and sandbox_capabilities(python).pid_ns:
            _, pidfd = ForkServer.get(python, _SERVE, _ENV, template).spawn(spec_r, out_w, err_w)

            def kill() -> None:  # H dies -> I gets PDEATHSIG -> the kernel empties the pid namespace
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)

            def reap() -> None:  # the server reaps H; wait until it has exited, so its cgroup is empty
                select.select([pidfd], [], [], 2.0)
                os.close(pidfd)

            return spec_w, out_r, err_r, kill, reap
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


class Harness:
    """A started H: fd 0 the parent's stream (spec frames, written as H and I read them), fds 1 and 2 its records and
    diagnostics. ``first`` (the environment frame) is written at once, so H and I set the sandbox up before a job is
    known; `communicate` sends the job and collects the output; `close` SIGKILLs H (I dies with it) and reaps it."""

    def __init__(self, python: str, fork_server: bool, first: bytes, template: bytes | None = None) -> None:
        self.spec_w, self.out_r, self.err_r, self._kill, self._reap = launch(python, fork_server, template)
        os.set_blocking(self.spec_w, False)  # written as H and I read it (check mode's tests one unit at a time)
        self.pending = self._write(memoryview(first))
        self.closed = False

    def _write(self, view: memoryview) -> memoryview:
        try:
            return view[os.write(self.spec_w, view):]
        except BlockingIOError:
            return view
        except OSError:  # H or I ended before reading it all (stop_on_error, a crash)
            return view[:0]

    def communicate(self, payload: bytes, wall: float, cap: int, after_send: Callable[[], None] | None = None
                    ) -> tuple[bytes, bytes, bool]:
        """Send ``payload``, read records and stderr incrementally with caps until H's pipes close; SIGKILL H at the
        deadline. ``after_send`` runs once the first bytes are written (the next job's sandbox gets ready then)."""
        view = self._write(memoryview(bytes(self.pending) + payload))
        if after_send is not None:
            after_send()
        out, err, timed_out = bytearray(), bytearray(), False
        deadline = time.monotonic() + wall
        poll = select.poll()
        for fd in (self.out_r, self.err_r):
            poll.register(fd, select.POLLIN)
        if view:
            poll.register(self.spec_w, select.POLLOUT)
        open_fds = {self.out_r: out, self.err_r: err}
        while open_fds:
            events = poll.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not events:
                timed_out = True
                break
            for fd, _ in events:
                if fd == self.spec_w:
                    view = self._write(view)
                    if not view:
                        poll.unregister(fd)
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    poll.unregister(fd)
                    del open_fds[fd]
                elif len(buf := out if fd == self.out_r else err) < (cap if fd == self.out_r else 65536):
                    buf.extend(chunk)  # beyond the cap we keep reading (so the child never blocks) but drop
        self.close()
        return bytes(out), bytes(err), timed_out

    def close(self, wait_s: float = 0.0) -> bool:
        """SIGKILL and reap H; with ``wait_s``, first end the spec stream and wait that long for H to exit by itself
        (a sandbox that got no job: I reads end of file before any program ran). Returns whether H exited so."""
        if self.closed:
            return False
        self.closed = True
        exited = False
        if wait_s > 0:
            os.close(self.spec_w)
            self.spec_w = -1
            deadline = time.monotonic() + wait_s
            poll = select.poll()
            for fd in (self.out_r, self.err_r):
                poll.register(fd, select.POLLIN)
            open_fds = {self.out_r, self.err_r}
            while open_fds and (events := poll.poll(max(0.0, deadline - time.monotonic()) * 1000)):
                for fd, _ in events:
                    if not os.read(fd, 1 << 16):
                        poll.unregister(fd)
                        open_fds.discard(fd)
            exited = not open_fds
        self._kill()
        self._reap()
        for fd in (self.out_r, self.err_r, self.spec_w):
            if fd >= 0:
                os.close(fd)
        return exited
