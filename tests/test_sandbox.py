"""The sandbox holds against bad programs: each is contained, fails with its reason, and the run goes on."""

from __future__ import annotations

import os
import time

import pytest

from anchorcoder.execution import SandboxLimits, run_program, run_programs, sandbox_layers
from anchorcoder.registry import ConfigError

LIMITS = SandboxLimits(timeout_s=2.0)
BOUND_S = LIMITS.timeout_s + 6  # the program's budget, start-up grace, and a margin for a loaded machine


def run(program: str, limits: SandboxLimits = LIMITS) -> tuple[bool, str, float]:
    started = time.perf_counter()
    result = run_program(program, limits)
    elapsed = time.perf_counter() - started
    assert elapsed < BOUND_S, (program, result)
    return result.passed, result.reason, elapsed


def live_pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def test_all_layers_hold_on_this_machine():
    layers = sandbox_layers()
    expected = ["fresh_interpreter", "scrubbed_environment", "no_network", "readonly_filesystem", "hidden_proc"]
    assert all(layers[k] for k in [*expected, "rlimits", "no_new_processes", "python_guard"]), layers


def test_good_and_failing_programs():
    assert run("import numpy as np\nassert np.arange(4).sum() == 6\n")[:2] == (True, "passed")
    passed, reason, _ = run("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not passed and reason == "failed: AssertionError: arithmetic"


def test_infinite_loop_times_out():
    passed, reason, elapsed = run("while True:\n    pass\n")
    assert not passed and reason == "timed out" and elapsed >= LIMITS.timeout_s


def test_a_loop_that_swallows_the_timer_is_still_stopped():
    passed, reason, _ = run(
        "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass\n"
    )
    assert not passed and "timed out" in reason


@pytest.mark.parametrize(
    "program",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n",  # past the Python guard
        "import subprocess\nsubprocess.Popen(['sleep', '100'])\n",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
    ],
)
def test_fork_bombs_start_no_process(program):
    before = live_pids()
    passed, reason, _ = run(program)
    assert not passed and reason
    leftovers = [p for p in live_pids() - before if os.path.exists(f"/proc/{p}")]
    names = [open(f"/proc/{p}/comm").read().strip() for p in leftovers if os.path.exists(f"/proc/{p}/comm")]
    assert "sleep" not in names and len(leftovers) < 3, names


@pytest.mark.parametrize(
    "program", ["x = bytearray(100 * 2**30)\n", "x = []\nwhile True:\n    x.append(' ' * 2**24)\n"]
)
def test_allocating_100_gb_fails_with_memory_error(program):
    passed, reason, _ = run(program, SandboxLimits(timeout_s=2.0, memory_mb=512))
    assert not passed and "MemoryError" in reason


def test_huge_file_is_refused_and_the_folder_removed(tmp_path):
    program = "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)\n"
    before = set(os.listdir("/tmp"))
    passed, reason, _ = run(program)
    assert not passed and "File too large" in reason
    assert not [d for d in set(os.listdir("/tmp")) - before if d.startswith("anchorcoder-exec-")]


@pytest.mark.parametrize(
    ("program", "says"),
    [
        ("import os\nos._exit(0)\nassert False\n", "exit code 0"),
        ("import sys\nsys.exit(0)\nassert False\n", "SystemExit: 0"),
        ("exit()\nassert False\n", "SystemExit"),
        ("raise SystemExit\n", "SystemExit"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", "TypeError"),  # os.kill is disabled
    ],
)
def test_leaving_before_the_tests_finish_fails(program, says):
    passed, reason, _ = run(program)
    assert not passed and says in reason


def test_a_forged_success_line_does_not_pass():
    program = 'import os\nos.write(3, b\'{"status": "passed", "nonce": "x"}\\n\')\nos._exit(0)\n'
    assert not run(program)[0]


def test_canary_outside_the_folder_survives(tmp_path):
    canary = tmp_path / "keep" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("alive")
    for program in [
        f"import os\nos.remove({str(canary)!r})\n",
        f"import shutil\nshutil.rmtree({str(canary.parent)!r})\n",
        f"import ctypes\nassert ctypes.CDLL(None).unlink({str(canary).encode()!r}) == 0\n",
        f"open({str(canary)!r}, 'w').write('overwritten')\n",
        f"import pathlib\npathlib.Path({str(canary)!r}).unlink()\n",
    ]:
        passed, reason, _ = run(program)
        assert not passed and reason, program
        assert canary.read_text() == "alive", program


def test_parent_environment_is_not_visible(monkeypatch):
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("ANCHORCODER_TEST_SECRET", secret)
    program = f"""
import glob, os
found = {secret!r} in str(dict(os.environ))
for path in ["/proc/self/environ", f"/proc/{{os.getppid()}}/environ", *glob.glob("/proc/*/environ")]:
    try:
        found = found or {secret!r} in open(path, errors="replace").read()
    except OSError:
        pass
assert found, "secret not visible"
"""
    passed, reason, _ = run(program)
    assert not passed and reason == "failed: AssertionError: secret not visible"


def test_unbounded_recursion_is_contained():
    program = "import sys\nsys.setrecursionlimit(10**9)\ndef f():\n    return f()\nf()\n"
    passed, reason, _ = run(program)
    assert not passed and reason


def test_segfault_is_reported_as_a_crash():
    passed, reason, _ = run("import ctypes\nctypes.string_at(0)\n")
    assert not passed and reason == "crashed (signal SIGSEGV)"


def test_stdin_is_empty_and_network_is_down():
    assert run("import sys\nassert sys.stdin.read() == ''\n")[0]
    passed, reason, _ = run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n")
    assert not passed and "unreachable" in reason


def test_a_mixed_batch_keeps_order_and_carries_on():
    programs = [
        "assert True\n",
        "while True: pass\n",
        "import os\nos._exit(0)\n",
        "import ctypes\nctypes.string_at(0)\n",
        "x = bytearray(100 * 2**30)\n",
        "assert sum(range(10)) == 45\n",
    ]
    seen = []
    started = time.perf_counter()
    results = run_programs(programs, LIMITS, workers=2, on_result=lambda i, r: seen.append(i))
    assert [r.passed for r in results] == [True, False, False, False, False, True]
    assert sorted(seen) == list(range(6))
    assert time.perf_counter() - started < BOUND_S + 2


def test_bad_limits_name_their_key():
    with pytest.raises(ConfigError, match="execution.memory_mb"):
        SandboxLimits(memory_mb=1)
    with pytest.raises(ConfigError, match="benchmark.timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ConfigError, match="execution.workers"):
        run_programs(["pass"], workers=0)
