"""Math answer verification: final-answer extraction and a pool of math-verify workers.

The solution reward r_sol of the method doc (section 1) is 1 iff the last ``\\boxed{...}`` answer of a
rollout is mathematically equal to the ground truth. This module

* extracts the final answer in the parent (linear-time scans, lengths capped, nothing evaluated);
* answers cheap cases in the parent by LaTeX-insignificant string equality (``canonical_text``);
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
import dataclasses
import fractions
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from typing import Sequence

import numpy as np

FALLBACK_MODES = ("boxed", "answer_is", "last_number")


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
    start_method: "spawn" or "forkserver" (never "fork": the parent is a JAX process).
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
    start_method: str = "spawn"
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


# ----------------------------------------------------------------------------------------------
# Answer extraction (parent side, linear time, nothing evaluated)
# ----------------------------------------------------------------------------------------------

_BOX_CMDS = ("\\boxed", "\\fbox")


def _balanced_group(text: str, start: int, max_chars: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``, or None if unclosed / too long.

    One forward scan; ``\\x`` pairs are skipped so ``\\{`` / ``\\}`` (literal set braces) and ``\\\\``
    (a row break, possibly followed by a real ``{``) do not confuse the depth count.
    """
    depth = 0
    i = start
    end = min(len(text), start + max_chars + 2)
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str, max_chars: int = 1000) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``), or None.

    "Last" means the command that starts last (an unclosed last box gives None: a truncated rollout has
    no final answer). Content longer than ``max_chars`` gives None. O(len(text)).
    """
    n = len(text)
    end = n
    while True:
        pos, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_CMDS)
        if pos < 0:
            return None
        i = pos + len(cmd)
        if i < n and text[i].isalpha():  # "\boxedA" is another command: look further left
            end = pos
            continue
        break
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        return _balanced_group(text, i, max_chars)
    if pos + len(cmd) < i < n:  # "\boxed 5": the token up to the next space or "$"
        j = i
        while j < n and j - i <= max_chars and text[j] not in " \t\n$":
            j += 1
        token = text[i:j].rstrip(".,")
        return token if token and j - i <= max_chars else None
    return None


_ANSWER_IS = re.compile(r"(?i)(?:final answer|the answer)\s*(?:is\b|:)")
_LAST_LINE_STRIP = " \t$*.:"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _answer_is(text: str, max_chars: int) -> str | None:
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return None
    line = text[last.end() : last.end() + max_chars + 1].split("\n", 1)[0]
    line = line.strip(_LAST_LINE_STRIP)
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(a) and line.endswith(b):
            line = line[len(a) : -len(b)]
    line = line.strip(_LAST_LINE_STRIP)
    return line if 0 < len(line) <= max_chars else None


def _last_number(text: str, max_chars: int) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    if last is None or len(last.group()) > max_chars:
        return None
    return last.group().replace(",", "")


def extract_answer(text: str, fallback: str = "boxed", max_chars: int = 1000) -> str | None:
    """The final answer string of a response per the fallback mode (see ``VerifierConfig``), or None."""
    if not isinstance(text, str):
        return None
    ans = last_boxed(text, max_chars)
    if ans is not None or fallback == "boxed":
        return ans
    if fallback == "answer_is":
        return _answer_is(text, max_chars)
    if fallback == "last_number":
        return _last_number(text, max_chars)
    raise ValueError(f"unknown fallback {fallback!r}")


# ----------------------------------------------------------------------------------------------
# Normalisation: only rules a measured MATH miss needed (each has a test)
# ----------------------------------------------------------------------------------------------

# `\\` (row break) is consumed as a unit so "\\ " is not mistaken for the spacing command "\ ".
_SPACING = re.compile(r"(\\\\)|\\[,!;: ]|\\q?quad(?![A-Za-z])|~")
_CMD_SPACE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")
_WS = re.compile(r"\s+")
# The MATH targets were cleaned by turning "\text{June 20}" into "{June20}"; we map both to that form.
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|textit|textnormal|mbox|mathrm)\{")
_DEGREE = re.compile(r"\^\{?\\circ\}?")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC = re.compile(r"\\[dt]frac(?![A-Za-z])")
_PERCENT = re.compile(r"(?:\\?%)$")
_THOUSANDS = re.compile(r"(\d)\s*,\s*\\!\s*(?=\d{3}(?!\d))")
_LETTER_LIST = re.compile(r"[A-Za-z](?:,[A-Za-z])*")


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and _balanced_group(s, 0, len(s)) == s[1:-1]:
        s = s[1:-1]
    return s


def canonical_text(s: str) -> str:
    """A LaTeX-insignificant rewrite used for string equality (never for parsing).

    Removes white space and spacing commands (``\\!``, ``\\,``, ``~``...), turns ``\\text{..}`` /
    ``\\mbox{..}`` into ``{..}`` (the convention of the MATH targets), drops ``\\left``/``\\right``,
    degree signs and ``$``, maps ``\\dfrac``/``\\tfrac`` to ``\\frac``, strips outer braces and a
    trailing period. Case is kept. Linear-time regex passes only.
    """
    s = s.replace("\\$", "").replace("$", "")
    s = _SPACING.sub(lambda m: m.group(1) or " ", s)
    s = _CMD_SPACE.sub(lambda m: m.group(1) + "\0", s)  # keep "\pi r" distinct from "\pir"
    s = _WS.sub("", s).replace("\0", " ")
    s = _TEXT_CMD.sub("{", s)
    s = _DEGREE.sub("", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _FRAC.sub("\\\\frac", s)
    s = _strip_outer_braces(s).rstrip(".")
    return _strip_outer_braces(s)


def strip_percent(s: str) -> str | None:
    """``"44\\%"`` -> ``"44"``; None when there is no trailing percent sign.

    MATH targets write percentages without the sign, math-verify reads ``44\\%`` as 0.44; a
    percentage answer is accepted for either its number or its fraction.
    """
    t = s.rstrip().rstrip(".").rstrip()
    stripped = _PERCENT.sub("", t)
    return stripped.rstrip() if stripped != t else None


def texts_match(pred: str, gold: str) -> bool:
    """String-level equality after ``canonical_text`` (with and without a trailing percent sign),
    and unordered equality of letter choices (``\\text{D, A}`` == ``{A,D}``)."""
    g = canonical_text(gold)
    if not g:
        return False
    for p in (pred, strip_percent(pred)):
        if p is None:
            continue
        c = canonical_text(p)
        if c == g:
            return True
        if _LETTER_LIST.fullmatch(c) and _LETTER_LIST.fullmatch(g):
            if sorted(c.split(",")) == sorted(g.split(",")):
                return True
    return False


_FRAC_LITERAL = re.compile(r"(-?)\\frac(?:\{(\d{1,30})\}|(\d))(?:\{(\d{1,30})\}|(\d))")
_SLASH_LITERAL = re.compile(r"(-?\d{1,30})/(\d{1,30})")
_DECIMAL_LITERAL = re.compile(r"-?(?:\d{1,30}|\d{0,15}\.\d{1,15})")


def _number_literal(s: str) -> tuple[fractions.Fraction, bool] | None:
    """(value, exact) of an integer / decimal / ``\\frac{a}{b}`` / ``a/b`` literal in canonical form."""
    if m := _DECIMAL_LITERAL.fullmatch(s):
        return fractions.Fraction(s), "." not in s
    if m := _FRAC_LITERAL.fullmatch(s):
        num, den = int(m[2] or m[3]), int(m[4] or m[5])
        sign = -1 if m[1] else 1
    elif m := _SLASH_LITERAL.fullmatch(s):
        num, den, sign = int(m[1]), int(m[2]), 1
    else:
        return None
    return (fractions.Fraction(sign * num, den), True) if den else None


def quick_decision(pred: str, gold: str) -> bool | None:
    """Decides the common cases without sympy, exactly as math-verify would; None when it must decide.

    True on ``texts_match``. For two number literals (integer, decimal, ``\\frac{a}{b}``, ``a/b``):
    True when equal; False when both are exact and differ, or differ by more than 1e-5 (math-verify
    compares floats rounded to 6 decimals, so closer decimals are left to it). Most wrong MATH
    answers are numbers, and this keeps them off the workers.
    """
    if texts_match(pred, gold):
        return True
    p = _number_literal(canonical_text(pred))
    g = _number_literal(canonical_text(gold))
    if p is None or g is None:
        return None
    if p[0] == g[0]:
        return True
    if (p[1] and g[1]) or abs(p[0] - g[0]) > fractions.Fraction(1, 10**5):
        return False
    return None


def prepare_for_parse(s: str) -> str:
    """Rewrites applied before math-verify parses a string: ``111,\\!111`` -> ``111111`` (math-verify
    reads the comma as a separator of a tuple), a trailing period inside the box is dropped, and so is
    ``$`` (we add our own delimiters)."""
    s = _THOUSANDS.sub(r"\1", s.replace("\\$", "").replace("$", ""))
    return s.strip().rstrip(".").strip()


# ----------------------------------------------------------------------------------------------
# The judgement itself (runs in a worker's main thread; importable for direct tests)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _parse_latex(s: str, mv_timeout_s: int) -> tuple:
    # LaTeX path only: ExprExtractionConfig would run sympy.parse_expr (eval) on model text.
    from math_verify import LatexExtractionConfig, parse

    return tuple(parse("$" + s + "$", extraction_config=[LatexExtractionConfig()],
                       parsing_timeout=mv_timeout_s))


def judge_answer(pred: str, gold: str, *, mv_timeout_s: int = 2) -> bool:
    """True iff the extracted answer ``pred`` equals the ground truth ``gold``.

    ``quick_decision`` first (string equality after ``canonical_text``, integer literals), then math-verify on the parsed LaTeX of both (and of
    ``pred`` without its percent sign). Must run in the main thread (math-verify uses signal.alarm).
    """
    quick = quick_decision(pred, gold)
    if quick is not None:
        return quick
    from math_verify import verify

    gold_parsed = _parse_latex(prepare_for_parse(gold), mv_timeout_s)
    if not gold_parsed:
        return False
    variants = [pred] + [p for p in (strip_percent(pred),) if p is not None]
    for variant in variants:
        parsed = _parse_latex(prepare_for_parse(variant), mv_timeout_s)
        if parsed and verify(list(gold_parsed), list(parsed), timeout_seconds=mv_timeout_s):
            return True
    return False


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
    timeouts) per item, in order, so the parent knows which item is running (its deadline clock)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    import math_verify  # noqa: F401  (import before the memory cap and before "ready")

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
            try:
                ok, status = judge_answer(pred, gold, mv_timeout_s=mv_timeout_s), "ok"
            except Exception:  # untrusted input may break sympy anywhere; scored 0 and counted
                ok, status = False, "error"
            try:
                conn.send(("res", tid, status, bool(ok), counter.count))
            except (BrokenPipeError, OSError):
                return


# ----------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------


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

    Not thread-safe for concurrent ``verify`` calls (they are serialised by a lock). Call ``close()``
    (or use as a context manager) to stop the workers.
    """

    def __init__(self, config: VerifierConfig | None = None, **overrides):
        cfg = config or VerifierConfig()
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg
        self._ctx = multiprocessing.get_context(self.config.start_method)
        self._lock = threading.Lock()
        self._slots: list[_Slot | None] = [None] * self.config.num_workers
        self._closed = False
        for i in range(self.config.num_workers):
            self._slots[i] = self._start_worker()

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
        for i, slot in enumerate(self._slots):
            while not slot.ready:
                left = deadline - time.monotonic()
                if left <= 0 or not slot.conn.poll(left):
                    return False
                try:
                    msg = slot.conn.recv()
                except (EOFError, OSError):
                    self._kill(slot)
                    slot = self._slots[i] = self._start_worker()
                    continue
                slot.ready = msg[0] == "ready"
        return True

    def close(self) -> None:
        """Stops all workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            if slot is not None and slot.proc.is_alive():
                try:
                    slot.conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    pass  # already dying; the kill below reaps it
                slot.proc.join(timeout=1.0)
            if slot is not None:
                self._kill(slot)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- verification -----------------------------------------------------------------------------
    def verify(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[np.ndarray, dict]:
        """Judges ``responses[i]`` against ground truth ``answers[i]``.

        Returns ``correct: bool[N]`` and a metrics dict (counts: n, no_answer, answer_too_long,
        string_match, parsed_checks, correct, soft_timeouts, hard_timeouts, unfinished, errors,
        restarts; seconds). A timed-out, unfinished or failing item scores False. Never blocks
        much past ``batch_budget_s`` (a kill takes at most ~0.5 s per hung worker).
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
                too_long = isinstance(resp, str) and last_boxed(resp, len(resp)) is not None
                m["answer_too_long" if too_long else "no_answer"] += 1
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
        metrics = {k: int(v) for k, v in m.items()}
        for k in ("no_answer", "answer_too_long", "bad_gold", "quick_decisions", "soft_timeouts",
                  "hard_timeouts", "unfinished", "errors", "restarts"):
            metrics.setdefault(k, 0)
        metrics["seconds"] = time.monotonic() - t_start
        return correct, metrics

    def _run(self, keys: list, deadline: float, m: collections.Counter) -> dict[int, bool]:
        """Farms task ids 0..len(keys)-1 out to the workers until done or ``deadline``."""
        cfg = self.config
        pending = collections.deque(range(len(keys)))
        results: dict[int, bool] = {}
        startup_failures = 0

        def replace(i: int, requeue: bool) -> None:
            slot = self._slots[i]
            if requeue:
                pending.extendleft(reversed(slot.chunk[1:]))  # the item that was running is lost
            self._kill(slot)
            self._slots[i] = self._start_worker()
            m["restarts"] += 1

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
                    except (BrokenPipeError, OSError):
                        pass  # its sentinel fires below and the chunk is requeued
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
                            _, tid, status, ok, soft = msg
                            results[tid] = ok
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
                    replace(i, requeue=True)
                elif slot.chunk and now - slot.item_t0 > cfg.per_item_timeout_s:
                    results[slot.chunk[0]] = False
                    m["hard_timeouts"] += 1
                    replace(i, requeue=True)
                elif not slot.ready and now - slot.started_at > cfg.startup_timeout_s:
                    replace(i, requeue=False)
        # Budget spent: busy workers are mid-item; replace them so no stale answer reaches a later call.
        for i, slot in enumerate(self._slots):
            if slot.chunk:
                replace(i, requeue=True)
                m["restarts"] -= 1
                m["budget_kills"] += 1
        m["unfinished"] += len(keys) - len(results)
        return results


# ----------------------------------------------------------------------------------------------
# Module-level default pool
# ----------------------------------------------------------------------------------------------

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
