"""The math-verify worker process: the loop the verifier pool's workers run (``masa_jax.rewards.math``).

A module of its own, importing only the standard library and ``answers`` (and math-verify inside the
worker), because a worker is a fresh process that imports the module its target lives in: a worker
started from a module that imports JAX would cost ~250 MB and ~20 s to become ready instead of ~60 MB
and a few seconds. (The pool also keeps multiprocessing from re-importing the parent's ``__main__``
in the worker: see ``math._without_parent_main``.)

Protocol, over one duplex pipe: the worker sends ("ready", pid) once math-verify is imported, then
for each ("chunk", tag, [(tid, pred, gold), ...]) answers ("res", tag, tid, status, ok, cpu_s) per
item, in order; ("stop",) or EOF ends it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal

from masa_jax.rewards.answers import judge_answer


class _CpuTimeLimit(BaseException):
    """Raised in a worker when an item has used its soft CPU time. A BaseException, like math-verify's
    own TimeoutException, so that the ``except Exception`` clauses of math-verify and sympy let it
    through."""


_cpu_limit_armed = False  # the SIGPROF handler raises only while an item runs


def _on_cpu_limit(signum, frame):
    global _cpu_limit_armed
    if _cpu_limit_armed:  # once per item; a tick that lands after the item ended is ignored
        _cpu_limit_armed = False
        raise _CpuTimeLimit


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set_cpu_kill_limit(seconds: float | None) -> None:
    """RLIMIT_CPU: the kernel sends SIGXCPU (fatal) once this process has used ``seconds`` more CPU
    time; ``None`` lifts the limit (up to a hard limit set from outside, if any)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = hard if seconds is None else int(_cpu_seconds() + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _judge_under_cpu_limits(pred: str, gold: str, soft_s: float, hard_s: float) -> tuple[bool, str]:
    """Judges one item in a worker: (correct, status), status "ok", "error" or "cpu_timeout".

    Both limits count CPU time, which does not grow while the host is busy with other work, so a
    correct answer stays correct under load. math-verify's own wall-clock alarm is off
    (``mv_timeout_s=0``); the SIGPROF timer takes its place and the kernel's RLIMIT_CPU backs it up
    where Python code no longer runs."""
    global _cpu_limit_armed
    _set_cpu_kill_limit(hard_s)
    _cpu_limit_armed = True
    signal.setitimer(signal.ITIMER_PROF, soft_s)
    try:
        try:
            return judge_answer(pred, gold, mv_timeout_s=0), "ok"
        except Exception:  # untrusted input can break sympy anywhere
            return False, "error"
    except _CpuTimeLimit:  # also when the timer fires inside the ``except Exception`` clause
        return False, "cpu_timeout"
    finally:
        # First: CPython runs signal handlers only at calls and jumps, so none can raise before this.
        _cpu_limit_armed = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        _set_cpu_kill_limit(None)  # an idle worker has nothing to limit


def _limit_memory(headroom_mb: int) -> None:
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker_main(conn, soft_s: int, hard_s: float, memory_mb: int) -> None:
    """Worker loop: receive ("chunk", tag, [(tid, pred, gold), ...]); answer ("res", tag, tid, status,
    ok, cpu seconds) per item, in order, so the parent knows which item is running (its deadline
    clock). ``tag`` names the batch: the parent drops a reply that carries another batch's tag."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGPROF, _on_cpu_limit)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # the hard CPU-time limit ends the worker ...
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ... without writing a core file
    import math_verify  # noqa: F401  (before the memory cap and "ready"; a forkserver preloaded it)

    mv_logger = logging.getLogger("math_verify")  # its warnings quote the whole model output
    mv_logger.addHandler(logging.NullHandler())
    mv_logger.propagate = False
    if memory_mb > 0 and os.path.exists("/proc/self/statm"):
        _limit_memory(memory_mb)
    with contextlib.suppress(OSError):  # the pool gave up on us: recv below sees EOF
        conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the pool is gone
        if msg[0] != "chunk":
            return
        _, tag, items = msg
        for tid, pred, gold in items:
            cpu0 = _cpu_seconds()
            ok, status = _judge_under_cpu_limits(pred, gold, soft_s, hard_s)
            try:
                conn.send(("res", tag, tid, status, bool(ok), _cpu_seconds() - cpu0))
            except OSError:
                return


