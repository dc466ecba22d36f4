"""The sandbox's filesystem: an allowlist. In I's new mount namespace, a fresh tmpfs becomes the root and receives
read-only ``nosuid,nodev`` bind mounts of what the interpreter needs (``spec["root"]``, chosen by the host in
`recipes.modules.code.frames`), a few device nodes, a new /proc, private tmpfs work and temp dirs and a minimal /etc;
then ``pivot_root`` and the old root is detached. Everything else the machine has is absent. Standard library only.
"""

import os

if __package__:  # imported as part of the package (docs, import checks)
    from recipes.modules.code.sandbox import kernel
else:  # imported by the sandbox, with this folder on sys.path for the duration of the import
    import kernel

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
LOCKED = MS_RDONLY | MS_NOSUID | MS_NODEV
DEVICES = ("null", "zero", "full", "random", "urandom")
WORKDIR = "/sandbox"  # the program's cwd inside: its own size-capped tmpfs
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
TEMPLATE = None  # in the fork server and its forks: where `build_template` built the allowlisted tree


def _mkdirs(path):
    os.makedirs(path, mode=0o755, exist_ok=True)


def _bind_readonly(source, target):
    """A non-recursive bind (submounts of ``source`` are not carried along: they show as empty folders), then the
    remount that makes it read-only, nosuid and nodev (a bind ignores those flags on its first call)."""
    kernel.call("mount", source, target, None, MS_BIND, None)
    kernel.call("mount", None, target, None, MS_REMOUNT | MS_BIND | LOCKED, None)


def _write(path, data, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _etc(new, uids, gid):
    """A minimal /etc: the loader's cache and the time zone (copied), a passwd/group naming only root and the
    sandbox uids, and a hosts file with localhost alone."""
    _mkdirs(new + "/etc")
    for name in ("ld.so.cache", "localtime"):
        path = "/etc/" + name
        if os.path.islink(path):
            os.symlink(os.readlink(path), new + path)
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                _write(new + path, f.read())
    users = b"root:x:0:0:root:/root:/usr/sbin/nologin\n"
    groups = b"root:x:0:\n"
    for uid in uids:
        users += b"sandbox:x:%d:%d:sandbox:/tmp:/usr/sbin/nologin\n" % (uid, uid if gid is None else gid)
        groups += b"sandbox:x:%d:\n" % (uid if gid is None else gid)
    _write(new + "/etc/passwd", users)
    _write(new + "/etc/group", groups)
    _write(new + "/etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")


def _dev(new):
    """/dev: the harmless character devices (bound from the host; a device node cannot be setuid) and the usual
    /proc/self/fd links; /dev/shm gets its tmpfs per job."""
    _mkdirs(new + "/dev/shm")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            _write(new + "/dev/" + name, b"", 0o666)
            kernel.call("mount", "/dev/" + name, new + "/dev/" + name, None, MS_BIND, None)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, new + "/dev/" + name)


def _pivot(new):
    """Make ``new`` the root and detach the old one (``pivot_root(".", ".")``: no folder for the old root needed).
    Where the kernel refuses (a root on rootfs), chroot: then the old mounts stay in the namespace, unreachable to a
    process without CAP_SYS_CHROOT (seccomp keeps it from making a user namespace to get one)."""
    os.chdir(new)
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is not None and kernel.libc_handle().syscall(number, b".", b".") == 0:
        kernel.call("umount2", ".", MNT_DETACH)
        os.chdir("/")
        return "pivot_root"
    os.chroot(".")
    os.chdir("/")
    return "chroot"


def _build(new, root, uids, gid):
    """The allowlisted tree on ``new`` (an empty folder), ending read-only: a tmpfs, the read-only binds, the hidden
    folders, the links, /etc, /dev, and empty mount points for the per-job tmpfs and /proc."""
    kernel.call("mount", "tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=755")
    # Parents before children: a hidden folder inside a bound tree is covered, then what lies below it is bound again.
    hidden = []
    for kind, path in sorted(root["binds"] + root["hide"], key=lambda op: (op[1].count("/"), op[1])):
        target = new + path
        if kind == "bind" and os.path.isdir(path):
            _mkdirs(target)
            _bind_readonly(path, target)
        elif kind == "hide" and os.path.isdir(target):
            kernel.call("mount", "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "size=16k,mode=755")
            hidden.append(target)
    for target in hidden:  # read-only once what lies below them is bound
        kernel.call("mount", None, target, None, MS_REMOUNT | LOCKED, None)
    for link, target in root["links"]:
        if not os.path.lexists(new + link):
            os.symlink(target, new + link)
    _etc(new, uids, gid)
    _dev(new)
    for path in ("/tmp", "/var/tmp", WORKDIR, "/proc"):
        _mkdirs(new + path)
    kernel.call("mount", None, new, None, MS_REMOUNT | MS_BIND | LOCKED, None)


def build_template(path, root, uids):
    """In the fork server (root), once: enter a mount namespace of its own and build the allowlisted tree on
    ``path``; each sandbox's namespace (a copy of this one) then only adds its tmpfs and /proc (`setup_root`)."""
    global TEMPLATE
    kernel.call("unshare", CLONE_NEWNS)
    kernel.call("mount", None, "/", None, MS_REC | MS_PRIVATE, None)
    _build(path, root, uids, None)
    TEMPLATE = path


def setup_root(spec):
    """In I (root, its own mount namespace): the allowlisted root (the fork server's `TEMPLATE` if it built one,
    else built now on ``spec["workdir"]``, an empty host folder used only as a mount point), the job's own tmpfs
    (work dir, /tmp, /var/tmp, /dev/shm) and /proc, then pivot into it with the cwd in `WORKDIR`. Returns how the
    root was entered."""
    if TEMPLATE is not None:  # the copy of the fork server's namespace: already private
        new = TEMPLATE
    else:
        kernel.call("mount", None, "/", None, MS_REC | MS_PRIVATE, None)
        new = spec["workdir"]
        _build(new, spec["root"], [] if spec.get("uid") is None else [spec["uid"]], spec.get("gid"))
    size = f"size={int(spec.get('tmpfs_mb', 64))}m"
    owner = f",uid={spec['uid']},gid={spec['gid']}" if spec.get("uid") is not None else ""
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        kernel.call("mount", "tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=1777")
    for _, path in spec["root"]["binds"]:  # an allowed folder inside a temp dir (a venv in /tmp): bound over its tmpfs
        if any(path.startswith(tmp + "/") for tmp in ("/tmp", "/var/tmp", "/dev/shm")) and os.path.isdir(path):
            _mkdirs(new + path)
            _bind_readonly(path, new + path)
    # The work dir is a size-capped tmpfs: the host disk never sees the program's files, however many.
    kernel.call("mount", "tmpfs", new + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=700" + owner)
    if spec["ns"].get("pid"):
        kernel.call("mount", "proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    how = _pivot(new)
    os.chdir(WORKDIR)
    return how
