"""The sandbox child side's kernel interface: libc calls through ctypes (loaded on first use) and the mount-namespace
set-up of I. Standard library only, imported with `modules/code/sandbox/harness.py` (same rules: no costly imports).
"""

import os

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
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


def setup_mounts(spec):
    """In the new mount namespace: private propagation, fresh tmpfs over writable dirs, hide paths, new /proc."""
    call("mount", None, "/", None, MS_REC | MS_PRIVATE, None)
    size = f"size={int(spec.get('tmpfs_mb', 64))}m"
    owner = f",uid={spec['uid']},gid={spec['gid']}" if spec.get("uid") is not None else ""
    # The work dir becomes a size-capped tmpfs: the host disk never sees the program's files, however many.
    call("mount", "tmpfs", spec["workdir"], "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=700" + owner)
    os.chdir(spec["workdir"])  # keep a handle on the work dir before a tmpfs over /tmp may cover its path
    expose = [(p, os.open(p, os.O_PATH)) for p in spec.get("expose", []) if os.path.isdir(p)]
    for path in spec.get("tmpfs", []):
        if os.path.isdir(path):
            call("mount", "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=1777")
    for path in spec.get("hide", []):
        if not os.path.isdir(path):
            continue
        call("mount", "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for target, fd in expose:
            if target.startswith(path.rstrip("/") + "/"):
                os.makedirs(target, exist_ok=True)
                call("mount", f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC, None)
                call("mount", None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        call("mount", None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    for _, fd in expose:
        os.close(fd)
    if spec["ns"].get("pid"):
        call("mount", "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
