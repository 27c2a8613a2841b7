"""The rollout-engine seam: what training and evaluation need from a sampler, and the engines that provide it.

Everything that samples from the policy - the trainer's rollouts and held-out evaluation, `evaluate` (math
and out-of-domain suites), the lm-eval backend, the experiments and the notebooks - builds its sampler with
`make_engine` and calls `RolloutEngine.generate`. Swapping in another engine (vLLM-TPU, sglang-jax, a
remote server) is one class with the two methods below, registered under a name that
`config.rollout.engine` selects; `tests/rl/test_rollout_engine_contract.py` checks a registered engine
against the contract written on `RolloutEngine`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

FINISH_REASONS = ("eos", "budget", "max_new_tokens")


class RolloutOutput(Protocol):
    """One row per prompt, in the order of the prompts."""
    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]


class GenerateFn(Protocol):
    """`RolloutEngine.generate`'s signature: what the rollout and the evaluators call."""

    def __call__(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int] | np.ndarray | None,
                 max_new_tokens: int, rng: jax.Array, **sampling: Any) -> RolloutOutput: ...


@runtime_checkable
class RolloutEngine(Protocol):
    """A sampler of the policy, kept in sync with the trainer's weights.

    ``generate(prompts, budgets, max_new_tokens, rng, *, temperature=None, top_p=None, top_k=None,
    stop_ids=None, on_done=None)`` samples one continuation per prompt (token ids, any lengths >= 1).
    ``budgets`` (optional, per prompt) caps that prompt's new tokens below ``max_new_tokens`` (MASA's
    cutoff); the keywords override the engine's sampling settings for this call (None: the engine's);
    ``on_done(n)`` is told as prompts finish. The result holds, per prompt in input order:

    - ``tokens``: the generated ids. A row whose finish reason is "eos" ends with one of the stop ids,
      kept (the trainer scores it) and occurring nowhere earlier in the row.
    - ``finish_reasons``: "eos"; "budget" - the row reached its own budget, which is below
      ``max_new_tokens``: a real cutoff, which the rollout scores 0; or "max_new_tokens" - the row reached
      ``max_new_tokens`` (a budget >= ``max_new_tokens`` is no cutoff and ends for this reason).
    - ``logprobs``: float32, one per token: log softmax(logits / temperature) of the sampled token under
      the full distribution (top-k / top-p restrict the sampling, not the scoring), as verl - the trainer
      recomputes these at the same temperature; under the raw logits when greedy (temperature 0).

    The same call with the same ``rng`` gives the same rows. ``update_params(params)`` takes the
    trainer's parameters (training layout); every later ``generate`` samples those weights.
    ``update_params(None)`` releases the engine's copy (the trainer does so before its update, so that
    the sampling copy of the weights is not resident next to the optimizer's temporaries).
    """

    def update_params(self, params: Any) -> None: ...

    def generate(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int] | np.ndarray | None,
                 max_new_tokens: int, rng: jax.Array, **sampling: Any) -> RolloutOutput: ...


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What every engine is built from: the model, the run's sampler settings and where it runs."""
    model_cfg: Any
    sampler: Any                  # masa_jax.sampling.SamplerConfig: temperature, top-p / k, stop ids, slots
    mesh: Any = None              # the training mesh (None: one device)


class NativeEngine:
    """masa_jax's refill sampler (`masa_jax.sampling.generate`): the jitted KV-cache engine over the
    sampling-layout weights, resharded from the training layout once per `update_params`. On several
    hosts each host samples its own prompts on its own devices."""

    name = "native"

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self._params = None
        self._mesh = spec.mesh

    def update_params(self, params: Any) -> None:
        from masa_jax.parallel import multihost
        from masa_jax.sampling import to_sampling_params
        self._params = None  # release the previous copy before the reshard allocates the next
        if params is None:
            return
        sampling_params = to_sampling_params(self.spec.model_cfg, params, mesh=self.spec.mesh)
        if self.spec.mesh is not None and jax.process_count() > 1:
            self._mesh = multihost.local_sampling_mesh(self.spec.mesh)
            sampling_params = multihost.to_local(sampling_params, self._mesh)
        self._params = sampling_params

    def generate(self, prompts, budgets, max_new_tokens, rng, *, temperature=None, top_p=None, top_k=None,
                 stop_ids=None, on_done: Callable[[int], None] | None = None):
        from masa_jax import sampling
        if self._params is None:
            raise RuntimeError("NativeEngine.generate before update_params: give the engine its weights first")
        overrides = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                                       ("eos_ids", stop_ids)) if v is not None}
        sampler = dataclasses.replace(self.spec.sampler, **overrides) if overrides else self.spec.sampler
        return sampling.generate(self.spec.model_cfg, self._params, prompts, rng=rng,
                                 max_new_tokens=int(max_new_tokens),
                                 budgets=None if budgets is None else [int(b) for b in budgets],
                                 mesh=self._mesh, sampler=sampler, on_done=on_done)


class FunctionEngine:
    """An engine around a ``generate(prompts, budgets, max_new_tokens, rng)`` function: scripted or oracle
    policies (tests, ablations). It has no weights (`update_params` keeps nothing) and no sampling
    settings: it passes on only the sampling keywords the function declares."""

    name = "function"

    def __init__(self, fn: Callable):
        import inspect
        self.fn = fn
        params = inspect.signature(fn).parameters.values()
        self._takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        self._takes = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def update_params(self, params: Any) -> None:
        del params

    def generate(self, prompts, budgets, max_new_tokens, rng, **sampling):
        sampling = {k: v for k, v in sampling.items() if v is not None and (self._takes_all or k in self._takes)}
        return self.fn(prompts, budgets, max_new_tokens, rng, **sampling)


ENGINES: dict[str, Callable[[EngineSpec], RolloutEngine]] = {"native": NativeEngine}


def register_engine(name: str, factory: Callable[[EngineSpec], RolloutEngine]) -> None:
    """Makes ``config.rollout.engine = name`` build ``factory(spec)``."""
    if name in ENGINES and ENGINES[name] is not factory:
        raise ValueError(f"rollout engine {name!r} is registered already")
    ENGINES[name] = factory


def make_engine(name: str, spec: EngineSpec, params: Any = None) -> RolloutEngine:
    """The engine `name` (see `ENGINES`) for `spec`, holding `params` when given."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}: one of {sorted(ENGINES)}")
    engine = ENGINES[name](spec)
    if params is not None:
        engine.update_params(params)
    return engine
