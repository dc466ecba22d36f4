"""The sandbox's system-call filter: the system libseccomp through ctypes (no BPF written here). G and U load it after
their own set-up and before any program code; I, the trusted judge, stays unfiltered. Denied calls fail with EPERM
(``clone3`` with ENOSYS, so the C library falls back to ``clone``, whose namespace flags are checked). Standard
library only; where libseccomp is missing, `available` says so and the other layers stay (nothing is claimed).
"""

import ctypes
import os

EPERM, ENOSYS = 1, 38
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
_ACT_ERRNO = 0x00050000
# Kernel attack surface, and what undoes the other layers: namespaces (a user namespace gives a program its own
# capabilities: mounts, its own tmpfs), mounts, keys, tracing, kernel modules, BPF, io_uring (its operations bypass
# this filter), handles that reopen files outside the root.
DENIED = ("unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
          "fsopen", "fsmount", "fsconfig", "fspick", "keyctl", "add_key", "request_key", "ptrace",
          "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "bpf", "perf_event_open", "userfaultfd",
          "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at",
          "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "swapon", "swapoff",
          "reboot", "acct", "quotactl", "syslog", "iopl", "ioperm", "lookup_dcookie")
# Where no cgroup bounds the sandbox's memory: the memory that is not address space (RLIMIT_AS) of any process.
DENIED_WITHOUT_CGROUP = ("memfd_create", "memfd_secret", "shmget")
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME: clone() with any of them is refused.
CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
_lib = _libc = None
_programs = {}


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def available():
    """libseccomp loaded (once per process: the fork server does it before forking anything), or None."""
    global _lib
    if _lib is None:
        for name in ("libseccomp.so.2", "libseccomp.so"):
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError:
                continue
            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_init.argtypes = [ctypes.c_uint32]
            lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                   ctypes.POINTER(_ArgCmp)]
            lib.seccomp_load.argtypes = [ctypes.c_void_p]
            lib.seccomp_release.argtypes = [ctypes.c_void_p]
            lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
            lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
            _lib = lib
            break
    return _lib


def _rule(lib, ctx, action, name, *cmps):
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # __NR_SCMP_ERROR: no such call on this architecture (e.g. iopl on aarch64)
        return False
    array = (_ArgCmp * len(cmps))(*[_ArgCmp(*c) for c in cmps]) if cmps else None
    rc = lib.seccomp_rule_add_array(ctypes.c_void_p(ctx), action, number, len(cmps), array)
    if rc < 0 and rc != -17:  # -EEXIST: the same rule twice
        raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
    return rc == 0


def program(deny_memory_files):
    """The filter as libseccomp compiles it (classic BPF, ``seccomp_export_bpf``), once per process and variant: the
    fork server compiles both before it forks anything, so G and U only hand it to the kernel (`load`)."""
    key = bool(deny_memory_files)
    if key in _programs:
        return _programs[key]
    lib = available()
    if lib is None:
        raise OSError(ENOSYS, "libseccomp is not installed")
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(ENOSYS, "seccomp_init failed")
    try:
        eperm = _ACT_ERRNO | EPERM
        for name in DENIED + (DENIED_WITHOUT_CGROUP if key else ()):
            _rule(lib, ctx, eperm, name)
        _rule(lib, ctx, _ACT_ERRNO | ENOSYS, "clone3")  # its flags are in memory: they cannot be checked
        for flag in CLONE_NAMESPACES:
            _rule(lib, ctx, eperm, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        read, write = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctypes.c_void_p(ctx), write)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            os.close(write)
            write = -1
            chunks = []
            while chunk := os.read(read, 65536):
                chunks.append(chunk)
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)
    finally:
        lib.seccomp_release(ctypes.c_void_p(ctx))
    _programs[key] = b"".join(chunks)
    return _programs[key]


class _Prog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def load(bpf):
    """Install ``bpf`` (from `program`) in this process and everything it will start: seccomp(SET_MODE_FILTER) via
    prctl. Needs PR_SET_NO_NEW_PRIVS (set by I) or root; raises OSError if the kernel refuses it."""
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    global _libc
    prog = _Prog(len(bpf) // 8, bpf)  # 8 bytes per sock_filter instruction
    libc = _libc = _libc or ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


def selftest():
    """In a throw-away child (the host's capability probe): load the filter and check that unshare is refused."""
    PR_SET_NO_NEW_PRIVS = 38
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    load(program(True))
    return libc.unshare(0x04000000) != 0 and ctypes.get_errno() == EPERM  # CLONE_NEWUTS
