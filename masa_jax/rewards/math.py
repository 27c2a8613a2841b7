"""Math answer verification: final-answer extraction and a pool of math-verify workers.

The solution reward r_sol (docs/method.md §1) is 1 iff the last ``\\boxed{...}`` answer of a
rollout is mathematically equal to the ground truth. This module

* extracts the final answer in the parent (``answers.extract_answer``: linear-time scans, lengths
  capped, nothing evaluated);
* decides cheap cases in the parent (``answers.quick_decision``: LaTeX-insignificant string
  equality, exact comparison of number literals);
* sends the rest to persistent worker processes that run ``math_verify`` under per-item limits on
  CPU time, not wall-clock time (a loaded host must not turn a correct answer into a timeout), while
  the parent bounds every batch by a wall-clock budget and replaces workers that die, hang or stop.

The pool survives faults from outside its workers: it rebuilds itself when multiprocessing's
forkserver dies or freezes, ``close`` waits for a batch another thread is running, and after
``os.fork`` the child starts workers of its own instead of talking over the parent's pipes.

Model output is untrusted. It is never ``eval``-ed or ``sympify``-ed in the parent; in the workers it
only goes through math-verify's LaTeX path (antlr grammar -> sympy objects), never through
``ExprExtractionConfig`` (that one calls ``sympy.parse_expr``, i.e. ``eval``). Workers run under an
address-space limit, so a giant power fails with MemoryError instead of swapping the host.

Public API: ``verify_batch(responses, answers) -> bool[N]`` and ``MathVerifier``.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import importlib.util
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.spawn
import os
import signal
import threading
import time
import weakref
from typing import Sequence

import numpy as np

from masa_jax import errors
from masa_jax.rewards import math_worker
from masa_jax.rewards.answers import (  # noqa: F401  (re-exported: the answer API lives here too)
    _BOX_CMDS,
    FALLBACK_MODES,
    canonical_text,
    extract_answer,
    judge_answer,
    last_boxed,
    prepare_for_parse,
    quick_decision,
    strip_percent,
    texts_match,
)

_log = logging.getLogger(__name__)

# A busy worker that has not answered for this many times ``per_item_timeout_s`` of wall-clock time is
# not computing (a computing one would have hit its CPU-time limit): it is stopped or starved beyond
# any load we accept, and is killed. Large, so that load alone never gets there.
_STALL_FACTOR = 10
# ``close`` lets a worker start in progress finish for this long (a new forkserver needs about a
# second to import math-verify) before it abandons the start.
_CLOSE_GRACE_S = 2.0
# The counters every metrics dict has (see ``MathVerifier.verify``).
_COUNTS = ("no_answer", "bad_box", "bad_gold", "quick_decisions", "soft_timeouts", "hard_timeouts",
           "stalls", "unfinished", "budget_kills", "errors", "retries", "restarts", "start_timeouts",
           "start_failures", "kills", "forkserver_kills")
# Workers that die before they are ready, one after another, are restarted at once this many times
# (times the pool size); after that each restart waits twice as long as the one before, up to
# _MAX_RESTART_DELAY_S, so that a host that kills every new process is not flooded with them.
_FREE_START_FAILURES = 2
_MAX_RESTART_DELAY_S = 5.0


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """Knobs of the verifier pool.

    num_workers: worker processes (each does one item at a time).
    per_item_timeout_s: hard limit on the CPU time of one item: the kernel (RLIMIT_CPU) ends a worker
        that spends more, even inside C code (a huge bigint power); the item scores False. A busy
        worker that answers nothing for ``_STALL_FACTOR`` times this in wall-clock time is killed too.
    batch_budget_s: wall-clock limit of one ``verify`` call; unfinished items score False.
    mv_timeout_s: soft limit on the CPU time of one item (whole seconds): a CPU timer (SIGPROF)
        interrupts math-verify, the item scores False and the worker lives on. It replaces
        math-verify's own ``signal.alarm`` timeout, which counts wall-clock time and so made rewards
        depend on host load.
    answer_fallback: "boxed" (last \\boxed / \\fbox only, the default), "answer_is" (else the last "the answer
        is ..." phrase) or "last_number" (else the last number in the text, as the authors' code did;
        it rewards truncated rollouts, hence off by default).
    max_answer_chars / max_gold_chars: longer answers are not parsed (scored False, counted).
    worker_memory_mb: address-space headroom of a worker above its size after imports.
    start_method: "forkserver" (default: workers fork from a clean server process that already
        imported math-verify, so a replacement is ready in ~30 ms instead of ~1.5 s; setting the
        server's preload list is process-wide and has no effect once it runs) or "spawn". Never
        "fork": the parent is a JAX process.
    chunk_size: items handed to a worker at once (results still come back one by one).
    startup_timeout_s: a worker that is not ready after this long is replaced; if its start is still
        blocked by then, the forkserver is frozen and is killed (the next start launches a new one).
    """

    num_workers: int = 2
    per_item_timeout_s: float = 8.0
    batch_budget_s: float = 120.0
    mv_timeout_s: int = 2
    answer_fallback: str = "boxed"
    max_answer_chars: int = 1000
    max_gold_chars: int = 2000
    worker_memory_mb: int = 2048
    start_method: str = "forkserver"
    chunk_size: int = 16
    startup_timeout_s: float = 60.0

    def __post_init__(self):
        if self.answer_fallback not in FALLBACK_MODES:
            raise ValueError(f"answer_fallback must be one of {FALLBACK_MODES}, got {self.answer_fallback!r}")
        if self.start_method not in ("spawn", "forkserver"):
            raise ValueError("start_method must be 'spawn' or 'forkserver' (fork is unsafe under JAX)")
        if self.num_workers < 1 or self.chunk_size < 1 or self.mv_timeout_s < 1:
            raise ValueError("num_workers, chunk_size and mv_timeout_s must be >= 1")
        if self.per_item_timeout_s <= 0 or self.batch_budget_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("per_item_timeout_s, batch_budget_s and startup_timeout_s must be positive")


# -------- multiprocessing's forkserver ----------------------------------------------------------------
#
# Workers fork from multiprocessing's forkserver: one per process, shared by every user of the
# "forkserver" start method, and reached through the private handle ``forkserver._forkserver``. The
# standard library copes with a server that died (the next start launches a new one) but not with a
# frozen one (a start waits for it forever), nor with a handle to a process that is not our child
# (after ``os.fork``, or once somebody else reaped a dead server: every start raises
# ChildProcessError). The two functions below handle those cases.

_FORKSERVER_PRELOAD = ("masa_jax.rewards.math_worker", "math_verify", "latex2sympy2_extended.latex2sympy2")


# -------- Workers never import the parent's ``__main__`` -----------------------------------------
#
# multiprocessing tells every new "spawn" or "forkserver" process to import the parent's main module
# first (as ``__mp_main__``), so that targets defined there can be unpickled. Our target lives in
# ``math_worker``, and the parent's main module is ``masa_jax.train`` (JAX: ~250 MB and ~20 s per
# worker) or a user's script, maybe without an ``if __name__ == "__main__"`` guard (it would run again
# in every worker). So the preparation data of our workers' starts leave the main module out. The
# standard library offers no per-process switch: ``spawn.get_preparation_data`` is wrapped once, and the
# wrapper drops the main module only for starts made by the thread that is starting one of our workers.

_our_start = threading.local()
_stdlib_preparation_data = multiprocessing.spawn.get_preparation_data


def _preparation_data(name):
    data = _stdlib_preparation_data(name)
    if getattr(_our_start, "active", False):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


multiprocessing.spawn.get_preparation_data = _preparation_data


def _is_our_child(pid: int) -> bool:
    """True if ``pid`` is a child of this process, running or a zombie (it is not reaped)."""
    if not hasattr(os, "waitid"):  # macOS before Python 3.13: trust the handle, as the stdlib does
        return True
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def _forget_foreign_forkserver() -> None:
    """Drops a forkserver handle whose process is not our child, so that the next start launches a
    server of our own. Only this process's copy of the handle's pipe is closed: the server itself (the
    parent's, after a fork) is left alone."""
    server = multiprocessing.forkserver._forkserver
    pid = server._forkserver_pid
    if pid is None or _is_our_child(pid):
        return
    with server._lock:
        if server._forkserver_alive_fd is not None:
            with contextlib.suppress(OSError):
                os.close(server._forkserver_alive_fd)
        server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None


def _kill_forkserver() -> bool:
    """SIGKILLs the forkserver if this process started it (a frozen one blocks every start; the next
    start launches a new one); True if it did. The workers it forked live on as orphans (see
    ``_kill_process``)."""
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    if pid is None or not _is_our_child(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    # Wait, without reaping, until it is a zombie: the next start must see it dead, not talk to it.
    deadline = time.monotonic() + 2.0
    with contextlib.suppress(ChildProcessError):
        while (os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
    return True


# -------- The pool --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    """One worker process and the pool's view of it."""

    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection  # the pool's end: EOF once the worker has exited
    started_at: float
    starter: threading.Thread | None = None  # runs proc.start(), which waits for the forkserver
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)  # ends a delayed start
    ready: bool = False
    gone: bool = False  # EOF seen: the worker exited, or never started
    chunk: list = dataclasses.field(default_factory=list)  # task ids not answered yet, in order
    item_t0: float = 0.0  # when the worker began chunk[0]

    @property
    def starting(self) -> bool:
        return self.starter is not None and self.starter.is_alive()


def _start_process(proc, child_conn, delay_s: float, cancel: threading.Event) -> None:
    """Runs in a helper thread. With the forkserver start method ``Process.start`` waits for the
    server, forever if the server is frozen; the pool waits for the worker's "ready" with a timeout
    instead, and kills the server when it runs out. The start waits ``delay_s`` first (the back-off
    after repeated start-up deaths) unless ``cancel`` is set meanwhile."""
    try:
        if cancel.wait(delay_s):
            return  # stopped before it started
        _our_start.active = True  # this thread's starts leave the parent's main module out
        proc.start()
    except Exception as e:  # noqa: BLE001  (a dead, killed or foreign forkserver: the pool retries)
        _log.warning("a math-verify worker did not start: %r", e)
    finally:
        child_conn.close()  # the worker has its own copy; if it never started, the pool sees EOF now


def _still_connected(slot: _Slot) -> bool:
    """False once the worker's end of the pipe is closed, i.e. the process has exited. Pending
    messages are dropped: the worker is being stopped."""
    try:
        while slot.conn.poll():
            slot.conn.recv()
    except (EOFError, OSError):
        return False
    return True


def _kill_process(slot: _Slot) -> None:
    """SIGKILL (a worker stuck in C code ignores everything else), then reap."""
    proc = slot.proc
    if proc.pid is None:
        return  # never started
    if proc.exitcode is None:
        proc.kill()
    elif not slot.gone and _still_connected(slot):
        # Its forkserver died, and with it the pipe that reports the worker's exit: multiprocessing
        # believes the worker dead and proc.kill() no longer signals it, but it holds its end of our
        # pipe, so it is alive and its pid is still its own.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=0.5)


@dataclasses.dataclass
class _Batch:
    """The state of one ``verify`` call."""

    keys: list  # task id -> (pred, gold)
    tag: tuple  # (pid, batch number): a reply carrying another tag is stale and dropped
    deadline: float
    m: collections.Counter
    pending: collections.deque = dataclasses.field(default_factory=collections.deque)
    results: dict = dataclasses.field(default_factory=dict)  # task id -> correct
    crashed: set = dataclasses.field(default_factory=set)  # task ids whose worker died under them


class VerifierClosed(RuntimeError):
    """``verify`` on a closed ``MathVerifier``."""


_pools: weakref.WeakSet = weakref.WeakSet()  # live pools, for the fork hook at the end of the module


class MathVerifier:
    """A persistent pool of math-verify workers. ``verify(responses, answers)`` -> (bool[N], metrics).

    Thread-safe: ``verify`` may be called from any thread (calls are serialised by a lock; the workers,
    not the caller, need a main thread) and ``close`` waits for a batch in flight. In a child of
    ``os.fork`` the pool starts workers of its own and never touches the parent's. Call ``close()``
    (or use it as a context manager) to stop the workers; ``wait_ready()`` blocks until they have
    imported math-verify.
    """

    def __init__(self, config: VerifierConfig | None = None, **overrides):
        cfg = config or VerifierConfig()
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg
        if importlib.util.find_spec("math_verify") is None:  # else every worker would die at start-up
            raise errors.UserError("math-verify is not installed in this Python (pip install -e .)")
        self._ctx = multiprocessing.get_context(self.config.start_method)
        if self.config.start_method == "forkserver":
            self._ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # a different pid means we are a fork's child (see _check_fork)
        self._batch_numbers = itertools.count()
        self._slots: list[_Slot] = []
        self._failed_starts = 0  # workers in a row that died before they were ready (the back-off)
        self._start_missing_workers()
        _pools.add(self)

    # -- worker life cycle ----------------------------------------------------------------------
    def _start_worker(self, delay_s: float = 0.0) -> _Slot:
        """A new slot whose worker starts in the background after ``delay_s`` (``_start_process``)."""
        _forget_foreign_forkserver()
        cfg = self.config
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=math_worker.worker_main,
            args=(child_conn, cfg.mv_timeout_s, cfg.per_item_timeout_s, cfg.worker_memory_mb),
            daemon=True, name="masa-math-verify")
        slot = _Slot(proc=proc, conn=parent_conn, started_at=time.monotonic() + delay_s)
        slot.starter = threading.Thread(target=_start_process, args=(proc, child_conn, delay_s, slot.cancel),
                                        daemon=True, name="masa-math-verify-start")
        slot.starter.start()
        return slot

    def _start_missing_workers(self) -> None:
        while len(self._slots) < self.config.num_workers:
            self._slots.append(self._start_worker())

    def _stop(self, slot: _Slot, m: collections.Counter | None = None, *,
              kill_frozen_server: bool = True) -> None:
        """Stops a slot's worker for good (idempotent)."""
        if slot.conn.closed:
            return
        slot.cancel.set()
        if slot.starting and time.monotonic() < slot.started_at:
            slot.starter.join(1.0)  # still in its back-off delay: it returns at once, never started
        if slot.starting and (slot.ready or slot.gone):
            slot.starter.join(2.0)  # the start got somewhere (the worker spoke, or it failed): finishing
        if slot.starting and kill_frozen_server and self.config.start_method == "forkserver":
            # Still blocked, after the caller's wait: the forkserver is frozen. Killed, it fails the
            # start at once (and the next start launches a new server).
            if _kill_forkserver() and m is not None:
                m["forkserver_kills"] += 1
            slot.starter.join(2.0)
        if not slot.starting:  # else abandoned: a worker that starts later finds its pipe closed, exits
            _kill_process(slot)
        slot.conn.close()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._drop_inherited_workers()

    def _drop_inherited_workers(self) -> None:
        """In a child of ``os.fork`` the slots are the parent's workers and pipes. Using them would mix
        this process's requests and replies with the parent's, and stopping them would break the
        parent's pool; so only this process's copies of the pipe ends are closed, and workers of our
        own start on first use."""
        self._pid = os.getpid()
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork
        for slot in self._slots:
            with contextlib.suppress(OSError):
                slot.conn.close()
            # else multiprocessing would terminate the parent's (daemon) workers when we exit
            multiprocessing.process._children.discard(slot.proc)
        self._slots = []

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Blocks until every worker has imported math-verify (or the timeout); True if all are."""
        deadline = time.monotonic() + timeout_s
        self._check_fork()
        with self._lock:
            if self._closed:
                return False
            self._start_missing_workers()
            for slot in self._slots:
                try:
                    while not slot.ready and slot.conn.poll(max(0.0, deadline - time.monotonic())):
                        slot.ready = slot.conn.recv()[0] == "ready"
                except (EOFError, OSError):
                    slot.gone = True
                    return False  # died while starting; ``verify`` replaces it
                if slot.starting:  # the worker can say "ready" before proc.start() has returned
                    slot.starter.join(max(0.0, deadline - time.monotonic()))
            return all(slot.ready and not slot.starting for slot in self._slots)

    def close(self) -> None:
        """Stops all workers (idempotent); waits for a batch that another thread is running."""
        self._check_fork()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for slot in self._slots:
                if slot.ready and not slot.gone:
                    with contextlib.suppress(OSError):  # a dead worker's pipe is broken
                        slot.conn.send(("stop",))
            for slot in self._slots:
                if slot.starting:  # let a start in progress finish, so that its worker is stopped too
                    slot.starter.join(_CLOSE_GRACE_S)
                elif slot.proc.pid is not None:
                    slot.proc.join(timeout=1.0)  # exits on "stop"
                # A start still blocked is abandoned: the server may be slow, not frozen, and other
                # pools may be using it.
                self._stop(slot, kill_frozen_server=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- verification -----------------------------------------------------------------------------
    def verify(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[np.ndarray, dict]:
        """Judges ``responses[i]`` against ground truth ``answers[i]``.

        Returns ``correct: bool[N]`` and a metrics dict of counts: n, no_answer, bad_box (unclosed or
        too long), bad_gold, quick_decisions (decided in the parent), parsed_checks (unique pairs sent
        to workers), correct, soft_timeouts (CPU-time limit ``mv_timeout_s``), hard_timeouts (CPU-time
        limit ``per_item_timeout_s``: worker ended), stalls (a busy worker that stopped running),
        unfinished (batch budget spent), budget_kills, errors, retries (items re-run after their
        worker died), kills (workers SIGKILLed from outside mid-item; the item runs again), restarts
        (workers replaced), start_timeouts, start_failures (workers that died before they were
        ready), forkserver_kills (frozen server);
        and worker_cpu_s, seconds. A timed-out, unfinished or failing item scores False. Never blocks
        much past ``batch_budget_s``. Raises ``VerifierClosed`` after ``close()``.
        """
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        self._check_fork()
        with self._lock:
            if self._closed:
                raise VerifierClosed("MathVerifier is closed")
            self._start_missing_workers()
            return self._verify(responses, answers)

    def _verify(self, responses, answers):
        cfg = self.config
        t_start = time.monotonic()
        n = len(responses)
        correct = np.zeros(n, dtype=bool)
        m = collections.Counter(n=n)
        tasks: dict[tuple[str, str], list[int]] = {}
        for i, (resp, gold) in enumerate(zip(responses, answers)):
            pred = extract_answer(resp, cfg.answer_fallback, cfg.max_answer_chars)
            gold = gold if isinstance(gold, str) else ""
            if pred is None:
                has_box = isinstance(resp, str) and any(c in resp for c in _BOX_CMDS)
                m["bad_box" if has_box else "no_answer"] += 1  # bad: unclosed or too long
            elif not gold.strip() or len(gold) > cfg.max_gold_chars:
                m["bad_gold"] += 1
            elif (quick := quick_decision(pred, gold)) is not None:  # common in RL: no IPC, no sympy
                m["quick_decisions"] += 1
                correct[i] = quick
            else:
                tasks.setdefault((pred, gold), []).append(i)
        keys = list(tasks)
        m["parsed_checks"] = len(keys)
        results = self._run(keys, t_start + cfg.batch_budget_s, m) if keys else {}
        for tid, ok in results.items():
            correct[tasks[keys[tid]]] = ok
        m["correct"] = int(correct.sum())
        metrics = {k: int(v) for k, v in m.items() if k != "worker_cpu_s"}
        metrics["worker_cpu_s"] = float(m["worker_cpu_s"])
        for k in _COUNTS:
            metrics.setdefault(k, 0)
        metrics["seconds"] = time.monotonic() - t_start
        return correct, metrics

    def _run(self, keys: list, deadline: float, m: collections.Counter) -> dict[int, bool]:
        """Farms task ids 0..len(keys)-1 out to the workers until done or ``deadline``."""
        b = _Batch(keys=keys, tag=(os.getpid(), next(self._batch_numbers)), deadline=deadline, m=m,
                   pending=collections.deque(range(len(keys))))
        while (b.pending or any(s.chunk for s in self._slots)) and time.monotonic() < deadline:
            self._hand_out(b)
            self._wait(b)
            for i in range(len(self._slots)):
                self._check(i, b)
        # Budget spent: busy workers are mid-item; replace them so the next batch need not wait.
        for i, slot in enumerate(self._slots):
            if slot.chunk:
                self._replace(i, b, "budget_kills")
        m["unfinished"] += len(keys) - len(b.results)
        return b.results

    def _hand_out(self, b: _Batch) -> None:
        """Gives each idle, ready worker a chunk of the pending task ids."""
        cfg = self.config
        for slot in self._slots:
            if slot.ready and not slot.chunk and b.pending:
                size = min(cfg.chunk_size, -(-len(b.pending) // cfg.num_workers), len(b.pending))
                slot.chunk = [b.pending.popleft() for _ in range(size)]
                try:
                    slot.conn.send(("chunk", b.tag, [(t, *b.keys[t]) for t in slot.chunk]))
                except OSError:  # died idle: requeue; ``_check`` replaces it
                    b.pending.extendleft(reversed(slot.chunk))
                    slot.chunk = []
                slot.item_t0 = time.monotonic()

    def _wait(self, b: _Batch) -> None:
        """Sleeps until a worker speaks or exits, or until the next deadline."""
        cfg = self.config
        wake = [b.deadline]
        for slot in self._slots:
            if slot.chunk:
                wake.append(slot.item_t0 + _STALL_FACTOR * cfg.per_item_timeout_s)
            elif not slot.ready:
                wake.append(slot.started_at + cfg.startup_timeout_s)
        timeout = max(0.0, min(wake) - time.monotonic())
        multiprocessing.connection.wait([slot.conn for slot in self._slots], timeout=timeout)

    def _check(self, i: int, b: _Batch) -> None:
        """Takes in worker i's messages; replaces it if it exited, stalled or never got ready."""
        cfg = self.config
        slot = self._slots[i]
        self._read(slot, b)
        if slot.ready:
            self._failed_starts = 0
        now = time.monotonic()
        if slot.gone:
            self._on_exit(i, b)
        elif slot.chunk and now - slot.item_t0 > _STALL_FACTOR * cfg.per_item_timeout_s:
            b.results[slot.chunk.pop(0)] = False
            b.m["stalls"] += 1
            self._replace(i, b, "restarts")
        elif not slot.ready and now - slot.started_at > cfg.startup_timeout_s:
            b.m["start_timeouts"] += 1
            self._replace(i, b, "restarts")

    @staticmethod
    def _read(slot: _Slot, b: _Batch) -> None:
        """Reads "ready" and the reply to the running item; drops anything else (stale replies)."""
        try:
            while slot.conn.poll():
                msg = slot.conn.recv()
                if msg[0] == "ready":
                    slot.ready = True
                elif msg[0] == "res" and slot.chunk and msg[1:3] == (b.tag, slot.chunk[0]):
                    _, _, tid, status, ok, cpu = msg
                    b.results[tid] = ok
                    b.m["worker_cpu_s"] += cpu
                    b.m["errors"] += status == "error"
                    b.m["soft_timeouts"] += status == "cpu_timeout"
                    slot.chunk.pop(0)
                    slot.item_t0 = time.monotonic()
        except (EOFError, OSError):
            slot.gone = True

    def _on_exit(self, i: int, b: _Batch) -> None:
        """Worker i has exited; it is replaced, and no exit ever fails the batch. Its running item
        scores False if the kernel ended the worker for CPU time (a hang) or if the item already cost
        a worker a crash before (it crashes workers). Otherwise it runs again: a SIGKILL always comes
        from outside (an item's own limits end it by SIGXCPU or MemoryError), and other deaths may
        have had nothing to do with it (a lost forkserver). The batch deadline bounds the retries."""
        slot = self._slots[i]
        self._stop(slot, b.m)  # reaps it: the exit code tells the CPU-time limit from a crash
        delay_s = 0.0
        if slot.chunk:
            tid = slot.chunk.pop(0)
            exitcode = slot.proc.exitcode
            if exitcode == -signal.SIGXCPU:
                b.results[tid] = False
                b.m["hard_timeouts"] += 1
            elif exitcode == -signal.SIGKILL:
                b.pending.appendleft(tid)
                b.m["kills"] += 1
                b.m["retries"] += 1
            elif tid in b.crashed:
                b.results[tid] = False
                b.m["errors"] += 1
            else:
                b.crashed.add(tid)
                b.pending.appendleft(tid)
                b.m["retries"] += 1
        elif not slot.ready:
            b.m["start_failures"] += 1
            self._failed_starts += 1
            over = self._failed_starts - _FREE_START_FAILURES * self.config.num_workers
            if over > 0:
                delay_s = min(_MAX_RESTART_DELAY_S, 0.05 * 2 ** min(over, 10))
        self._replace(i, b, "restarts", delay_s)

    def _replace(self, i: int, b: _Batch, reason: str, delay_s: float = 0.0) -> None:
        """Stops worker i and starts another; the items of its chunk go back to the queue."""
        slot = self._slots[i]
        b.pending.extendleft(reversed(slot.chunk))
        slot.chunk = []
        self._stop(slot, b.m)
        self._slots[i] = self._start_worker(delay_s)
        b.m[reason] += 1


# -------- Module-level default pool ---------------------------------------------------------------

_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier(**opts) -> MathVerifier:
    """The lazily created shared pool; re-created when ``opts`` ask for another config. The pool it
    replaces is closed once a batch that another thread runs on it has finished."""
    global _default
    cfg = VerifierConfig(**opts)
    with _default_lock:
        old = _default
        if old is not None and old.config == cfg and not old._closed:
            return old
        _default = new = MathVerifier(cfg)
    if old is not None:
        old.close()  # outside the lock: it waits for the other thread's batch
    return new


def close_default() -> None:
    """Stops the shared pool (registered with atexit)."""
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.close()


atexit.register(close_default)


def _after_fork_in_child() -> None:
    # Runs in the child right after os.fork, while it has a single thread: locks a parent thread held
    # would never be released here, and the pools must let go of the parent's workers before anything
    # (an atexit handler, say) touches them.
    global _default_lock
    _default_lock = threading.Lock()
    for pool in list(_pools):
        pool._drop_inherited_workers()


os.register_at_fork(after_in_child=_after_fork_in_child)


def verify_batch(responses: Sequence[str], answers: Sequence[str], *, return_metrics: bool = False,
                 **opts):
    """``correct: bool[N]`` — response i's final answer equals ``answers[i]`` (see ``MathVerifier``).

    ``opts`` are ``VerifierConfig`` fields for the shared default pool. With ``return_metrics=True``
    returns ``(correct, metrics)``.
    """
    for attempt in range(10):
        try:
            correct, metrics = default_verifier(**opts).verify(responses, answers)
            break
        except VerifierClosed:  # another thread replaced the shared pool between lookup and call
            if attempt == 9:
                raise
    return (correct, metrics) if return_metrics else correct
