"""Math answer verification: final-answer extraction and a pool of math-verify workers.

The solution reward r_sol of the method doc (section 1) is 1 iff the last ``\\boxed{...}`` answer of a
rollout is mathematically equal to the ground truth. This module

* extracts the final answer in the parent (``answers.extract_answer``: linear-time scans, lengths
  capped, nothing evaluated);
* decides cheap cases in the parent (``answers.quick_decision``: LaTeX-insignificant string
  equality, exact comparison of number literals);
* sends the rest to persistent worker processes that run ``math_verify`` in their main thread
  (it times out with ``signal.alarm``), with a hard per-item deadline and a per-batch time budget
  enforced by the parent, which kills and replaces a hung worker and never waits past the budget.

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
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Sequence

import numpy as np

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


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    """Knobs of the verifier pool.

    num_workers: worker processes (each does one item at a time).
    per_item_timeout_s: hard wall-clock limit per item, enforced by the parent (kill + respawn).
    batch_budget_s: wall-clock limit of one ``verify`` call; unfinished items score False.
    mv_timeout_s: math-verify's own ``signal.alarm`` timeout per parse / compare call (whole seconds).
    fallback: "boxed" (last \\boxed / \\fbox only, the default), "answer_is" (else the last "the answer
        is ..." phrase) or "last_number" (else the last number in the text, as the authors' code did;
        it rewards truncated rollouts, hence off by default).
    max_answer_chars / max_gold_chars: longer answers are not parsed (scored False, counted).
    worker_memory_mb: address-space headroom of a worker above its size after imports.
    start_method: "forkserver" (default: workers fork from a clean server process that already
        imported math-verify, so a replacement is ready in ~30 ms instead of ~1.5 s; setting the
        server's preload list is process-wide and has no effect once it runs) or "spawn". Never
        "fork": the parent is a JAX process.
    chunk_size: items handed to a worker at once (results still come back one by one).
    startup_timeout_s: a worker that is not ready after this long is replaced.
    """

    num_workers: int = 2
    per_item_timeout_s: float = 8.0
    batch_budget_s: float = 120.0
    mv_timeout_s: int = 2
    fallback: str = "boxed"
    max_answer_chars: int = 1000
    max_gold_chars: int = 2000
    worker_memory_mb: int = 2048
    start_method: str = "forkserver"
    chunk_size: int = 16
    startup_timeout_s: float = 60.0

    def __post_init__(self):
        if self.fallback not in FALLBACK_MODES:
            raise ValueError(f"fallback must be one of {FALLBACK_MODES}, got {self.fallback!r}")
        if self.start_method not in ("spawn", "forkserver"):
            raise ValueError("start_method must be 'spawn' or 'forkserver' (fork is unsafe under JAX)")
        if self.num_workers < 1 or self.chunk_size < 1 or self.mv_timeout_s < 1:
            raise ValueError("num_workers, chunk_size and mv_timeout_s must be >= 1")
        if self.per_item_timeout_s <= 0 or self.batch_budget_s <= 0:
            raise ValueError("per_item_timeout_s and batch_budget_s must be positive")


class _TimeoutCounter(logging.Handler):
    """Counts math-verify's own (soft) timeouts, which it logs instead of raising; also keeps its
    warnings, which quote the whole model output, off stderr."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record):
        if str(record.msg).startswith("Timeout"):
            self.count += 1


def _limit_memory(headroom_mb: int) -> None:
    import resource

    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(conn, mv_timeout_s: int, memory_mb: int) -> None:
    """Worker loop: receive ("chunk", [(tid, pred, gold), ...]); answer ("res", tid, status, ok, soft
    timeouts, cpu seconds) per item, in order, so the parent knows which item is running (its
    deadline clock)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    from math_verify.errors import TimeoutException  # import before the memory cap and "ready"

    counter = _TimeoutCounter()
    mv_logger = logging.getLogger("math_verify")
    mv_logger.addHandler(counter)
    mv_logger.propagate = False
    if memory_mb > 0 and os.path.exists("/proc/self/statm"):
        _limit_memory(memory_mb)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent is gone
        if msg[0] != "chunk":
            return
        for tid, pred, gold in msg[1]:
            counter.count = 0
            cpu0 = time.process_time()
            try:
                ok, status = judge_answer(pred, gold, mv_timeout_s=mv_timeout_s), "ok"
            except (Exception, TimeoutException):  # untrusted input can break sympy anywhere
                ok, status = False, "error"
            try:
                conn.send(("res", tid, status, bool(ok), counter.count, time.process_time() - cpu0))
            except (BrokenPipeError, OSError):
                return


# -------- The pool --------------------------------------------------------------------------------


_FORKSERVER_PRELOAD = ("masa_jax.rewards.math", "masa_jax.rewards.answers", "math_verify",
                       "latex2sympy2_extended.latex2sympy2")


@dataclasses.dataclass
class _Slot:
    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False
    chunk: list = dataclasses.field(default_factory=list)  # task ids not answered yet, in order
    item_t0: float = 0.0  # when the worker began chunk[0]


class MathVerifier:
    """A persistent pool of math-verify workers. ``verify(responses, answers)`` -> (bool[N], metrics).

    ``verify`` may be called from any thread (calls are serialised by a lock; the workers, not the
    caller, need a main thread). Call ``close()`` (or use it as a context manager) to stop the
    workers; ``wait_ready()`` blocks until they have imported math-verify.
    """

    def __init__(self, config: VerifierConfig | None = None, **overrides):
        cfg = config or VerifierConfig()
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self._ctx = multiprocessing.get_context(self.config.start_method)
        if self.config.start_method == "forkserver":
            self._ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))
        self._lock = threading.Lock()
        self._closed = False
        self._slots: list[_Slot] = [self._start_worker() for _ in range(self.config.num_workers)]

    # -- worker life cycle ----------------------------------------------------------------------
    def _start_worker(self) -> _Slot:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self.config.mv_timeout_s, self.config.worker_memory_mb),
            daemon=True, name="masa-math-verify")
        proc.start()
        child_conn.close()  # so the parent sees EOF when the child dies
        return _Slot(proc=proc, conn=parent_conn, started_at=time.monotonic())

    @staticmethod
    def _kill(slot: _Slot) -> None:
        slot.proc.kill()  # SIGKILL: a worker stuck in C code (huge bigint pow) ignores SIGALRM
        slot.proc.join(timeout=0.5)
        slot.conn.close()

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Blocks until every worker has imported math-verify (or the timeout); True if all are."""
        deadline = time.monotonic() + timeout_s
        for slot in self._slots:
            while not slot.ready and slot.conn.poll(max(0.0, deadline - time.monotonic())):
                try:
                    slot.ready = slot.conn.recv()[0] == "ready"
                except (EOFError, OSError):
                    return False  # died while starting; ``verify`` replaces it
        return all(slot.ready for slot in self._slots)

    def close(self) -> None:
        """Stops all workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            with contextlib.suppress(OSError):  # a dead worker's pipe is broken: kill reaps it
                slot.conn.send(("stop",))
        for slot in self._slots:
            slot.proc.join(timeout=1.0)
            self._kill(slot)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- verification -----------------------------------------------------------------------------
    def verify(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[np.ndarray, dict]:
        """Judges ``responses[i]`` against ground truth ``answers[i]``.

        Returns ``correct: bool[N]`` and a metrics dict (counts: n, no_answer, bad_box (unclosed or
        too long), bad_gold, quick_decisions (decided in the parent), parsed_checks (unique pairs sent
        to workers), correct, soft_timeouts (math-verify's own), hard_timeouts (worker killed),
        unfinished (batch budget spent), budget_kills, errors, restarts; worker_cpu_s, seconds). A
        timed-out, unfinished or failing item scores False. Never blocks much past
        ``batch_budget_s``.
        """
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self._closed:
            raise RuntimeError("MathVerifier is closed")
        with self._lock:
            return self._verify(responses, answers)

    def _verify(self, responses, answers):
        cfg = self.config
        t_start = time.monotonic()
        n = len(responses)
        correct = np.zeros(n, dtype=bool)
        m = collections.Counter(n=n)
        tasks: dict[tuple[str, str], list[int]] = {}
        for i, (resp, gold) in enumerate(zip(responses, answers)):
            pred = extract_answer(resp, cfg.fallback, cfg.max_answer_chars)
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
        for k in ("no_answer", "bad_box", "bad_gold", "quick_decisions", "soft_timeouts",
                  "hard_timeouts", "unfinished", "budget_kills", "errors", "restarts"):
            metrics.setdefault(k, 0)
        metrics["seconds"] = time.monotonic() - t_start
        return correct, metrics

    def _run(self, keys: list, deadline: float, m: collections.Counter) -> dict[int, bool]:
        """Farms task ids 0..len(keys)-1 out to the workers until done or ``deadline``."""
        cfg = self.config
        pending = collections.deque(range(len(keys)))
        results: dict[int, bool] = {}
        startup_failures = 0

        def replace(i: int, reason: str) -> None:
            slot = self._slots[i]
            pending.extendleft(reversed(slot.chunk[1:]))  # the item that was running is lost
            self._kill(slot)
            self._slots[i] = self._start_worker()
            m[reason] += 1

        while pending or any(s.chunk for s in self._slots):
            now = time.monotonic()
            if now >= deadline:
                break
            for slot in self._slots:  # hand out work to idle, ready workers
                if slot.ready and not slot.chunk and pending:
                    size = min(cfg.chunk_size, -(-len(pending) // cfg.num_workers))
                    slot.chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
                    try:
                        slot.conn.send(("chunk", [(t, *keys[t]) for t in slot.chunk]))
                    except (BrokenPipeError, OSError):  # died idle: requeue, replaced below
                        pending.extendleft(reversed(slot.chunk))
                        slot.chunk = []
                    slot.item_t0 = time.monotonic()
            wake = [deadline]
            for slot in self._slots:
                wake.append(slot.item_t0 + cfg.per_item_timeout_s if slot.chunk else
                            slot.started_at + cfg.startup_timeout_s if not slot.ready else deadline)
            timeout = max(0.0, min(wake) - time.monotonic())
            waitables = [s.conn for s in self._slots] + [s.proc.sentinel for s in self._slots]
            multiprocessing.connection.wait(waitables, timeout=timeout)
            for i, slot in enumerate(self._slots):
                dead = False
                try:
                    while slot.conn.poll():
                        msg = slot.conn.recv()
                        if msg[0] == "ready":
                            slot.ready = True
                        elif msg[0] == "res" and slot.chunk and msg[1] == slot.chunk[0]:
                            _, tid, status, ok, soft, cpu = msg
                            results[tid] = ok
                            m["worker_cpu_s"] += cpu
                            m["errors"] += status != "ok"
                            m["soft_timeouts"] += soft
                            slot.chunk.pop(0)
                            slot.item_t0 = time.monotonic()
                except (EOFError, OSError):
                    dead = True
                now = time.monotonic()
                if dead or not slot.proc.is_alive():
                    if slot.chunk:  # crashed mid-item (e.g. segfault): that item is an error
                        results[slot.chunk[0]] = False
                        m["errors"] += 1
                    elif not slot.ready:
                        startup_failures += 1
                        if startup_failures > 2 * cfg.num_workers + 2:
                            raise RuntimeError("math-verify workers keep dying during start-up; "
                                               "is math-verify importable in a fresh interpreter?")
                    replace(i, "restarts")
                elif slot.chunk and now - slot.item_t0 > cfg.per_item_timeout_s:
                    results[slot.chunk[0]] = False
                    m["hard_timeouts"] += 1
                    replace(i, "restarts")
                elif not slot.ready and now - slot.started_at > cfg.startup_timeout_s:
                    replace(i, "restarts")
        # Budget spent: busy workers are mid-item; replace them so no stale answer reaches a later call.
        for i, slot in enumerate(self._slots):
            if slot.chunk:
                replace(i, "budget_kills")
        m["unfinished"] += len(keys) - len(results)
        return results


# -------- Module-level default pool ---------------------------------------------------------------

_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier(**opts) -> MathVerifier:
    """The lazily created shared pool; re-created when ``opts`` ask for another config."""
    global _default
    with _default_lock:
        cfg = VerifierConfig(**opts)
        if _default is None or _default.config != cfg or _default._closed:
            if _default is not None:
                _default.close()
            _default = MathVerifier(cfg)
        return _default


def close_default() -> None:
    """Stops the shared pool (registered with atexit)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None


atexit.register(close_default)


def verify_batch(responses: Sequence[str], answers: Sequence[str], *, return_metrics: bool = False,
                 **opts):
    """``correct: bool[N]`` — response i's final answer equals ``answers[i]`` (see ``MathVerifier``).

    ``opts`` are ``VerifierConfig`` fields for the shared default pool. With ``return_metrics=True``
    returns ``(correct, metrics)``.
    """
    correct, metrics = default_verifier(**opts).verify(responses, answers)
    return (correct, metrics) if return_metrics else correct
