"""The sandbox child side's kernel interface: libc calls through ctypes (loaded on first use) and kernel keyrings
(mounts: `modules/code/sandbox/mounts.py`, seccomp: `seccomp.py`). Standard library only, imported with
`modules/code/sandbox/harness.py` (same rules: no costly imports).
"""

import os

_libc = None  # loaded on first use: ctypes costs milliseconds of every launch


def libc_handle():
    """libc through ctypes, loaded once per process (forks inherit it)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def call(name, *args):
    """Call a libc function through ctypes; raise OSError with errno on failure."""
    args = [a.encode() if isinstance(a, str) else a for a in args]
    if getattr(libc_handle(), name)(*args) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{name}{tuple(args)}: {os.strerror(err)}")


def libc_loaded():
    """Whether libc was loaded (by a namespace or prctl call of H or I, before G was forked)."""
    return _libc is not None


# Kernel keyrings are per uid, not per namespace: without this a key one job adds is readable by the next job leased
# the same uid, and every job would share the session keyring it inherited from root.
KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_SETPERM, KEYCTL_CLEAR = 0, 1, 5, 7
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
# Possessor and owner may view, read, write, search and link, but nobody may setattr: a job cannot lock the next job
# (the same uid) out of clearing these keyrings with `keyctl setperm @u 0`.
USER_KEYRING_PERM = 0x1F1F0000
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "ppc64le": 271, "s390x": 280}
EACCES, ENOSYS, EOPNOTSUPP = 13, 38, 95


def keyctl(op, *args):
    """The keyctl(2) system call (glibc has no wrapper); returns its result, raises OSError on failure."""
    import ctypes

    number = _SYS_KEYCTL.get(os.uname().machine)
    if number is None:
        raise OSError(ENOSYS, f"keyctl: no syscall number known for {os.uname().machine}")
    syscall = libc_handle().syscall
    syscall.restype = ctypes.c_long
    result = syscall(ctypes.c_long(number), ctypes.c_long(op), *(ctypes.c_long(a) for a in args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl{(op, *args)}: {os.strerror(err)}")
    return result


def join_fresh_session_keyring():
    """Give this process (and every child it forks) a new anonymous session keyring; False if the kernel has none."""
    try:
        keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0)
    except OSError as e:
        if e.errno in (ENOSYS, EOPNOTSUPP):
            return False
        raise
    return True


def clear_user_keyrings():
    """As the sandbox uid: empty its user, user-session and persistent keyrings (all outlive a job) and take setattr
    away from the first two. Raises OSError when a keyring cannot be cleared (then the uid must not be reused)."""
    for spec in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
        try:
            keyctl(KEYCTL_SETPERM, spec, USER_KEYRING_PERM)
        except OSError as e:
            if e.errno in (ENOSYS, EOPNOTSUPP):
                return
            if e.errno != EACCES:  # EACCES: already without setattr, the state we want
                raise
        keyctl(KEYCTL_CLEAR, spec)
    try:  # linked into our session keyring, so we possess it and may clear it
        keyctl(KEYCTL_CLEAR, keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_SESSION_KEYRING))
    except OSError as e:
        if e.errno not in (ENOSYS, EOPNOTSUPP):  # a kernel without CONFIG_PERSISTENT_KEYRINGS
            raise


def count_sysv_ipc():
    """SysV shared memory segments, semaphore sets and message queues visible in this IPC namespace."""
    found = 0
    for kind in ("shm", "sem", "msg"):
        try:
            with open(f"/proc/sysvipc/{kind}", "rb") as f:
                found += max(0, len(f.read().splitlines()) - 1)
        except OSError:
            pass
    return found
