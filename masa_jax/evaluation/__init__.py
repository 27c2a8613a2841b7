"""Evaluation beyond the training loop.

* `lm_eval_backend`: masa_jax as an lm-evaluation-harness model, registered as ``masa_jax`` (optional
  extra ``masa_jax[eval]``); `harness` is lm-eval's command line with that model registered
  (``python -m masa_jax.evaluation.harness --model masa_jax --model_args ... --tasks ...``).
* `paper`: the paper's math protocol (32 samples at temperature 0.6 / top-p 1.0, 16k new tokens,
  pass@1 = mean accuracy, unbiased pass@k), benchmark loading and the JSON / Markdown tables that
  ``python -m masa_jax.evaluate`` writes.
* `meta_eval`: the meta path on evaluation problems: calibration of the predicted pass rate and
  length against the measured ones (MAE, Pearson r, the paper's Figure 2) and what gating would skip.

Importing this package imports neither lm-eval nor jax.
"""


def register_lm_eval_model() -> None:
    """Registers the ``masa_jax`` model with lm-eval (imports the backend; needs ``masa_jax[eval]``)."""
    from masa_jax.evaluation import lm_eval_backend  # noqa: F401  (registers on import)
