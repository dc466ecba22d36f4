"""Child side of the sandbox: imported by ``python -I -S -c`` (see `recipes.modules.code.launch`), the job spec on
stdin (marshal).

Standard library only, imported from its cached bytecode (a script would be recompiled every launch); its libc calls
and mount set-up are in `modules/code/sandbox/kernel.py`. Process tree:
H (this script, root) -> unshare(net, mount, pid) -> fork I (pid 1 of the new namespace, drops to the sandbox uid)
-> fork G per test unit (runs the untrusted program). I writes one record per unit to stdout, then
``{"end": n, "ipc": k}``.
"""

import marshal
import os
import resource
import select
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SIGKILL = 9  # not `import signal`: it pulls in enum, functools, collections (7 ms of a 25 ms launch)

if __package__:  # imported as part of the package (docs, import checks)
    from recipes.modules.code.sandbox import kernel
else:  # imported by the sandbox, with this folder on sys.path for the duration of the import
    import kernel

_libc_handle = kernel.libc_handle  # the fork server loads libc through this name once, before it forks


def _emit(record):
    """One record per line as a Python literal (the parent reads it with ast.literal_eval; json costs 13 ms here)."""
    data = (repr(record) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def _drop_privileges(spec):
    lim = spec["limits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if lim.get("nproc"):
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    kernel.join_fresh_session_keyring()  # as root: owned by root, so a job that adds no key charges its uid none
    if spec.get("uid") is not None:
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        kernel.clear_user_keyrings()  # whatever an earlier job of this uid left there (the host clears them too)
    kernel.call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # exec of a setuid-root binary gains nothing
    if spec["ns"].get("pid"):
        kernel.call("prctl", PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # H dies -> I dies -> the namespace dies
    kernel.call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)  # G (same uid) cannot ptrace I or open /proc/<I>/fd
    kernel.call("prctl", PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    sys.path.extend(spec.get("sys_path", []))
    for name in spec.get("preimport", []):
        try:
            __import__(name)
        except ImportError:
            pass


def _run_program(spec, unit_input, rec_fd):
    """Body of G: apply per-process limits, run the program, write the completion record. Never returns."""
    lim, mode, nonce = spec["limits"], spec["mode"], spec["nonce"]
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_mb"] * mb, lim["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize_mb"] * mb, lim["fsize_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    import builtins
    import io

    if kernel.libc_loaded():
        kernel.call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)  # I stays undumpable; G may read its own /proc entries
    if not hasattr(builtins, "exit"):  # `site` defines exit()/quit(), and -S skips site; solutions call them
        builtins.exit = builtins.quit = sys.exit

    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace",
                                  write_through=True)
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


def _run_unit(spec, index, unit_input):
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
    try:
        os.killpg(pid, SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, wstatus = os.waitpid(pid, 0)
    left = _kill_leftovers(spec, pid)
    for fd in (out_r, err_r, rec_r, pidfd):
        os.close(fd)
    if status is None:
        status = "exit" if os.WIFEXITED(wstatus) else "signal"
    code = os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else -os.WTERMSIG(wstatus)
    text = {fd: bytes(b[:cap]).decode("utf-8", "replace") for fd, b in bufs.items()}
    return {"i": index, "status": status, "code": code, "time": round(elapsed, 4),
            "stdout": text[out_r], "stderr": text[err_r][-4096:], "record": text[rec_r], "left": left}


def _init_main(spec):
    """Body of I: mounts (still root), drop privileges, run the units in order."""
    if spec["ns"].get("pid"):
        kernel.call("prctl", PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # again after setuid, which clears it
    if spec["ns"].get("mount"):
        kernel.setup_mounts(spec)
    else:
        os.chdir(spec["workdir"])
    _drop_privileges(spec)
    if spec["mode"] == "call":
        import json  # noqa: F401  (G serializes return values with it)
    n = len(spec["inputs"])
    for i, unit_input in enumerate(spec["inputs"]):
        record = _run_unit(spec, i, unit_input)
        _emit(record)
        if spec.get("stop_on_error") and not (record["status"] == "exit" and record["code"] == 0):
            for j in range(i + 1, n):
                _emit({"i": j, "status": "skipped", "code": None, "time": 0.0, "stdout": "", "stderr": "",
                       "record": ""})
            break
    # This IPC namespace dies with the job; count what the program left in it (the parent reports it).
    _emit({"end": n, "ipc": kernel.count_sysv_ipc() if spec["ns"].get("pid") else 0})


def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def main():
    """H: read the spec from fd 0, enter the namespaces, run I (pid 1 of the new pid namespace) and wait for it."""
    spec = marshal.loads(_read_all(0))  # written by the parent: trusted, and free to import
    ns = spec["ns"]
    flags = (CLONE_NEWNET if ns.get("net") else 0) | (CLONE_NEWNS if ns.get("mount") else 0)
    flags |= (CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS) if ns.get("pid") else 0
    if flags:
        kernel.call("unshare", flags)
    if not ns.get("pid"):
        _init_main(spec)
        return 0
    pid = os.fork()
    if pid == 0:
        try:
            _init_main(spec)
            code = 0
        except BaseException as e:  # the harness itself failed: say why on stderr, the parent reports it
            sys.stderr.write(f"sandbox harness: {type(e).__name__}: {e}\n")
            code = 70
        sys.stderr.flush()
        os._exit(code)
    _, wstatus = os.waitpid(pid, 0)
    return os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else 128 + os.WTERMSIG(wstatus)


if __name__ == "__main__":
    sys.exit(main())
