"""Out-of-process verdicts for call-based tests (HumanEval's ``check(candidate)``), both ends of the protocol.

U (the program's process, a fork of I) runs the program, then answers calls: fd 3 brings requests, fd 4 takes
replies, each a frame (4-byte big-endian length, a 1-byte tag, a body). I (which never runs program code) runs the
dataset's test program with ``candidate`` bound to a `Candidate` proxy: each call sends its arguments to U (marshal,
trusted data) and gets back plain data (`plain`, rebuilt as exact built-ins) or the name of a built-in exception,
re-raised here. So the asserts, and their ``random``, ``abs`` or ``isinstance``, never share an interpreter with the
program, and the verdict (the test returned, every call was answered) is I's alone. Standard library only.
"""

import marshal
import os
import select
import sys
import time

if __package__:  # imported as part of the package (docs, import checks)
    from recipes.modules.code.sandbox import plain
else:  # imported by the sandbox, with this folder on sys.path for the duration of the import
    import plain

CALL, READY, VALUE, RAISED, OPAQUE, ABORTED = b"C", b"R", b"V", b"E", b"U", b"X"
REQUESTS, REPLIES = 3, 4  # U's descriptors
_HEADER = 4


# ----------------------------------------------------------------------------------------------- U: the program's side
def _send(tag, body=b"", stdout=None):
    if stdout is not None:  # what the program printed so far, before I gets the reply (and may kill U)
        try:
            stdout.flush()
        except Exception:
            pass
    data = memoryview((len(body) + 1).to_bytes(_HEADER, "big") + tag + body)
    while data:
        data = data[os.write(REPLIES, data):]


def _read_exactly(n):
    chunks, left = [], n
    while left:
        chunk = os.read(REQUESTS, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _builtin_name(error):
    """The nearest built-in class of an exception (``class MyError(ValueError)`` travels as ValueError)."""
    import builtins

    for cls in type(error).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "Exception"


def _message(error):
    try:
        return str.__str__(str(error))[:1000]
    except Exception:  # a program's exception whose __str__ fails
        return ""


def serve(code, fn_name, builtins):
    """Body of U once its limits are set: run ``code`` as ``__main__``, report ready, answer calls of ``fn_name`` until
    I closes fd 3. Returns the exit code (1 when the program failed or aborted a call)."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    out = sys.stdout
    try:
        exec(compile(code, "<solution>", "exec"), namespace)
        fn = namespace[fn_name]
    except BaseException:  # SystemExit included: the program ended before its function could be tested
        import traceback  # lazily: 5 ms, and only failing programs need it

        traceback.print_exc()
        return 1
    _send(READY, b"", out)
    while (header := _read_exactly(_HEADER)) is not None:
        request = _read_exactly(int.from_bytes(header, "big"))
        if request is None or request[:1] != CALL:
            break
        args, kwargs = marshal.loads(request[1:])
        try:
            value = fn(*args, **kwargs)
        except Exception as e:
            _send(RAISED, plain.encode([_builtin_name(e), _message(e)]), out)
            continue
        except BaseException as e:  # SystemExit, KeyboardInterrupt, GeneratorExit inside the call: it fails
            _send(ABORTED, plain.encode(type(e).__name__))
            return 1
        try:
            body = plain.encode(value)
        except (TypeError, ValueError, RecursionError):
            _send(OPAQUE, plain.encode(type(value).__name__), out)
            continue
        _send(VALUE, body, out)
    return 0


# -------------------------------------------------------------------------------------------------- I: the judge's side
class Broken(BaseException):
    """A call could not be judged (timeout, output cap, U gone, a reply that is not plain data): the unit fails, whatever
    the test does. A BaseException, so a test's ``except Exception`` cannot swallow it."""


class Channel:
    """I's end of the pipes to U: requests out, replies in, U's stdout/stderr drained (capped) meanwhile, all under
    the unit's deadline. After the first failure (``failure``: status, message) every call raises `Broken`."""

    def __init__(self, out_r, err_r, reply_r, request_w, pidfd, deadline, cap):
        self.out_r, self.err_r, self.reply_r, self.request_w = out_r, err_r, reply_r, request_w
        self.pidfd, self.deadline, self.cap = pidfd, deadline, cap
        self.bufs = {out_r: bytearray(), err_r: bytearray(), reply_r: bytearray()}
        self.failure, self.exited = None, False
        os.set_blocking(request_w, False)
        self.poll = select.poll()
        for fd in (out_r, err_r, reply_r, pidfd):
            self.poll.register(fd, select.POLLIN)

    def fail(self, status, message):
        if self.failure is None:
            self.failure = (status, message)
        raise Broken(self.failure[1])

    def _frame(self):
        buf = self.bufs[self.reply_r]
        if len(buf) < _HEADER:
            return None
        n = int.from_bytes(buf[:_HEADER], "big")
        if not 1 <= n <= self.cap + 1:
            self.fail("error", f"a reply frame that claims {n} bytes")
        if len(buf) < _HEADER + n:
            return None
        frame = bytes(buf[_HEADER:_HEADER + n])
        del buf[:_HEADER + n]
        return frame[:1], frame[1:]

    def exchange(self, tag=None, body=b""):
        """Send one request (none for the ready frame) and wait for U's next frame; `Broken` when there is none."""
        if self.failure is not None:
            raise Broken(self.failure[1])
        pending = memoryview((len(body) + 1).to_bytes(_HEADER, "big") + tag + body if tag else b"")
        if pending:
            self.poll.register(self.request_w, select.POLLOUT)
        try:
            while True:
                if not pending and (frame := self._frame()) is not None:
                    return frame
                if self.exited:
                    self.fail("exit", "the program's process ended before it answered")
                remaining = self.deadline - time.monotonic()
                events = self.poll.poll(max(0.0, remaining) * 1000) if remaining > 0 else []
                if not events:
                    self.fail("timeout", "timed out")
                for fd, _ in events:
                    if fd == self.request_w:
                        try:
                            pending = pending[os.write(fd, pending):]
                        except BlockingIOError:
                            continue
                        except OSError:  # U closed its end
                            self.exited = True
                        if not pending:
                            self.poll.unregister(fd)
                    elif fd == self.pidfd:
                        self.exited = True
                    else:
                        self._read(fd)
                if self.exited:
                    self.drain()  # what U wrote before it went (its last reply among it)
        finally:
            if pending:
                self.poll.unregister(self.request_w)

    def _read(self, fd):
        chunk = os.read(fd, 65536)
        if not chunk:
            self.poll.unregister(fd)
            self.exited |= fd == self.reply_r  # no reply can come any more
            return
        buf = self.bufs[fd]
        buf += chunk
        if fd == self.err_r:
            del buf[: max(0, len(buf) - 8192)]  # keep the tail: the traceback
        elif fd == self.out_r and len(buf) > self.cap:
            self.fail("output_limit", "output limit")
        elif fd == self.reply_r and len(buf) > self.cap + _HEADER + 1:
            self.fail("output_limit", "a reply over the output limit")

    def drain(self):
        """Read what is already in the pipes, without waiting on processes that hold them."""
        for fd in (self.out_r, self.err_r, self.reply_r):
            os.set_blocking(fd, False)
            try:
                while len(self.bufs[fd]) <= self.cap + _HEADER + 1 and (chunk := os.read(fd, 65536)):
                    self.bufs[fd] += chunk
            except OSError:
                pass


class Candidate:
    """What the test calls instead of the program's function: the arguments go to U, the reply comes back as exact
    built-ins, or as the built-in exception U names. Arguments that are not marshal-able data (a function, say) fail
    the unit: nothing of the test runs in U."""

    def __init__(self, channel, name):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        channel = self._channel
        try:
            request = marshal.dumps((args, kwargs))
        except ValueError as e:
            channel.fail("error", f"the test passes {e} to {self.__name__}; only plain data reaches the program")
        try:
            tag, body = channel.exchange(CALL, request)
            value = plain.decode(body)
            error = _builtin_exception(*value) if tag == RAISED and _is_name_and_message(value) else None
        except Broken:
            raise
        except BaseException as e:  # a reply that is not plain data; or I itself failed (U may lower I's limits)
            channel.fail("error", f"a reply the judge could not read ({type(e).__name__})")
        if tag == VALUE:
            return value
        if error is not None:
            raise error
        if tag == RAISED:
            channel.fail("error", f"{self.__name__} raised {str(value)[:100]}, which names no built-in exception")
        if tag == OPAQUE and type(value) is str:
            channel.fail("error", f"{self.__name__} returned a {value[:100]}, which is not plain data")
        if tag == ABORTED and type(value) is str:
            channel.fail("error", f"{self.__name__} raised {value[:100]}")
        channel.fail("error", f"a reply the judge cannot read (tag {tag!r})")


def _is_name_and_message(value):
    return type(value) is list and len(value) == 2 and all(type(v) is str for v in value)


def _builtin_exception(name, message):
    """A new built-in exception ``name``(message), or None when ``name`` is not an Exception of ``builtins``."""
    import builtins

    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    for base in cls.__mro__:  # UnicodeDecodeError and the like take more arguments: the nearest base that takes one
        try:
            return base(message)
        except TypeError:
            continue
    return None


def _where(error):
    """``Name: message (test line N)`` without importing traceback."""
    tb, line = error.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<test>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{type(error).__name__}: {str(error)[:500]}" + (f" (test line {line})" if line else "")


def judge(test_program, fn_name, channel):
    """Run the trusted ``test_program`` (source, or code compiled by the parent) and its ``check(candidate)`` here;
    return (passed, why not). Passed means the check returned and no call broke; the test's own ``random`` is
    reseeded, so nothing U inherited predicts it."""
    import builtins
    import io

    namespace = {"__name__": "__test__", "__builtins__": builtins}
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()  # a test that prints must not write into I's record stream
    try:
        if "random" in sys.modules:  # preloaded by the fork server; a test importing it later seeds it afresh
            sys.modules["random"].seed()
        if isinstance(test_program, str):
            test_program = compile(test_program, "<test>", "exec", dont_inherit=True, optimize=0)
        exec(test_program, namespace)
        candidate = Candidate(channel, fn_name)
        namespace[fn_name] = candidate  # a test that calls the function by name (HumanEval/33) calls the program too
        if channel.exchange()[0] != READY:  # the program ran and defines the function
            channel.fail("error", "the program's process spoke before it was ready")
        namespace["check"](candidate)
    except Broken:
        pass
    except BaseException as e:  # an assert failed, or a built-in exception the program raised came through
        return False, _where(e)
    finally:
        sys.stdout, sys.stderr = saved
    if channel.failure is not None:
        return False, channel.failure[1]
    return True, ""
