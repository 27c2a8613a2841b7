"""The verifier pool under faults from outside its workers (issue #11): a lost or frozen forkserver,
a pool closed under running batches, ``os.fork``, a CPU-starved worker.

Every test bounds its own run time, so a regression fails instead of hanging CI; together they take
about 15 s on two cores.
"""
import contextlib
import dataclasses
import multiprocessing.forkserver
import os
import signal
import threading
import time

import pytest

from masa_jax.rewards import math as math_reward
from masa_jax.rewards.math import MathVerifier

# The nested fractions of test_rewards_pool.py: sympy works on them for > 30 s (in Python code).
HANG = "\\boxed{" + "\\frac{1}{" * 60 + "2" + "}" * 60 + "}"


def _sympy_items(n: int, wrong: bool = False) -> tuple[list[str], list[str]]:
    """n distinct pairs that only math-verify decides (no quick decision in the parent):
    k/sqrt(2) against k*sqrt(2)/2, or against (k+1)*sqrt(2)/2 when ``wrong``."""
    responses = [f"\\boxed{{\\frac{{{k}}}{{\\sqrt{{2}}}}}}" for k in range(1, n + 1)]
    answers = [f"\\frac{{{k + wrong}\\sqrt{{2}}}}{{2}}" for k in range(1, n + 1)]
    return responses, answers


def _forkserver_pid() -> int:
    """multiprocessing's forkserver of this process (a private attribute: the faults target it)."""
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    assert pid is not None
    return pid


def _run_bounded(fn, timeout_s: float):
    """Runs ``fn`` in a thread: (finished, its result, seconds taken)."""
    out = {}
    t0 = time.monotonic()
    thread = threading.Thread(target=lambda: out.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive(), out.get("result"), time.monotonic() - t0


# ---- 9: forkserver death ----------------------------------------------------------------------------


def test_pool_rebuilds_after_losing_its_forkserver_and_workers():
    responses, answers = _sympy_items(12)
    with MathVerifier(num_workers=2, batch_budget_s=30.0) as v:
        assert v.wait_ready(60)
        server = _forkserver_pid()
        # The server and its workers die (say the OOM killer took the group) and the server is reaped
        # by someone else (a SIGCHLD handler): multiprocessing's handle to it is now stale.
        os.kill(server, signal.SIGKILL)
        os.waitpid(server, 0)
        for slot in v._slots:
            os.kill(slot.proc.pid, signal.SIGKILL)
        time.sleep(0.2)
        ok, m = v.verify(responses, answers)
        assert ok.all(), m
        assert m["restarts"] >= 2 and m["unfinished"] == m["errors"] == 0
        assert _forkserver_pid() != server
        ok, m = v.verify(responses, answers)  # the rebuilt pool keeps working
        assert ok.all() and m["restarts"] == 0


def test_forkserver_death_mid_batch_loses_no_item():
    responses, answers = _sympy_items(200)
    with MathVerifier(num_workers=2, batch_budget_s=30.0) as v:
        assert v.wait_ready(60)
        server = _forkserver_pid()
        killer = threading.Timer(0.1, os.kill, (server, signal.SIGKILL))
        killer.start()
        ok, m = v.verify(responses, answers)
        killer.join()
        assert m["seconds"] > 0.1  # the server died mid-batch
        assert ok.all(), (int((~ok).sum()), m)
        assert m["unfinished"] == m["errors"] == 0
        ok, m = v.verify(responses, answers)
        assert ok.all(), m


# ---- 10: a frozen forkserver ------------------------------------------------------------------------


def test_frozen_forkserver_does_not_hold_verify_past_its_budget():
    budget = 3.0
    responses, answers = _sympy_items(4)
    v = MathVerifier(num_workers=1, batch_budget_s=budget, startup_timeout_s=1.0)
    server = None
    try:
        assert v.wait_ready(60)
        # The server closes its copy of a new worker's pipe only after it has told us the worker's
        # pid; freeze it before that and it keeps the pipe open, so the worker's death goes unseen.
        time.sleep(0.5)
        server = _forkserver_pid()
        os.kill(server, signal.SIGSTOP)
        os.kill(v._slots[0].proc.pid, signal.SIGKILL)  # its replacement must come from the frozen server
        time.sleep(0.2)
        finished, out, seconds = _run_bounded(lambda: v.verify(responses, answers), budget + 10.0)
        assert finished and seconds < budget + 1.5, seconds
        ok, m = out
        assert m["forkserver_kills"] >= 1 and ok.sum() + m["unfinished"] == len(responses), m
        # Given the time a new forkserver needs to import math-verify, the pool works again.
        v.config = dataclasses.replace(v.config, startup_timeout_s=60.0, batch_budget_s=60.0)
        ok, m = v.verify(responses, answers)
        assert ok.all(), m
    finally:
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGCONT)
        v.close()


# ---- 11: closing a pool that other threads use -------------------------------------------------------


def test_default_pool_closed_under_running_batches_scores_every_answer():
    responses, answers = _sympy_items(6)
    math_reward.default_verifier(num_workers=1).wait_ready(60)
    stop = threading.Event()
    failures = []

    def verifying():
        while not stop.is_set():
            try:
                ok = math_reward.verify_batch(responses, answers, num_workers=1)
                if not ok.all():
                    failures.append(f"{int((~ok).sum())} correct answers scored wrong")
            except Exception as e:  # noqa: BLE001 (the test reports whatever broke)
                failures.append(repr(e))

    def closing():
        while not stop.is_set():
            math_reward.default_verifier(num_workers=2)  # another config replaces (closes) the pool
            time.sleep(0.05)
            math_reward.close_default()
            time.sleep(0.05)

    threads = [threading.Thread(target=f, daemon=True) for f in (verifying, verifying, closing)]
    try:
        for t in threads:
            t.start()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[:5]
    finally:
        stop.set()
        math_reward.close_default()


# ---- 12: os.fork -------------------------------------------------------------------------------------


# JAX (imported by tests/conftest.py) and Python >= 3.12 warn about forking a multithreaded process;
# the child here runs nothing but this pool's code.
@pytest.mark.filterwarnings("ignore:.*fork:RuntimeWarning", "ignore:.*fork:DeprecationWarning")
def test_forked_child_uses_its_own_pool_and_never_crosstalks():
    responses, right = _sympy_items(30)
    _, wrong = _sympy_items(30, wrong=True)
    with MathVerifier(num_workers=1, per_item_timeout_s=2.0, batch_budget_s=10.0) as v:
        assert v.wait_ready(60)
        parent_workers = [s.proc.pid for s in v._slots]
        child = os.fork()
        if child == 0:  # the child scores correct answers with the pool it inherited
            code = 3  # an exception
            try:
                scored_right = all(v.verify(responses, right)[0].all() for _ in range(3))
                own_workers = not {s.proc.pid for s in v._slots} & set(parent_workers)
                code = 1 if not scored_right else 0 if own_workers else 2
            finally:
                os._exit(code)
        accepted, status, deadline = 0, None, time.monotonic() + 40
        while status is None and time.monotonic() < deadline:  # meanwhile the parent scores wrong ones
            bad, m = v.verify(responses, wrong)
            accepted += int(bad.sum())
            done, raw = os.waitpid(child, os.WNOHANG)
            status = os.waitstatus_to_exitcode(raw) if done else None
        if status is None:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        assert accepted == 0
        assert status == 0  # 1: wrong scores in the child, 2: it used the parent's workers
        assert [s.proc.pid for s in v._slots] == parent_workers  # the parent's pool is untouched
        bad, m = v.verify(responses, wrong)
        assert not bad.any() and m["restarts"] == 0


def test_a_reply_from_another_batch_is_never_taken_for_this_one():
    responses, right = _sympy_items(1)
    _, wrong = _sympy_items(1, wrong=True)
    with MathVerifier(num_workers=1, batch_budget_s=30.0) as v:
        assert v.wait_ready(60)
        # The worker first answers task 0 of another batch (as after a fork, when two processes share
        # a pipe): a correct answer that must not be taken for this batch's task 0.
        stale = ("chunk", (-1, 0), [(0, math_reward.extract_answer(responses[0]), right[0])])
        v._slots[0].conn.send(stale)
        bad, m = v.verify(responses, wrong)
        assert not bad.any() and m["unfinished"] == 0


# ---- 13: rewards must not depend on wall-clock time ---------------------------------------------------


def test_cpu_starved_worker_still_scores_correct_answers():
    responses, answers = _sympy_items(150)
    with MathVerifier(num_workers=1, mv_timeout_s=1, per_item_timeout_s=1.0, batch_budget_s=30.0) as v:
        assert v.wait_ready(60)
        worker = v._slots[0].proc.pid

        def starve():  # the worker gets no CPU for 1.5 s (a stopped process is an extreme of load)
            time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGSTOP)
                time.sleep(1.5)
                os.kill(worker, signal.SIGCONT)

        starver = threading.Thread(target=starve)
        starver.start()
        ok, m = v.verify(responses, answers)
        starver.join()
        assert ok.all(), (int((~ok).sum()), m)
        assert m["soft_timeouts"] == m["hard_timeouts"] == m["restarts"] == 0, m


def test_cpu_time_limit_still_stops_a_runaway_item_and_keeps_the_worker():
    with MathVerifier(num_workers=1, mv_timeout_s=1, per_item_timeout_s=10.0, batch_budget_s=30.0) as v:
        assert v.wait_ready(60)
        worker = v._slots[0].proc.pid
        t0 = time.monotonic()
        ok, m = v.verify([HANG, "\\boxed{\\frac{1}{\\sqrt{2}}}"], ["5", "\\frac{\\sqrt{2}}{2}"])
        assert ok.tolist() == [False, True]
        assert m["soft_timeouts"] == 1 and m["hard_timeouts"] == m["restarts"] == 0, m
        assert v._slots[0].proc.pid == worker and time.monotonic() - t0 < 8.0
