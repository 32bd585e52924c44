"""Run untrusted, model-generated programs: one fresh, isolated interpreter per program.

Each program runs in a new Python process (never a fork of the process that holds the model), in a
fresh temporary folder, with a minimal environment and no stdin. Inside, ``_runner.py`` enters new
mount and network namespaces (every mount read-only but the folder, /proc hidden, no network),
sets resource limits (address space, file size, open files, CPU), forbids new processes with a
seccomp filter, disables destructive Python functions, and runs the program under a timer. The
parent kills the whole process group when the budget is spent. A program passes only if it ran to
its end: the runner reports success with a nonce the program never sees.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from anchorcoder.registry import ConfigError

RUNNER = Path(__file__).with_name("_runner.py")
STARTUP_GRACE_S = 5.0  # interpreter start-up and isolation, on top of the program's own budget
MAX_RESULT_BYTES = 65536


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 3.0  # the program's own run time (interpreter start-up not counted)
    memory_mb: int = 2048  # address space (RLIMIT_AS)
    max_file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    max_open_files: int = 64

    def __post_init__(self):
        checks = [
            ("benchmark.timeout_s", self.timeout_s, 0.01),
            ("execution.memory_mb", self.memory_mb, 64),
            ("execution.max_file_mb", self.max_file_mb, 1),
            ("execution.max_open_files", self.max_open_files, 16),
        ]
        for key, value, low in checks:
            if not isinstance(value, int | float) or value < low:
                raise ConfigError(f"{key} must be >= {low}; got {value!r}")


@dataclass
class ExecutionResult:
    passed: bool
    reason: str  # "passed", "failed: AssertionError: ...", "timed out", "crashed (signal SIGSEGV)", ...
    duration_s: float


def _clean_env(workdir: str) -> dict[str, str]:
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        **threads,
    }


def _run(program: str, limits: SandboxLimits) -> tuple[ExecutionResult, dict]:
    workdir = tempfile.mkdtemp(prefix="anchorcoder-exec-")
    nonce = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(RUNNER), str(write_fd), json.dumps(asdict(limits))],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env=_clean_env(workdir),
            pass_fds=(write_fd,),
            start_new_session=True,  # its own process group, killed as a whole
        )
        os.close(write_fd)
        try:
            proc.stdin.write(f"{nonce}\n{program}".encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        message, killed = _read_result(read_fd, proc, limits.timeout_s + STARTUP_GRACE_S)
    finally:
        os.close(read_fd)
        _kill_group(proc.pid if "proc" in locals() else None)
        _remove(workdir)
    duration = time.perf_counter() - started
    status = message.get("status")
    if killed:
        reason = "timed out"
    elif status == "passed" and message.get("nonce") == nonce and proc.returncode == 0:
        reason = "passed"
    elif status and status != "passed":
        reason = status
    elif proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        reason = "timed out (CPU limit)" if sig == "SIGXCPU" else f"crashed (signal {sig})"
    else:
        reason = f"exited before the tests finished (exit code {proc.returncode})"
    return ExecutionResult(reason == "passed", reason, duration), message.get("layers", {})


def _read_result(fd: int, proc: subprocess.Popen, budget_s: float) -> tuple[dict, bool]:
    """Read the runner's one-line verdict until the process ends or the budget is spent."""
    data, deadline = b"", time.monotonic() + budget_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            _kill_group(proc.pid)
            proc.wait()
            return {}, True
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:  # every writer closed: the runner is done (or dead)
                break
            data = (data + chunk)[:MAX_RESULT_BYTES]
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # reported, then hung in a finaliser
        _kill_group(proc.pid)
        proc.wait()
    try:
        return json.loads(data.decode().splitlines()[0]), False
    except (ValueError, IndexError):
        return {}, False


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(workdir: str) -> None:
    for root, dirs, _ in os.walk(workdir):  # a program may have made its own folders read-only
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(workdir, ignore_errors=True)


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run one program in the sandbox; see the module docstring."""
    return _run(program, limits)[0]


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 2,
    on_result: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """Run many programs, at most ``workers`` at once; results in input order, ``on_result`` as each ends."""
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"execution.workers must be an integer >= 1; got {workers!r}")
    sandbox_layers()  # probe (and warn) once, before the first real program
    results: list[ExecutionResult | None] = [None] * len(programs)
    lock = threading.Lock()

    def one(i: int) -> None:
        results[i] = run_program(programs[i], limits)
        if on_result is not None:
            with lock:
                on_result(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(one, i) for i in range(len(programs))]:
            future.result()
    return results  # type: ignore[return-value]


@functools.cache
def sandbox_layers() -> dict[str, bool]:
    """Which isolation layers hold on this machine (probed once); warns about the ones that do not."""
    result, layers = _run("pass\n", SandboxLimits())
    if not result.passed:
        raise RuntimeError(f"the sandbox cannot run a trivial program here: {result.reason}")
    missing = sorted(k for k, v in layers.items() if not v)
    if missing:
        warnings.warn(
            f"sandbox layers unavailable on this machine: {', '.join(missing)}; the remaining layers still apply "
            "(see README, Sandbox)",
            RuntimeWarning,
            stacklevel=2,
        )
    return layers
