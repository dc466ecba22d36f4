"""Child side of the sandbox: imported by ``python -I -S -c`` (see `recipes.modules.code.launch`), the job spec on
stdin (marshal).

Standard library only, imported from its cached bytecode (a script would be recompiled every launch); its libc calls
are in `modules/code/sandbox/kernel.py`, the mounts in `mounts.py`, one unit's process in `units.py`. Process tree:
H (this script, root; joins the job's cgroup) -> unshare(net, mount, pid) -> fork I (pid 1 of the new namespace:
pivots into the allowlisted root, drops to the sandbox uid) -> fork G per test unit (runs the untrusted program) or,
in check mode, U (runs the program and answers the calls of the test that I runs: `calls.py`). G and U load the
seccomp filter (`seccomp.py`) last; I never does. I writes one record per unit to stdout, then
``{"end": n, "ipc": k}``.
"""

import marshal
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SIGKILL = 9  # not `import signal`: it pulls in enum, functools, collections (7 ms of a 25 ms launch)

if __package__:  # imported as part of the package (docs, import checks)
    from recipes.modules.code.sandbox import kernel, mounts, seccomp, units
else:  # imported by the sandbox, with this folder on sys.path for the duration of the import
    import kernel
    import mounts
    import seccomp
    import units


# What the fork server imports once, before it forks any H: json (I decodes check mode's replies with it, G's call mode
# writes values with it), traceback (printed by every failing program), and what HumanEval's prompts and tests and
# APPS's header import. Forks then find them in sys.modules; `random` reseeds itself in every child.
PRELOAD = ("json", "traceback", "typing", "random", "math", "string", "copy", "collections", "itertools", "functools",
           "heapq", "bisect", "re")


def preload():
    """Load libc (through ctypes) and `PRELOAD`, then freeze the heap: the forks' garbage collections skip these
    objects, so they do not copy their pages."""
    kernel.libc_handle()
    if seccomp.available() is not None:  # both filter variants, compiled once for every sandbox
        seccomp.program(True)
        seccomp.program(False)
    for name in PRELOAD:
        __import__(name)
    import gc

    gc.freeze()


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
    if spec["seccomp"]["on"]:
        seccomp.program(spec["seccomp"]["deny_memory_files"])  # compiled here (if not already): G and U only load it
    sys.path.extend(spec.get("sys_path", []))
    for name in spec.get("preimport", []):
        try:
            __import__(name)
        except ImportError:
            pass


def _init_main(env):
    """Body of I: mounts (still root), drop privileges, then wait for the job (the parent may set a sandbox up before
    it has one) and run its units in order."""
    if env["ns"].get("pid"):
        kernel.call("prctl", PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # again after setuid, which clears it
    if env["ns"].get("mount"):
        mounts.setup_root(env)
    else:
        os.chdir(env["workdir"])
    _drop_privileges(env)
    spec = env | marshal.loads(units.read_frame(0))  # the job: mode, code, inputs, fn_name, nonce
    if spec["mode"] == "call":
        import json  # noqa: F401  (G serializes return values with it)
    n = len(spec["inputs"])
    run = units.run_check_unit if spec["mode"] == "check" else units.run_unit
    for i, unit_input in enumerate(spec["inputs"]):
        record = run(spec, i, unit_input)
        _emit(record)
        if spec.get("stop_on_error") and not (record["status"] == "exit" and record["code"] == 0):
            for j in range(i + 1, n):
                _emit({"i": j, "status": "skipped", "code": None, "time": 0.0, "stdout": "", "stderr": "",
                       "record": ""})
            break
    # This IPC namespace dies with the job; count what the program left in it (the parent reports it).
    _emit({"end": n, "ipc": kernel.count_sysv_ipc() if spec["ns"].get("pid") else 0})


def main():
    """H: read the environment from fd 0, enter the namespaces, run I (pid 1 of the new pid namespace), wait for it."""
    spec = marshal.loads(units.read_frame(0))  # written by the parent: trusted; the job and check mode's tests follow
    for path, value in spec.get("cgroup_join", []):  # before any fork: I and all it starts are in the job's cgroup
        with open(path, "w") as f:
            f.write(value or str(os.getpid()))
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
