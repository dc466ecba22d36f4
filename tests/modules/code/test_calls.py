"""Check mode (HumanEval's asserts outside the program's process): the plain-data codec, what crosses the pipe and
how, exceptions, the fallbacks that fail closed, several units, and the problems whose tests reach past ``candidate``."""

from __future__ import annotations

import collections
import enum
import math
import textwrap

import pytest

from recipes.modules.code.execution import ExecutionJob, SandboxConfig, execute
from recipes.modules.code.problems import CodeProblem, evaluate_completions, make_job
from recipes.modules.code.sandbox import plain

CONFIG = SandboxConfig(timeout_s=4.0, startup_s=20.0)


class Color(enum.IntEnum):
    RED = 3


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**63, -(2**200), 1.5, -0.0, 1e300, "", "héllo \x00 \ud800", b"\x00\xff", 1 + 2j,
    [1, [2, (3, "x")]], (), (1,), {"a": 1, (1, 2): [3], 4: None}, set(), {1, "a", (2, 3)}, frozenset({1}),
])
def test_plain_round_trip_keeps_exact_types(value):
    back = plain.decode(plain.encode(value))
    assert back == value and type(back) is type(value)
    if isinstance(value, dict):
        assert list(back) == list(value) and all(type(a) is type(b) for a, b in zip(back, value))


def test_plain_floats_that_json_lacks():
    back = plain.decode(plain.encode([math.inf, -math.inf, math.nan]))
    assert back[:2] == [math.inf, -math.inf] and math.isnan(back[2])


def test_subclasses_travel_as_their_base_type():
    class Yes(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

        def __repr__(self):
            return "42"

    class Text(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

        def __str__(self):
            return "forged"

    values = [Yes(0), Text("abc"), Color.RED, Point(1, 2), collections.Counter("aab"), collections.OrderedDict(a=1)]
    back = plain.decode(plain.encode(values))
    assert back == [0, "abc", 3, (1, 2), {"a": 2, "b": 1}, {"a": 1}]
    assert [type(v) for v in back] == [int, str, int, tuple, dict, dict]


@pytest.mark.parametrize("value", [lambda: 1, object(), iter([1]), range(3), bytearray(b"x").__iter__()])
def test_plain_refuses_what_is_not_data(value):
    with pytest.raises(TypeError):
        plain.encode(value)


def test_plain_refuses_a_value_that_contains_itself():
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError):
        plain.encode(loop)


@pytest.mark.parametrize("data", [
    b'{"t":[1],"x":2}', b'{"q":[1]}', b'{"t":"ab"}', b'{"m":[[1]]}', b'{"s":[[1]]}', b'{"i":5}', b'{"c":["a", 1]}',
    b"[" * 100000, b"1" * 5000, b"\xff", b"{}", b"",
])
def test_plain_decode_rejects_untrusted_garbage(data):
    with pytest.raises((ValueError, TypeError, RecursionError)):
        plain.decode(data)


RETURNS = {  # what the program returns -> the test checks value and exact type on the trusted side
    "(1, [2, 3])": "(1, [2, 3])", "{1: 'a', (2, 3): {4}}": "{1: 'a', (2, 3): {4}}", "2 ** 100": "2 ** 100",
    "float('-inf')": "float('-inf')", "None": "None", "True": "True", "b'ab'": "b'ab'",
    "__import__('collections').Counter('aa')": "{'a': 2}",
}


def test_values_cross_as_exact_built_ins():
    checks = "".join(f"    v = candidate({i})\n    assert v == {want} and type(v) is type({want}), v\n"
                     for i, want in enumerate(RETURNS.values()))
    program = "def f(i):\n    return [" + ", ".join(RETURNS) + "][i]\n"
    result = execute(ExecutionJob(program, "check", ("def check(candidate):\n" + checks,), "f"), CONFIG)
    assert result.all_ok, result.units[0].stderr


def test_arguments_reach_the_program_unchanged_and_mutations_stay_there():
    test = ("def check(candidate):\n    xs = [3, (1, 2), {'k': {5}}]\n    assert candidate(xs, key=frozenset({1})) == "
            "'list tuple dict frozenset'\n    assert xs == [3, (1, 2), {'k': {5}}]\n")
    program = ("def f(xs, key):\n    kinds = ' '.join(type(v).__name__ for v in (xs, xs[1], xs[2], key))\n"
               "    xs.clear()\n    return kinds\n")
    assert execute(ExecutionJob(program, "check", (test,), "f"), CONFIG).all_ok


EXPECTS_VALUE_ERROR = textwrap.dedent("""
    def check(candidate):
        try:
            candidate(-1)
        except ValueError as e:
            assert type(e) is ValueError and str(e) == "negative", (type(e), e)
        else:
            raise AssertionError("no ValueError")
""")


@pytest.mark.parametrize("body, passed", [
    ("raise ValueError('negative')", True),
    ("class Negative(ValueError):\n        pass\n    raise Negative('negative')", True),  # nearest built-in
    ("raise TypeError('negative')", False),
    ("return 0", False),
])
def test_exceptions_come_back_as_built_ins_of_their_type(body, passed):
    result = execute(ExecutionJob(f"def f(x):\n    {body}\n", "check", (EXPECTS_VALUE_ERROR,), "f"), CONFIG)
    assert result.all_ok is passed, result.units[0].stderr


def test_a_test_that_passes_a_function_fails_closed():
    """The fallback for what cannot cross as data: the unit fails, even for a right program; nothing runs in U."""
    test = "def check(candidate):\n    assert candidate(lambda x: x + 1, 3) == 4\n"
    result = execute(ExecutionJob("def apply(f, x):\n    return f(x)\n", "check", (test,), "apply"), CONFIG)
    assert result.units[0].status == "error" and "only plain data reaches the program" in result.units[0].stderr


@pytest.mark.parametrize("value", ["(x for x in [1])", "object()", "print", "open"])
def test_a_return_value_that_is_not_data_fails(value):
    test = "def check(candidate):\n    assert candidate() is not None\n"
    result = execute(ExecutionJob(f"def f():\n    return {value}\n", "check", (test,), "f"), CONFIG)
    assert result.units[0].status == "error" and "not plain data" in result.units[0].stderr


def test_tests_that_reach_past_candidate():
    """HumanEval/33 calls the function by its name (the program's, bound to the proxy too); HumanEval/32, 38 and 50
    call a helper of the prompt, which runs trusted: a program redefining it changes nothing the test sees."""
    prompt = "def encode(s):\n    return s[::-1]\n\n\ndef decode(s):\n    \"\"\"Inverse of encode.\"\"\"\n"
    test = ("def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"
            "    assert decode('xy') == candidate('xy')\n")
    problem = CodeProblem("reach/decode", prompt, "script", (test,), prefix=prompt, entry_point="decode")
    cheat = "    return s\n\n\ndef encode(s):\n    return s\n"
    right, cheat = evaluate_completions([problem] * 2, ["    return s[::-1]\n", cheat], CONFIG, progress=False)
    assert right.passed and not cheat.passed


def test_program_output_is_kept_and_a_printing_test_cannot_corrupt_records():
    test = "def check(candidate):\n    print({'end': 1})\n    assert candidate() == 1\n"
    result = execute(ExecutionJob("print('hi')\ndef f():\n    print('in f')\n    return 1\n", "check", (test,), "f"),
                     CONFIG)
    assert result.all_ok and result.units[0].stdout == "hi\nin f\n"


def test_several_units_are_judged_in_turn_and_stop_on_error_skips():
    """Each unit's test is read by I only after it forked that unit's U; large tests and outputs do not deadlock."""
    padding = "#" + "x" * 200_000 + "\n"
    ok, bad = padding + "def check(c):\n    assert c(2) == 4\n", padding + "def check(c):\n    assert c(2) == 5\n"
    job = ExecutionJob("print('y' * 300_000)\ndef f(x):\n    return x * 2\n", "check", (bad, ok, ok), "f")
    every = execute(job, SandboxConfig(timeout_s=4.0, startup_s=20.0, stop_on_error=False))
    stopped = execute(job, CONFIG)
    assert [u.status for u in every.units] == ["error", "ok", "ok"] and every.status == "done"
    assert [u.status for u in stopped.units] == ["error", "skipped", "skipped"] and stopped.status == "done"


def test_tests_go_compiled_or_as_source_and_a_broken_test_fails_the_unit(monkeypatch):
    """The parent sends the test compiled (same interpreter) or as source; a test that does not compile fails its
    unit (no exception out of execute), and either way its asserts survive this process's -O."""
    from recipes.modules.code import frames

    program, test = "def f():\n    return 1\n", "def check(c):\n    assert c() == 2\n"
    broken = execute(ExecutionJob(program, "check", ("def check(c:\n",), "f"), CONFIG)
    compiled = execute(ExecutionJob(program, "check", (test,), "f"), CONFIG)
    monkeypatch.setattr(frames, "_compiled", lambda text: None)
    source = execute(ExecutionJob(program, "check", (test,), "f"), CONFIG)
    assert broken.units[0].status == "error" and "SyntaxError" in broken.units[0].stderr
    assert compiled.units[0].status == source.units[0].status == "error"
    assert "AssertionError" in compiled.units[0].stderr and "AssertionError" in source.units[0].stderr


def test_humaneval_problems_become_check_jobs():
    problem = CodeProblem("HumanEval/x", "def f():\n", "script", ("def check(candidate):\n    pass\n",),
                          prefix="def f():\n", entry_point="f")
    job = make_job(problem, "    return 1\n")
    assert job.mode == "check" and job.code == "def f():\n    return 1\n" and job.fn_name == "f"
    assert job.inputs == ("def f():\n\n\ndef check(candidate):\n    pass\n\n",)
