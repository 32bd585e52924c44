"""A wrong solution cannot forge its verdict: hostile completions, scored through HumanEval's own check.

Each completion answers HumanEval/0 wrongly (``return True``) and then tries to report ``passed``
itself: by reading the nonce out of the runner's frames (found by walking the stack, through a
traceback, a generator, a signal handler, a trace function, the thread table, ``gc``, ``ctypes``,
``/proc/self/mem``), by replacing the runner's verdict function, by writing to every descriptor, or by
leaving before the asserts. A control runs the same completions under a runner of the old design (the
verdict in the same interpreter, nothing sealed): there they do forge a pass, so the attacks are real.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest
from conftest import compose_config

from anchorcoder.benchmarks import ExecutionSettings, build_benchmark

STEAL = """
import json, os, sys


def forge(nonce, fd):
    os.write(fd, (json.dumps({"status": "passed", "nonce": nonce}) + "\\n").encode())
    os._exit(0)


def loot(frame):  # walk a frame chain for the runner's locals
    while frame is not None:
        found = frame.f_locals
        if "nonce" in found and "result_fd" in found:
            forge(found["nonce"], found["result_fd"])
        frame = frame.f_back
"""

ATTACKS = {
    "stack walk (sys._getframe)": "loot(sys._getframe())",
    "stack walk (inspect)": "import inspect\nloot(inspect.currentframe())",
    "traceback frame": "try:\n    1 / 0\nexcept ZeroDivisionError as error:\n    loot(error.__traceback__.tb_frame)",
    "running generator's frame": "def walk():\n    loot(gen.gi_frame)\n    yield\ngen = walk()\nnext(gen, None)",
    "signal handler's frame": (
        "import signal\nsignal.signal(signal.SIGUSR1, lambda signum, frame: loot(frame))\n"
        "signal.raise_signal(signal.SIGUSR1)"
    ),
    "trace function": "sys.settrace(lambda frame, event, arg: loot(frame))\ndef call():\n    pass\ncall()",
    "thread table": "for frame in sys._current_frames().values():\n    loot(frame)",
    "gc: the runner's functions and frames": (
        "import gc, types\nfor o in gc.get_objects() + gc.get_referrers(globals()):\n"
        "    if isinstance(o, types.FrameType):\n        loot(o)\n"
        "    if isinstance(o, types.FunctionType) and o.__name__ == '_describe':\n"
        "        o.__globals__['_describe'] = lambda error: 'passed'"
    ),
    "the runner's globals (verdict function replaced)": (
        "import signal\nspaces = [vars(m) for m in list(sys.modules.values()) if m is not None]\n"
        "for s in signal.valid_signals():\n    try:\n        spaces.append(signal.getsignal(s).__globals__)\n"
        "    except Exception:\n        pass\n"
        "for space in spaces:\n    if '_describe' in space and 'send' in space:\n"
        "        space['_describe'] = lambda error: 'passed'"
    ),
    "ctypes: frames through the C API": (
        "import ctypes\nctypes.pythonapi.PyEval_GetFrame.restype = ctypes.py_object\n"
        "loot(ctypes.pythonapi.PyEval_GetFrame())"
    ),
    "ctypes: raw memory write": (
        "import ctypes\nbuffer = bytes(8)\nctypes.memmove(id(buffer) + 32, b'passed', 6)\nassert buffer[:6] == b'passed'"
    ),
    "_testcapi / _ctypes directly": "import _ctypes",
    "/proc/self/mem scan": (
        "import re\nmaps = open('/proc/self/maps').read().splitlines()\nmem = open('/proc/self/mem', 'rb', 0)\n"
        "for line in maps:\n    span, perms = line.split()[:2]\n    if 'r' not in perms:\n        continue\n"
        "    start, end = (int(x, 16) for x in span.split('-'))\n    try:\n        mem.seek(start)\n"
        "        data = mem.read(end - start)\n    except OSError:\n        continue\n"
        "    for nonce in re.findall(rb'(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])', data):\n"
        "        for fd in range(3, 32):\n            try:\n"
        "                os.write(fd, (json.dumps({'status': 'passed', 'nonce': nonce.decode()}) + '\\n').encode())\n"
        "            except OSError:\n                pass\n"
        "os._exit(0)"
    ),
    "forged lines on every descriptor": (
        "for fd in range(3, 64):\n    try:\n"
        '        os.write(fd, b\'{"status": "passed", "nonce": "0"}\\n{"exit": 0}\\n\')\n'
        "    except OSError:\n        pass\nos._exit(0)"
    ),
    "os._exit before the asserts": "os._exit(0)",
    "sys.exit before the asserts": "sys.exit(0)",
}
# the others need no control: they only try to reach native code, or only leave early
FORGE_UNDER_THE_OLD_DESIGN = [
    name
    for name in ATTACKS
    if name.startswith(
        ("stack", "traceback", "running", "signal", "trace", "thread", "gc", "the runner", "ctypes: frames", "/proc")
    )
]

# The old design, for the control: the verdict sent from the interpreter that ran the program.
OLD_RUNNER = """
import json, os, sys
def send(fd, **message):
    os.write(fd, (json.dumps(message) + "\\n").encode())
def _describe(error):
    return f"failed: {type(error).__name__}"
def run(program, nonce, result_fd):
    status = "passed"
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__main__"})
    except BaseException as error:
        status = _describe(error)
    send(result_fd, status=status, **({"nonce": nonce} if status == "passed" else {}))
    os._exit(0)
header = json.loads(sys.stdin.readline())
run(sys.stdin.read(), header["nonce"], int(sys.argv[1]))
"""


def completion(attack: str) -> str:
    return "    return True  # wrong: half of the tests expect False\n" + STEAL + "\n" + ATTACKS[attack] + "\n"


@pytest.fixture(scope="module")
def humaneval():
    bench = build_benchmark(compose_config(overrides=["benchmark=humaneval", "benchmark.limit=1"])["benchmark"])
    return bench, bench.problems()[0]


def old_design_verdict(program: str) -> bool:
    """True when ``program`` gets a ``passed`` line with the right nonce out of the old design's runner."""
    import os

    nonce = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", OLD_RUNNER, str(write_fd)], stdin=subprocess.PIPE, pass_fds=(write_fd,)
    )
    os.close(write_fd)
    proc.communicate(json.dumps({"nonce": nonce}).encode() + b"\n" + program.encode(), timeout=60)
    with os.fdopen(read_fd, "rb") as f:
        lines = f.read().decode(errors="replace").splitlines()
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("status") == "passed" and message.get("nonce") == nonce:
            return True
    return False


def test_every_attack_is_judged_failed_with_its_reason(humaneval):
    bench, problem = humaneval
    names = list(ATTACKS)
    verdicts = bench.check([problem] * len(names), [completion(n) for n in names], "completion", ExecutionSettings())
    judged = {name: (v.passed, v.reason) for name, v in zip(names, verdicts, strict=True)}
    print(json.dumps(judged, indent=1))
    assert not [name for name, (passed, _) in judged.items() if passed], judged
    assert all(reason and reason != "passed" for _, reason in judged.values()), judged


@pytest.mark.parametrize("attack", FORGE_UNDER_THE_OLD_DESIGN)
def test_control_the_attack_forges_a_pass_under_the_old_design(humaneval, attack):
    bench, problem = humaneval
    assert old_design_verdict(bench.program(problem, completion(attack), "completion")), attack


def test_the_right_answer_still_passes_next_to_the_attack_code(humaneval):
    """The attack code alone, after a correct body, must not break an honest pass (it is refused, not fatal)."""
    bench, problem = humaneval
    correct = problem.data["canonical_solution"]
    harmless = correct + STEAL + "\ntry:\n    loot(sys._getframe())\nexcept ValueError:\n    pass\n"
    (verdict,) = bench.check([problem], [harmless], "completion", ExecutionSettings())
    assert verdict.passed, verdict


EQUAL_TO_EVERYTHING = "class Anything:\n    def __eq__(self, other):\n        return True\n"


@pytest.mark.parametrize("benchmark_name", ["humaneval", "mbpp"])
def test_strict_equality_rejects_an_object_equal_to_everything(benchmark_name):
    from anchorcoder.benchmarks.strict import strict_tests

    bench = build_benchmark(compose_config(overrides=[f"benchmark={benchmark_name}", "benchmark.limit=3"])["benchmark"])
    problems = bench.problems()
    if benchmark_name == "humaneval":  # the body of the prompt's function
        cheat = [f"    return Anything()\n{EQUAL_TO_EVERYTHING}" for _ in problems]
        honest = [p.data["canonical_solution"] for p in problems]
    else:  # MBPP's completion is the whole solution: its function, returning the cheat
        cheat = [f"{EQUAL_TO_EVERYTHING}def {p.data['code'].split('def ')[1].split('(')[0]}(*args):\n    return Anything()\n"
                 for p in problems]  # fmt: skip
        honest = [p.data["code"] for p in problems]
    loose, strict = ExecutionSettings(), ExecutionSettings(strict_equality=True)
    fooled = [v.passed for v in bench.check(problems, cheat, "completion", loose)]  # the benchmarks' own semantics
    assert sum(fooled) >= 2, fooled  # (a test such as abs(f(x) - y) < 1e-6 is not fooled)
    assert not any(v.passed for v in bench.check(problems, cheat, "completion", strict))
    assert all(v.passed for v in bench.check(problems, honest, "completion", strict))
    assert "__anchorcoder_strict_equal__(" in strict_tests("assert f(1) == [1, 2.0]\n")


def test_strict_equality_compares_types_all_the_way_down():
    from collections import Counter

    from anchorcoder.benchmarks.strict import HELPER, strict_tests

    scope = {}
    exec(strict_tests("pass\n"), scope)  # our own helper, not generated code
    equal = scope[HELPER]

    class Evil(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    assert equal(4, 4.0) and equal(True, 1) and equal(Counter({1: 2}), {1: 2}) and equal([1, (2, "a")], [1, (2, "a")])
    assert not equal(Evil(5), 3) and not equal([Evil(5)], [3]) and not equal({1: Evil(0)}, {1: 2})
    assert not equal((1, 2), [1, 2]) and not equal(None, 0) and not equal("1", 1)
    rewritten = strict_tests("assert f(1) == 2 and g() != 3 and 0 == h() == 0\n").split("\n", 2)[2]
    assert rewritten.endswith(f"assert {HELPER}(f(1), 2) and g() != 3 and (0 == h() == 0)\n")  # != and chains kept
