"""The `masa_jax` lm-eval backend against lm-eval's own `hf` backend on the same tiny random Qwen3 (float32,
CPU), on local tasks of each kind: per-request log-likelihoods within 1e-4, the same greedy flags, and
identical greedy generations (stop strings applied)."""
from __future__ import annotations

import time

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend imports it

from masa_jax.evaluation import lm_eval_backend  # noqa: E402  (registers "masa_jax")

TASK_NAMES = ("masa_mc", "masa_gen", "masa_ppl")


def _evaluate(model, model_args, tasks_dir, tasks, **kwargs):
    from lm_eval.tasks import TaskManager
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks),
                                  task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
                                  log_samples=True, batch_size=8, bootstrap_iters=0, **kwargs)
    return out, time.perf_counter() - t0


def _responses(out, task):
    """doc id -> the raw responses of its requests, in request order."""
    return {s["doc_id"]: s["resps"] for s in out["samples"][task]}


@pytest.fixture(scope="module")
def both(lm_model_dir, local_tasks):
    """lm-eval results of both backends on the three local tasks (run once per module)."""
    hf, t_hf = _evaluate("hf", dict(pretrained=lm_model_dir, dtype="float32", device="cpu"), local_tasks,
                         TASK_NAMES)
    ours, t_ours = _evaluate("masa_jax", dict(pretrained=lm_model_dir, dtype="float32"), local_tasks, TASK_NAMES)
    print(f"\nwall time, 3 local tasks: hf {t_hf:.1f} s, masa_jax {t_ours:.1f} s (compiles included)")
    return hf, ours


def test_multiple_choice_loglikelihoods_match_hf(both):
    hf, ours = both
    a, b = _responses(hf, "masa_mc"), _responses(ours, "masa_mc")
    assert a.keys() == b.keys() and len(a) == 6
    worst = 0.0
    for doc in a:
        assert len(a[doc]) == len(b[doc])
        for (lp_hf, greedy_hf), (lp_ours, greedy_ours) in zip((r[0] for r in a[doc]), (r[0] for r in b[doc])):
            worst = max(worst, abs(lp_hf - lp_ours))
            assert greedy_hf == greedy_ours
    print(f"max |delta log-likelihood| multiple choice: {worst:.2e}")
    assert worst < 1e-4
    for metric in ("acc,none", "acc_norm,none"):
        assert hf["results"]["masa_mc"][metric] == ours["results"]["masa_mc"][metric]


def test_rolling_loglikelihoods_match_hf(both, lm_model_dir, task_docs):
    """Whole-document log-likelihoods (several windows of max_length tokens each). Both backends sum
    float32 log-probs, so a total of -1000 nats carries float32 rounding of ~1e-4 by itself: the check is
    per scored token (1e-5) and relative (1e-6)."""
    from transformers import AutoTokenizer
    PPL_DOCS = task_docs["masa_ppl"]
    tok = AutoTokenizer.from_pretrained(lm_model_dir)
    hf, ours = both
    a, b = _responses(hf, "masa_ppl"), _responses(ours, "masa_ppl")
    assert a.keys() == b.keys() and len(a) == len(PPL_DOCS)
    for doc in a:
        lp_hf, lp_ours = a[doc][0][0], b[doc][0][0]
        n = len(tok.encode(PPL_DOCS[doc]["text"]))
        print(f"rolling doc {doc}: {n} tokens, hf {lp_hf:.4f}, masa_jax {lp_ours:.4f}, "
              f"|delta| {abs(lp_hf - lp_ours):.2e}")
        assert abs(lp_hf - lp_ours) <= 1e-5 * n
        assert abs(lp_hf - lp_ours) <= 1e-6 * abs(lp_hf)


def test_greedy_generations_match_hf_with_stop_strings(both):
    hf, ours = both
    a, b = _responses(hf, "masa_gen"), _responses(ours, "masa_gen")
    assert a == b
    texts = [r[0] for r in a.values()]
    assert any(texts), "the random model should produce some text"
    assert all("." not in t and "\n\n" not in t for t in texts)  # cut at the first stop string
    assert hf["results"]["masa_gen"]["exact_match,none"] == ours["results"]["masa_gen"]["exact_match,none"]


def test_chat_templated_generations_match_hf(lm_model_dir, local_tasks):
    """With --apply_chat_template lm-eval templates the prompt through the model's `apply_chat_template`: the
    same templated prompts and the same greedy outputs as `hf`."""
    kw = dict(apply_chat_template=True, limit=3)
    hf, _ = _evaluate("hf", dict(pretrained=lm_model_dir, dtype="float32", device="cpu"), local_tasks, ["masa_gen"], **kw)
    ours, _ = _evaluate("masa_jax", dict(pretrained=lm_model_dir, dtype="float32"), local_tasks, ["masa_gen"], **kw)
    prompts = lambda out: [s["arguments"][0][0] for s in out["samples"]["masa_gen"]]
    assert prompts(hf) == prompts(ours)
    assert all(p.startswith("<|im_start|>user\n") and p.endswith("<|im_start|>assistant\n") for p in prompts(ours))
    assert _responses(hf, "masa_gen") == _responses(ours, "masa_gen")
