"""Runs untrusted generated Python (MBPP solutions with their asserts) in a separate, limited process.

Never in the evaluator's process. Each program runs in a fresh `python -I` child that, before the program's
first line:
  - reads the program from its stdin (the program never exists as a file outside its working directory);
  - imports a fixed set of standard modules (the ones MBPP solutions use), since after the next step the
    interpreter's own directory may be unreadable;
  - leaves the network: a new network namespace (`unshare(CLONE_NEWNET)`, as root; else with a new user
    namespace) holds only a down loopback; where the kernel refuses, the audit hook below still refuses
    every socket;
  - drops to an unprivileged uid / gid (nobody, 65534) when started as root, and stops (status "sandbox")
    if it is still root: root ignores RLIMIT_NPROC;
  - sets rlimits: CPU seconds, address space, file size (stdout and stderr included), open files,
    processes (threads count) and no core files;
  - installs an audit hook (PEP 578) that refuses process creation (fork, exec, spawn, subprocess,
    os.system, kill), sockets, ctypes, writes / deletes / renames outside its working directory, and reads
    of other processes' /proc entries.
The parent gives it an empty environment (no secrets to read), a throw-away working directory (owned by
the unprivileged uid, removed afterwards) and a wall-clock limit, after which the child's whole process
group is killed (it always is, at the end). A program passes only if it ran to its end: the child then
writes a per-run random marker after the program's output, so `sys.exit(0)` / `os._exit(0)` before the
asserts is a failure. (A program written to find that marker in the child's memory could forge a pass;
it still cannot leave the limits above.)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

UNPRIVILEGED_UID = 65534  # nobody


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program. wall_s / cpu_s: the authors' MBPP timeout (eval/human_eval/evaluation.py,
    evaluate_functional_correctness(timeout=10.0)); the rest bound what a test of a small function needs."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30      # address space
    file_bytes: int = 1 << 20        # any file written, stdout / stderr included
    open_files: int = 64
    processes: int = 4               # RLIMIT_NPROC of the unprivileged uid (threads count)


@dataclasses.dataclass(frozen=True)
class RunResult:
    status: str        # passed | failed | timeout (wall clock or CPU) | sandbox (the child could not isolate)
    returncode: int
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child: plain standard library, run with `python -I -c`. Reads one JSON line of settings, then the
# program, from stdin.
_CHILD = r'''
import json, os, sys, resource
def _main():
    cfg = json.loads(sys.stdin.readline())
    source = sys.stdin.read()
    sys.stdin.close()
    os.close(0)
    sys.dont_write_bytecode = True
    import math, re, copy, datetime, itertools, collections, heapq, functools, hashlib, string, typing, bisect
    import operator, statistics, fractions, decimal, random, array, numbers, cmath, textwrap, unicodedata
    import traceback, io, enum, dataclasses, abc, types, struct, time, calendar, queue, weakref, pprint, warnings
    import collections.abc
    net = "none"
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
        if libc.unshare(CLONE_NEWNET if os.getuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET) == 0:
            net = "netns"
        del libc, ctypes
    except Exception:
        pass
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # the program imports it afresh, which the hook refuses
    if os.getuid() == 0 or os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
        except OSError as e:
            sys.stderr.write(f"sandbox: cannot drop root: {e}\n"); os._exit(97)
    if os.getuid() == 0 or os.geteuid() == 0:
        sys.stderr.write("sandbox: still root\n"); os._exit(97)
    for name, value in (("RLIMIT_CPU", (cfg["cpu_s"], cfg["cpu_s"] + 1)), ("RLIMIT_AS", (cfg["mem"],) * 2),
                        ("RLIMIT_FSIZE", (cfg["fsize"],) * 2), ("RLIMIT_NOFILE", (cfg["nofile"],) * 2),
                        ("RLIMIT_NPROC", (cfg["nproc"],) * 2), ("RLIMIT_CORE", (0, 0))):
        resource.setrlimit(getattr(resource, name), value)
    cwd = os.path.realpath(os.getcwd())
    me = str(os.getpid())
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _REFUSED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
                "os.killpg", "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind",
                "socket.getaddrinfo", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
                "ctypes.call_function", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook", "os.chroot",
                "os.setuid", "resource.setrlimit", "resource.prlimit", "mmap.__new__"}
    _PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                    "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move",
                    "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod"}
    def _inside(path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return True  # a file descriptor: opened earlier under this hook
        full = os.path.realpath(os.path.join(cwd, path))
        return full == cwd or full.startswith(cwd + os.sep)
    def _hook(event, args):
        if event in _REFUSED or event == "import" and args and str(args[0]).split(".")[0] in (
                "ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket", "_socket", "multiprocessing"):
            raise PermissionError(f"sandbox: {event} {args[0] if event == 'import' else ''} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and not _inside(path):
                raise PermissionError(f"sandbox: writing {path} is not allowed")
            if isinstance(path, (str, bytes)):
                p = os.path.realpath(os.fsdecode(path))
                parts = p.split(os.sep)
                if len(parts) > 2 and parts[1] == "proc" and parts[2] not in (me, "self", "thread-self"):
                    raise PermissionError(f"sandbox: reading {path} is not allowed")
        elif event in _PATH_EVENTS:
            for a in args[:2]:
                if isinstance(a, (str, bytes)) and not _inside(a):
                    raise PermissionError(f"sandbox: {event} on {a} is not allowed")
    marker = cfg["marker"].encode()
    del cfg
    sys.addaudithook(_hook)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:
        try:
            sys.stderr.write(f"{type(e).__name__}: {str(e)[:500]}\n"); sys.stderr.flush()
        except BaseException:
            pass
        os._exit(1)
    try:
        sys.stdout.flush()
    except BaseException:
        os._exit(1)
    os.write(1, b"\n" + marker)
    os._exit(0)
_main()
'''


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `source` in a sandboxed child (module doc); blocks at most about limits.wall_s."""
    work = tempfile.mkdtemp(prefix="masa_sandbox_")  # 0700, ours: holds the child's stdout / stderr files
    try:
        cwd = os.path.join(work, "cwd")
        os.mkdir(cwd, 0o700)
        if os.geteuid() == 0:
            os.chown(cwd, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        marker = "MASA_SANDBOX_DONE " + secrets.token_hex(16)
        cfg = dict(uid=UNPRIVILEGED_UID, cpu_s=int(limits.cpu_s), mem=int(limits.memory_bytes),
                   fsize=int(limits.file_bytes), nofile=int(limits.open_files), nproc=int(limits.processes),
                   marker=marker)
        payload = (json.dumps(cfg) + "\n" + source).encode("utf-8", errors="replace")
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD], stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, cwd=cwd, env={"LANG": "C.UTF-8"}, start_new_session=True,
                                    close_fds=True)
            timed_out = False
            try:
                proc.communicate(payload, timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BrokenPipeError:  # the child died before reading the program
                pass
            finally:
                _kill_group(proc.pid)
                proc.wait()
        stdout_tail = _tail(out_path, len(marker) + 1)
        stderr_tail = _tail(err_path, 2000)
        if timed_out:
            status = "timeout"
        elif proc.returncode == 97:
            status = "sandbox"
        elif proc.returncode == 0 and stdout_tail == "\n" + marker:
            status = "passed"
        elif proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # past RLIMIT_CPU's soft / hard limit
            status = "timeout"
        else:
            status = "failed"
        return RunResult(status, proc.returncode, stderr_tail)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_programs(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2
                 ) -> list[RunResult]:
    """run_program over `sources`, `workers` children at a time, in order."""
    with concurrent.futures.ThreadPoolExecutor(max(1, int(workers))) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, n: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", errors="replace")
