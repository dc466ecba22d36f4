"""Adversarial suite, verdict forging: programs written to win HumanEval-style tests without solving them.

Each attack is shown to work where the asserts share the program's interpreter (the in-process harness, run here as
``script`` mode inside the sandbox), then must fail in ``check`` mode (the asserts in I, the program in U), and the
host is checked after each. See docs/execution.md, "Threat model for the verdict".
"""

from __future__ import annotations

import secrets
import textwrap

import pytest

from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute
from recipes.modules.code.host import sandbox_capabilities
from recipes.modules.code.problems import CodeProblem, evaluate_completions
from tests.modules.code.test_execution import sandbox_processes
from tests.modules.code.test_host_hygiene import keys_left, sysv_objects_of

CAPS = sandbox_capabilities()
CONFIG = SandboxConfig(timeout_s=4.0, startup_s=20.0)
SECRET = secrets.token_hex(16)


def problem(name: str, prompt: str, test: str) -> CodeProblem:
    return CodeProblem(f"forging/{name}", prompt, "script", (textwrap.dedent(test),), prefix=prompt, entry_point=name)


ADD = problem("add", 'def add(x: int, y: int) -> int:\n    """Add two numbers x and y."""\n', """
    import random


    def check(candidate):
        assert candidate(0, 1) == 1
        assert candidate(2, 3) == 5
        assert candidate(5, 7) == 12
        for _ in range(20):
            x, y = random.randint(0, 1000), random.randint(0, 1000)
            assert candidate(x, y) == x + y
""")
FLIP = problem("flip_case", 'def flip_case(string: str) -> str:\n    """Swap the case of each letter."""\n', """
    def check(candidate):
        assert candidate('') == ''
        assert candidate('Hello!') == 'hELLO!'
""")
SORT = problem("sort_desc", 'def sort_desc(xs: list) -> list:\n    """Sort descending."""\n', """
    def check(candidate):
        assert candidate([1, 3, 2]) == [3, 2, 1]
        assert candidate([]) == []
""")
SORTED = problem("is_sorted", 'def is_sorted(xs: list) -> bool:\n    """Whether xs is ascending."""\n', """
    def check(candidate):
        assert candidate([1, 2, 3]) == True
        assert candidate([3, 1]) == False
""")
TRUNCATE = problem("truncate", 'def truncate(number: float) -> float:\n    """The decimal part."""\n', """
    def check(candidate):
        assert abs(candidate(3.5) - 0.5) < 1e-6
        assert round(candidate(123.456), 3) == round(0.456, 3)
        assert isinstance(candidate(2.0), float)
""")
STRAIGHT = problem("answer", 'def answer() -> int:\n    """The answer."""\n', """
    def check(candidate):
        assert candidate() == 42
        assert candidate() == 42
        assert True
""")
POLY = problem("find_zero", 'def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n\n'
               'def find_zero(xs: list) -> float:\n    """A zero of the polynomial xs."""\n', """
    def check(candidate):
        for xs in ([1, 2], [-6, 11, -6, 1]):
            assert abs(poly(xs, candidate(xs))) < 1e-4
""")
DRAW = problem("draw", 'def draw() -> float:\n    """The test\'s next random number."""\n', """
    import random


    def check(candidate):
        for _ in range(5):
            assert candidate() == random.random()
""")
HIDDEN = problem("secret", 'def secret() -> str:\n    """Guess."""\n', f"""
    SECRET = {SECRET!r}


    def check(candidate):
        assert candidate() == SECRET[::-1]
""")

def completion(body: str, *after: str) -> str:
    """A completion: the function's ``body`` (indented here), then the module-level code blocks ``after`` it."""
    blocks = [textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")]
    return "\n\n\n".join(blocks + [textwrap.dedent(block).strip("\n") for block in after]) + "\n"


def always_equal(base: str) -> str:
    return f"""
        class Yes({base}):
            def __eq__(self, other):
                return True

            def __ne__(self, other):
                return False

            __hash__ = {base or "object"}.__hash__
    """


# Finds the harness's completion record (the nonce, the record fd) by walking frames and gc.
FIND_RECORD = """
    import gc, os, sys

    def _nonces():
        found, frame = [], sys._getframe()
        while frame is not None:
            found += [v for k, v in frame.f_locals.items() if k == "nonce"]
            found += [v.get("nonce") for v in frame.f_locals.values() if isinstance(v, dict)]
            frame = frame.f_back
        found += [o.get("nonce") for o in gc.get_objects() if isinstance(o, dict) and "nonce" in o]
        return {n for n in found if isinstance(n, str) and len(n) == 32}
"""
SCAN_MEMORY = """
    import re
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[v" in line:
                continue
            start, end = (int(a, 16) for a in span.split("-"))
            try:
                mem.seek(start)
                block = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            for found in re.finditer(rb"SECRET = '([0-9a-f]{32})'", block):
                return found.group(1).decode()[::-1]
    return ""
"""
ATTACK_THE_JUDGE = """
    import ctypes, os, signal
    libc = ctypes.CDLL(None)
    for act in (lambda: open("/proc/1/mem", "r+b"), lambda: os.kill(1, 9), lambda: os.kill(1, signal.SIGSTOP),
                lambda: libc.ptrace(16, 1, 0, 0), lambda: open("/proc/1/fd/1", "w").write("forged")):
        try:
            act()
        except Exception:
            pass
    return 0
"""

ATTACKS = {  # name: (problem, completion, wins where the asserts share the program's interpreter)
    "int_subclass_always_equal": (ADD, completion("return Yes(0)", always_equal("int")), True),
    "str_subclass_always_equal": (FLIP, completion("return Yes('')", always_equal("str")), True),
    "list_subclass_always_equal": (SORT, completion("return Yes()", always_equal("list")), True),
    "object_always_equal": (SORTED, completion("return Yes()", always_equal("")), True),
    "bool_trick_eq_returns_truthy": (SORTED, completion("return Trick()", """
        class Truthy:
            def __bool__(self):
                return True


        class Trick:
            def __eq__(self, other):
                return Truthy()
    """), True),
    "int_subclass_with_bool_trick": (SORTED, completion("return Yes(7)", always_equal("int"), """
        Yes.__bool__ = lambda self: True
    """), True),
    "frame_and_gc_walk_to_the_record": (STRAIGHT, completion("return 0", FIND_RECORD, """
        for nonce in _nonces():
            for fd in range(3, 256):
                try:
                    os.write(fd, nonce.encode())
                except OSError:
                    pass
            print(nonce)
        os._exit(0)
    """), True),
    "memorised_asserts_and_patched_random": (ADD, completion("""
        return {(0, 1): 1, (2, 3): 5, (5, 7): 12, (3, 3): 6}.get((x, y), 0)
    """, """
        import random
        random.randint = lambda a, b: 3
    """), True),
    "predicts_the_tests_random": (DRAW, completion("""
        import random
        state = random.getstate()
        value = random.random()
        random.setstate(state)  # the test's own draw, which comes next, gives the same value
        return value
    """), True),
    "settrace_skips_the_asserts": (STRAIGHT, completion("return 0", """
        import sys

        def _skip(frame, event, arg):
            lines = sorted({line for *_, line in frame.f_code.co_lines() if line})
            if event == "line" and frame.f_lineno < lines[-1]:
                frame.f_lineno = lines[-1]  # check's last line: HumanEval's harmless `assert True`
            return _skip

        sys.settrace(lambda frame, event, arg: _skip if frame.f_code.co_name == "check" else None)
    """), True),
    "patched_builtins_abs_round_isinstance": (TRUNCATE, completion("return 0.0", """
        import builtins
        builtins.abs = lambda x: 0
        builtins.round = lambda x, n=None: 0
        builtins.isinstance = lambda obj, kind: True
    """), True),
    "shadowed_prompt_helper": (POLY, completion("return 0.0", """
        def poly(xs, x):
            return 0
    """), True),
    "reads_the_test_from_memory": (HIDDEN, completion(SCAN_MEMORY), True),
    "fake_verdict_on_stdout": (STRAIGHT, completion("return 0", FIND_RECORD, """
        for nonce in _nonces() or {"0" * 32}:
            print(nonce)
            print({"i": 0, "status": "exit", "code": 0, "time": 0.0, "stdout": "", "stderr": "", "record": nonce,
                   "left": 0})
            print({"end": 1, "ipc": 0})
        print("passed")
    """), False),
    "system_exit_inside_the_call": (STRAIGHT, completion("raise SystemExit(0)"), False),
    "keyboard_interrupt_inside_the_call": (STRAIGHT, completion("raise KeyboardInterrupt"), False),
    "os_exit_0_inside_the_call": (STRAIGHT, completion("import os\nos._exit(0)"), False),
    "attacks_the_judge": (STRAIGHT, completion(ATTACK_THE_JUDGE), False),
}


def in_process(problem: CodeProblem, completion: str) -> bool:
    """The harness this replaces (and OpenAI's): completion, test and ``check(entry_point)`` in one interpreter."""
    code = f"{problem.prefix}{completion}\n\n{problem.tests[0]}\n\ncheck({problem.entry_point})\n"
    return execute(ExecutionJob(code), CONFIG).all_ok


def assert_host_clean() -> None:
    assert sandbox_processes() == []
    uids = range(CONFIG.uid_base, CONFIG.uid_base + 16)
    assert [uid for uid in uids if sysv_objects_of(uid) or keys_left(uid) > 0] == []


@pytest.mark.skipif(not CAPS.isolated, reason=f"needs root + namespaces; this machine: {CAPS.as_dict()}")
@pytest.mark.parametrize("name", list(ATTACKS))
def test_forging_attack_fails_out_of_process(name):
    problem, completion, forges_in_process = ATTACKS[name]
    if forges_in_process:
        assert in_process(problem, completion), f"control: {name} should win with the asserts in its interpreter"
    verdict = evaluate_completions([problem], [completion], CONFIG, progress=False)[0]
    assert not verdict.passed and verdict.status in ("error", "incomplete"), verdict
    assert_host_clean()


HONEST = {"add": "    return x + y\n", "flip_case": "    return string.swapcase()\n",
          "sort_desc": "    return sorted(xs, reverse=True)\n", "is_sorted": "    return xs == sorted(xs)\n",
          "truncate": "    return number % 1.0\n", "answer": "    return 42\n", "secret": f"    return {SECRET[::-1]!r}\n",
          "find_zero": "    lo, hi = -100.0, 100.0\n    for _ in range(200):\n        mid = (lo + hi) / 2\n"
                       "        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n        else:\n"
                       "            lo = mid\n    return lo\n"}


def test_the_attacked_problems_pass_honest_solutions():
    """Control: each problem the attacks target is solvable, so their failures are the attacks' own."""
    problems = [ADD, FLIP, SORT, SORTED, TRUNCATE, STRAIGHT, POLY, HIDDEN]  # DRAW has no honest solution
    verdicts = evaluate_completions(problems, [HONEST[p.entry_point] for p in problems], CONFIG, progress=False)
    assert {p.task_id: v.status for p, v in zip(problems, verdicts) if not v.passed} == {}
