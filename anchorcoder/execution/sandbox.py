"""Run untrusted, model-generated programs: one fresh, isolated interpreter per program.

Each program runs in a new Python process started with ``subprocess`` (never a fork of the process
that holds the model), in its own session, in a fresh temporary folder, with a minimal environment and
no stdin. ``_runner.py`` isolates it (namespaces, read-only mounts, hidden /proc, no network,
rlimits, no capabilities, seccomp, a Python guard; see its docstring) and tells this side when the
program starts, so that its ``timeout_s`` leaves interpreter start-up out. The parent kills the whole
process group once the budget is spent; the PID namespace takes everything the program left with it.

A program passes only if it ran to its end: the verdict ``passed`` must carry a nonce that the
program is never given, and ``_judge.py`` sends it only after the whole program returned. The program
runs in a fresh interpreter (the runner ``exec``s it after isolating the process) whose audit hook
hides the frames that hold the nonce and the process's memory (frame walks, ``gc``, ``ctypes``,
``/proc/self/mem``, trace functions, signal handlers), so it cannot forge that line. Exits, crashes,
timeouts and exceptions fail with their reason; so does output that looks like a verdict. What a
program can still do is change the meaning of the tests it runs with (e.g. return an object equal to
everything, or patch a builtin the tests call): the benchmarks' own semantics are kept.
Any isolation layer the machine does not allow is listed by
:func:`sandbox_layers`, with one warning.
"""

from __future__ import annotations

import json
import math
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from anchorcoder.registry import ConfigError

RUNNER = Path(__file__).with_name("_runner.py")
START_UP_S = 10.0  # interpreter start and isolation, before the program's own clock starts
KILL_GRACE_S = 1.0  # past the program's budget: time for the runner's own timer to report
MAX_LINE_BYTES = 4096  # the runner's messages are short; anything longer is the program writing junk
STDERR_BYTES = 2048  # tail of the runner's own stderr (set-up errors; the program's output is discarded)
USE_NAMESPACES = True  # tests turn it off to check the layers that hold where namespaces are not allowed
ALLOW_CTYPES = False  # tests turn it on to reach the kernel layers under the Python ones (mount, unshare...)


def _site_packages() -> list[str]:
    """This environment's site-packages: the sandbox's interpreters start without ``site`` (-S)."""
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_workers(workers) -> None:
    if not _is_int(workers) or workers < 1:
        raise ConfigError(f"execution.workers must be an integer >= 1; got {workers!r}")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``max_processes`` > 1 is enforced with RLIMIT_NPROC, which counts threads too."""

    timeout_s: float = 3.0  # wall-clock budget for the program itself (interpreter start-up not counted)
    memory_mb: int = 2048  # address space (RLIMIT_AS) of the program's process
    max_processes: int = 1  # processes alive at once, the program's own included: 0 or 1 => it may start none
    max_file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE); its folder holds 4x this in all
    max_open_files: int = 64

    def __post_init__(self):
        timeout = self.timeout_s
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout < math.inf:
            raise ConfigError(
                f"execution.timeout_s (a benchmark's timeout_s) must be a number > 0; got {self.timeout_s!r}"
            )
        for key, low in (("memory_mb", 64), ("max_processes", 0), ("max_file_mb", 1), ("max_open_files", 16)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise ConfigError(f"execution.{key} must be an integer >= {low}; got {value!r}")


@dataclass
class ExecutionResult:
    passed: bool
    reason: str  # "passed", "failed: AssertionError: ...", "timed out", "crashed (signal SIGSEGV)", ...
    duration_s: float  # how long the program itself ran (start-up not counted)


@dataclass
class _Seen:
    """What the runner reported through the result pipe."""

    started_at: float | None = None
    layers: dict = field(default_factory=dict)
    status: str | None = None
    nonce: str | None = None
    exit: int | None = None  # the program's process: exit code, or -signal

    def take(self, line: bytes, now: float) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("started") and self.started_at is None:
            self.started_at, self.layers = now, dict(message.get("layers") or {})
        elif isinstance(message.get("status"), str):
            self.status, self.nonce = message["status"][:300], message.get("nonce")
        elif _is_int(message.get("exit")):
            self.exit = message["exit"]


def _clean_env(workdir: str) -> dict[str, str]:
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONHASHSEED": "0",  # the same verdict every run, even for code that depends on set order
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONSAFEPATH": "1",
        **threads,
    }


def _exited(pid: int) -> bool:
    """Has ``pid`` ended? Without reaping it: until it is reaped its pid (and process group) is not reused."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _watch(fd: int, proc: subprocess.Popen, timeout_s: float) -> tuple[_Seen, bool]:
    """Read the runner's messages until it ends or its budget is spent; True if it had to be killed."""
    seen, buffer, program_clock = _Seen(), b"", False
    deadline = time.monotonic() + START_UP_S
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        pidfd = os.pidfd_open(proc.pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):  # an old kernel: poll for the end instead
        pidfd = None
    try:
        while not _exited(proc.pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return seen, True
            events = poller.poll(1000 * min(left, 0.05 if pidfd is None else left))
            if not any(ev_fd == fd for ev_fd, _ in events):
                continue
            chunk = os.read(fd, 65536)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            buffer = buffer[-MAX_LINE_BYTES:]
            for line in lines if seen.started_at is None else lines[-8:]:  # a flood costs us little
                if len(line) <= MAX_LINE_BYTES:
                    seen.take(line, time.monotonic())
            if seen.started_at is not None and not program_clock:  # from now on, the program's own budget
                program_clock, deadline = True, seen.started_at + timeout_s + KILL_GRACE_S
            if not chunk:  # every writer gone: the runner is ending (or the program closed its end)
                poller.unregister(fd)
        os.set_blocking(fd, False)  # what it wrote just before it ended (a pipe holds 64 KiB)
        for _ in range(4):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines[-8:]:
                seen.take(line, time.monotonic())
            if not chunk:
                break
        return seen, False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _stderr_tail(proc: subprocess.Popen) -> str:
    try:
        os.set_blocking(proc.stderr.fileno(), False)
        data = proc.stderr.read(65536) or b""
    except (OSError, ValueError):
        data = b""
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1][-STDERR_BYTES:] if lines else ""


def _reason(seen: _Seen, killed: bool, code: int | None, nonce: str, stderr: str) -> str:
    if killed:
        return "timed out" if seen.started_at is not None else f"sandbox did not start within {START_UP_S:.0f} s"
    if seen.status == "passed" and seen.nonce == nonce and code == 0:
        return "passed"
    if seen.status and seen.status != "passed":
        return seen.status
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        if name in ("SIGALRM", "SIGXCPU"):  # the program's timer (its default action), or the CPU rlimit
            return "timed out" if name == "SIGALRM" else "timed out (CPU limit)"
        return f"crashed (signal {name})"
    if seen.started_at is None:
        return f"sandbox error: {stderr or f'the runner exited with code {code}'}"
    return f"exited before the tests finished (exit code {code})"


def _run(program: str, limits: SandboxLimits) -> tuple[ExecutionResult, dict[str, bool]]:
    workdir = tempfile.mkdtemp(prefix="anchorcoder-exec-")
    nonce = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    spawned = time.monotonic()
    proc = None
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-S",  # no site: the runner is standard library only, and site's .pth files cost start-up time
                "-s",
                str(RUNNER),
                str(write_fd),
                json.dumps(
                    {**asdict(limits), "namespaces": USE_NAMESPACES, "ctypes": ALLOW_CTYPES, "site": _site_packages()}
                ),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_clean_env(workdir),
            pass_fds=(write_fd,),
            start_new_session=True,  # its own process group, killed as a whole
        )
        os.close(write_fd)
        write_fd = -1
        try:
            proc.stdin.write(f"{nonce}\n{program}".encode(errors="surrogateescape"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        seen, killed = _watch(read_fd, proc, limits.timeout_s)
        ended = time.monotonic()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            _kill_group(proc.pid)
            proc.wait()
        _remove(workdir)
    code = seen.exit if seen.exit is not None else proc.returncode
    reason = _reason(seen, killed, None if killed else code, nonce, _stderr_tail(proc))
    proc.stderr.close()
    duration = ended - (seen.started_at if seen.started_at is not None else spawned)
    return ExecutionResult(reason == "passed", reason, duration), seen.layers


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(workdir: str) -> None:
    """Delete the folder, also where the program made parts of it read-only (without namespaces, it
    wrote there directly)."""
    for root, dirs, _ in os.walk(workdir):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(workdir, ignore_errors=True)


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run one program in the sandbox; see the module docstring."""
    sandbox_layers(limits)  # probe (and warn) once
    return _run(program, limits)[0]


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 2,
    on_result: Callable[[int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """Run many programs in parallel (at most ``workers`` at once), results in input order;
    ``on_result(i, result)`` is called (in this thread) as each ends."""
    check_workers(workers)
    sandbox_layers(limits)
    results: list[ExecutionResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        futures = {pool.submit(_run, program, limits): i for i, program in enumerate(programs)}
        try:
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()[0]
                if on_result is not None:
                    on_result(i, results[i])
        except BaseException:  # an interrupt or a failing callback: the programs not started yet never start
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results  # type: ignore[return-value]


_layers: dict[tuple[SandboxLimits, bool], dict[str, bool]] = {}
_warned: set[str] = set()
_layers_lock = threading.Lock()


def sandbox_layers(limits: SandboxLimits = SandboxLimits()) -> dict[str, bool]:
    """Which isolation layers hold on this machine, e.g. ``{"readonly_filesystem": True, "seccomp": True, ...}``
    (probed once per limits; one warning per process for those that do not); recorded with every run."""
    key = (limits, USE_NAMESPACES)
    with _layers_lock:
        if key not in _layers:
            result, layers = _run("pass\n", limits)
            if not result.passed:
                raise RuntimeError(f"the sandbox cannot run a trivial program here: {result.reason}")
            missing = sorted(k for k, held in layers.items() if not held and k not in _warned)
            if missing:
                _warned.update(missing)
                warnings.warn(
                    f"sandbox layers unavailable on this machine: {', '.join(missing)}; the other layers still "
                    "apply (see README, Sandbox)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _layers[key] = layers
        return dict(_layers[key])
