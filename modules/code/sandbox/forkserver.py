"""Fork server of the sandbox: one warm root interpreter that forks a fresh harness (H) per job.

Launched by `recipes.modules.code.launch.ForkServer` as ``python -I -S -c`` with this folder on ``sys.path``; standard
library only. Saves the ~25 ms interpreter launch and imports per job.
"""

import marshal
import os
import socket

try:
    import harness  # imported by the sandbox with this folder on sys.path (see `recipes.modules.code.launch`)
    import mounts
except ModuleNotFoundError:  # imported as part of the package (docs, import checks)
    from recipes.modules.code.sandbox import harness, mounts


def serve(sock_fd, template=None):
    """Fork server (saves the ~25 ms interpreter launch per job): per request on the SOCK_SEQPACKET ``sock_fd``, whose
    ancillary data carries (spec, stdout, stderr) descriptors, fork an H in a new session and reply with its pid and a
    pidfd. Exits when the parent closes its end. Children stay zombies until the next request so pidfds are exact.
    With ``template`` (a folder and the marshal'd allowlist, hex), build the sandbox's root once (`mounts`)."""
    harness.preload()  # ctypes, libc and common modules once, before any fork
    if template:
        path, spec = template[0], marshal.loads(bytes.fromhex(template[1]))
        try:
            mounts.build_template(path, spec["root"], range(*spec["uids"]))
        except OSError as e:  # each sandbox then builds its root itself
            os.write(2, f"sandbox fork server: no shared root ({e}); building one per sandbox\n".encode())
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 3)
        except OSError:
            return 0
        if not msg:
            return 0
        pid = os.fork()
        if pid == 0:
            sock.close()
            os.setsid()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            try:
                code = harness.main()
            except BaseException as e:
                os.write(2, f"sandbox harness: {type(e).__name__}: {e}\n".encode())
                code = 70
            os._exit(code)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(sock, [pid.to_bytes(8, "little")], [pidfd])
        os.close(pidfd)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:  # reap earlier jobs (their pidfds stay valid in the parent)
                pass
        except ChildProcessError:
            pass
