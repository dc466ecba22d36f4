"""One test unit of the sandbox, run by I: fork G (runs the program, ``script``/``stdio``/``call``) or U (runs the
program, then answers the calls of the test I runs: ``check``, see `modules/code/sandbox/calls.py`), collect its
capped output until it exits or its deadline, kill whatever it left. Standard library only (see ``harness.py``).
"""

import marshal
import os
import resource
import select
import sys
import time

PR_SET_DUMPABLE = 4
SIGKILL = 9  # not `import signal`: it pulls in enum, functools, collections (7 ms of a 25 ms launch)

if __package__:  # imported as part of the package (docs, import checks)
    from recipes.modules.code.sandbox import calls, kernel, seccomp
else:  # imported by the sandbox, with this folder on sys.path for the duration of the import
    import calls
    import kernel
    import seccomp


def read_frame(fd):
    """One frame of the parent's stream on fd 0: an 8-byte big-endian length, then that many bytes."""
    return _read_exact(fd, int.from_bytes(_read_exact(fd, 8), "big"))


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the parent's spec stream ended early")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _enter_program(spec):
    """In G or U, before any program code: per-process limits, ``exit``/``quit``, fresh std streams. Returns builtins."""
    lim = spec["limits"]
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_mb"] * mb, lim["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize_mb"] * mb, lim["fsize_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    import builtins
    import io

    if kernel.libc_loaded():
        kernel.call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)  # I stays undumpable; G may read its own /proc entries
    try:  # the cgroup's OOM killer takes the program's processes first, not I (raising it needs no privilege)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if spec["seccomp"]["on"]:  # last: the set-up above needs nothing it denies; a failure here fails the unit
        seccomp.load(seccomp.program(spec["seccomp"]["deny_memory_files"]))
    if not hasattr(builtins, "exit"):  # `site` defines exit()/quit(), and -S skips site; solutions call them
        builtins.exit = builtins.quit = sys.exit

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace",
                                  write_through=True)
    return builtins


def _run_program(spec, unit_input, rec_fd):
    """Body of G: apply per-process limits, run the program, write the completion record. Never returns."""
    mode, nonce = spec["mode"], spec["nonce"]
    builtins = _enter_program(spec)
    write, exit_now = os.write, os._exit
    stdout, stderr = sys.stdout, sys.stderr
    code = 1
    try:
        namespace = {"__name__": "solution" if mode == "call" else "__main__", "__builtins__": builtins}
        exec(compile(spec["code"], "<solution>", "exec"), namespace)
        if mode == "call":
            target = namespace.get("Solution")
            fn = getattr(target(), spec["fn_name"]) if isinstance(target, type) else namespace[spec["fn_name"]]
            import json  # imported by I already in call mode (see _init_main): free after the fork

            value = json.dumps(fn(*json.loads(unit_input)))
            write(rec_fd, (nonce + "\n" + value).encode())
        elif mode == "script":
            write(rec_fd, nonce.encode())  # reached only if every statement of the program and tests ran
        code = 0
    except SystemExit as e:
        code = 0 if mode == "stdio" and e.code in (None, 0) else 1
    except BaseException:
        import traceback  # lazily: 5 ms, and only failing programs need it

        traceback.print_exc()
    try:
        stdout.flush()
        stderr.flush()
    finally:
        exit_now(code)


def run_unit(spec, index, unit_input):
    """Fork G for one unit, collect capped stdout/stderr/record until exit or deadline, return the record."""
    cap = spec["limits"]["out_bytes"]
    (out_r, out_w), (err_r, err_w), (rec_r, rec_w) = os.pipe(), os.pipe(), os.pipe()
    stdin = os.memfd_create("stdin")
    if spec["mode"] == "stdio":
        os.write(stdin, unit_input.encode())
        os.lseek(stdin, 0, os.SEEK_SET)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.dup2(stdin, 0), os.dup2(out_w, 1), os.dup2(err_w, 2), os.dup2(rec_w, 3)
        os.closerange(4, 1 << 16)
        _run_program(spec, unit_input, 3)
    for fd in (out_w, err_w, rec_w, stdin):
        os.close(fd)
    bufs, status = {out_r: bytearray(), err_r: bytearray(), rec_r: bytearray()}, None
    pidfd = os.pidfd_open(pid)
    poll, open_fds = select.poll(), {out_r, err_r, rec_r}
    for fd in (out_r, err_r, rec_r, pidfd):
        poll.register(fd, select.POLLIN)
    deadline, exited = start + spec["timeout"], False
    while not exited and status is None:
        events = poll.poll(max(0.0, deadline - time.monotonic()) * 1000)
        if not events:
            status = "timeout"
            break
        for fd, _ in events:
            if fd == pidfd:
                exited = True
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                poll.unregister(fd)
                open_fds.discard(fd)
                continue
            bufs[fd] += chunk
            if fd == err_r:
                del bufs[err_r][: max(0, len(bufs[err_r]) - 8192)]  # keep the tail: the traceback
            elif len(bufs[fd]) > cap:
                status = "output_limit"
    elapsed = time.monotonic() - start
    for fd in (out_r, err_r, rec_r):  # drain what is already there, without waiting on orphans holding the pipes
        os.set_blocking(fd, False)
        try:
            while len(bufs[fd]) <= cap and (chunk := os.read(fd, 65536)):
                bufs[fd] += chunk
        except (BlockingIOError, OSError):
            pass
    return _finish_unit(spec, index, pid, status, elapsed, bufs, (out_r, err_r, rec_r, pidfd), cap)


def _serve_calls(spec):
    """Body of U: the program, then its calls (`calls.serve`). Never returns."""
    builtins = _enter_program(spec)
    stdout, stderr, exit_now = sys.stdout, sys.stderr, os._exit
    code = 1
    try:
        code = calls.serve(spec["code"], spec["fn_name"], builtins)
    finally:
        try:
            stdout.flush()
            stderr.flush()
        finally:
            exit_now(code)


def run_check_unit(spec, index, _):
    """Fork U (runs the program, then answers calls), then read this unit's trusted test program from fd 0 (so U,
    a copy of I's memory, never holds it: no expected output to find there) and judge U with it, here in I."""
    if spec["fn_name"] is None:
        raise ValueError("check mode needs fn_name: the function the test's check(candidate) is given")
    cap = spec["limits"]["out_bytes"]
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    (request_r, request_w), (reply_r, reply_w) = os.pipe(), os.pipe()
    stdin = os.memfd_create("stdin")
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.dup2(stdin, 0), os.dup2(out_w, 1), os.dup2(err_w, 2)
        os.dup2(request_r, calls.REQUESTS), os.dup2(reply_w, calls.REPLIES)
        os.closerange(5, 1 << 16)
        _serve_calls(spec)
    for fd in (out_w, err_w, request_r, reply_w, stdin):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    frame = read_frame(0)  # the parent's: compiled (b"c", marshal) or source (b"s")
    test_program = marshal.loads(frame[1:]) if frame[:1] == b"c" else frame[1:].decode()
    import json  # noqa: F401  (the judge decodes replies with it; after the fork, while U starts)

    channel = calls.Channel(out_r, err_r, reply_r, request_w, pidfd, start + spec["timeout"], cap)
    passed, why = calls.judge(test_program, spec["fn_name"], channel)
    elapsed = time.monotonic() - start
    os.close(request_w)  # U reads end of file and exits
    channel.drain()
    status = channel.failure[0] if channel.failure and channel.failure[0] in ("timeout", "output_limit") else None
    record = _finish_unit(spec, index, pid, status, elapsed, channel.bufs, (out_r, err_r, reply_r, pidfd), cap)
    if passed:  # the only way the nonce gets into a check unit's record: U never sees I's stdout
        record.update(status="exit", code=0, record=spec["nonce"])
    else:
        record["record"] = ""  # not what U left in its reply pipe
        if record["status"] in ("exit", "signal") and not (channel.failure and channel.failure[0] == "exit"):
            record.update(status="exit", code=1)  # U ended early: its own status (exit 0 there is "incomplete")
    if why:
        record["stderr"] = (record["stderr"] + f"\n[judge] {why}\n")[-4096:]
    return record


def _finish_unit(spec, index, pid, status, elapsed, bufs, fds, cap):
    """Kill the unit's process group and whatever it left, reap it, close ``fds``; the unit's record."""
    try:
        os.killpg(pid, SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, wstatus = os.waitpid(pid, 0)
    left = _kill_leftovers(spec, pid)
    for fd in fds:
        os.close(fd)
    if status is None:
        status = "exit" if os.WIFEXITED(wstatus) else "signal"
    code = os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else -os.WTERMSIG(wstatus)
    out_r, err_r, rec_r = fds[:3]
    text = {fd: bytes(bufs[fd][:cap]).decode("utf-8", "replace") for fd in (out_r, err_r, rec_r)}
    return {"i": index, "status": status, "code": code, "time": round(elapsed, 4),
            "stdout": text[out_r], "stderr": text[err_r][-4096:], "record": text[rec_r], "left": left}


def _kill_leftovers(spec, group):
    """Kill every process G left behind (other than I) and reap them; repeat while anything is still alive. Returns
    how many there were (every process reaped here but G itself)."""
    left = 0
    isolated = spec["ns"].get("pid") or spec.get("uid") is not None
    while True:
        if isolated:
            try:
                os.kill(-1, SIGKILL)  # every process of the sandbox uid / pid namespace except I itself
            except ProcessLookupError:
                pass
        else:  # degraded (not root): G's group, then whatever was reparented to us as subreaper
            for pid in [-group] + _children_of(os.getpid()):
                try:
                    os.kill(pid, SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            while (reaped := os.waitpid(-1, os.WNOHANG)[0]) != 0:
                left += reaped != group
        except ChildProcessError:
            return left
        time.sleep(0.001)


def _children_of(parent):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == parent:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids
