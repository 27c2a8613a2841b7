"""The verifier pool under hangs, budget exhaustion and worker death (one worker at a time)."""
import os
import signal
import time

import pytest

from masa_jax.rewards.math import MathVerifier

# Nested fractions send sympy's simplification into a > 30 s search (measured), which math-verify's
# alarm would normally cut; with its timeout set to 60 s only the parent's hard deadline stops it.
HANG = "\\boxed{" + "\\frac{1}{" * 60 + "2" + "}" * 60 + "}"
SYMPY_OK = ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}")


@pytest.mark.timing
def test_hung_item_is_killed_scored_zero_and_counted():
    with MathVerifier(num_workers=1, mv_timeout_s=60, per_item_timeout_s=2.0, batch_budget_s=60.0) as v:
        assert v.wait_ready(60)
        pid = v._slots[0].proc.pid
        t0 = time.monotonic()
        ok, m = v.verify([HANG, SYMPY_OK[0], "\\boxed{3}"], ["5", SYMPY_OK[1], "3"])
        elapsed = time.monotonic() - t0
        assert ok.tolist() == [False, True, True]
        assert m["hard_timeouts"] == 1 and m["restarts"] == 1 and m["unfinished"] == 0
        assert v._slots[0].proc.pid != pid  # replaced
        assert elapsed < 2.0 + 30.0  # the deadline, a respawn and one sympy item; far from 60 s
        ok, m = v.verify([SYMPY_OK[0]], [SYMPY_OK[1]])  # the replacement keeps working
        assert ok.tolist() == [True] and m["restarts"] == 0


@pytest.mark.timing
def test_parent_never_blocks_past_the_batch_budget():
    budget = 3.0
    with MathVerifier(num_workers=1, mv_timeout_s=60, per_item_timeout_s=100.0,
                      batch_budget_s=budget) as v:
        assert v.wait_ready(60)
        hangs = [HANG.replace("2}", f"{k}}}", 1) for k in range(2, 6)]  # 4 distinct hung items
        t0 = time.monotonic()
        ok, m = v.verify(hangs + ["\\boxed{4}"], ["5"] * 4 + ["4"])
        elapsed = time.monotonic() - t0
        assert elapsed < budget + 1.5
        assert ok.tolist() == [False] * 4 + [True]  # the quick item is still judged
        assert m["unfinished"] == 4 and m["budget_kills"] == 1 and m["hard_timeouts"] == 0


def test_a_dead_worker_is_replaced_and_its_items_requeued():
    with MathVerifier(num_workers=1, batch_budget_s=60.0) as v:
        assert v.wait_ready(60)
        os.kill(v._slots[0].proc.pid, signal.SIGKILL)  # e.g. the OOM killer between two batches
        v._slots[0].proc.join(5)
        ok, m = v.verify([SYMPY_OK[0], "\\boxed{\\sqrt{9}}"], [SYMPY_OK[1], "3"])
        assert ok.tolist() == [True, True]
        assert m["restarts"] == 1 and m["errors"] == 0 and m["unfinished"] == 0


def test_closed_verifier_refuses_work():
    v = MathVerifier(num_workers=1)
    v.close()
    v.close()  # idempotent
    assert not v._slots[0].proc.is_alive()
    with pytest.raises(RuntimeError):
        v.verify(["\\boxed{1}"], ["1"])
