"""The run configuration: one ml_collections ConfigDict with every knob, and the algorithm switch.

`configs/*.py` start from `base_config()` and override; the command line overrides any field
(`--config.rl.lr=2e-6`). Defaults are the paper's (docs/method.md §5) unless a comment says otherwise.
Unknown / mistyped fields are rejected by ml_collections (ConfigDicts are locked).
"""
from __future__ import annotations

import dataclasses
import math
import string

import ml_collections as mlc

from masa_jax.errors import UserError
from masa_jax.rewards import meta as meta_lib
from masa_jax.rl import prompts as prompts_lib
from masa_jax.models.qwen.lora import LoraConfig
from masa_jax.rewards.math import VerifierConfig
from masa_jax.rl.bc import BCConfig
from masa_jax.rl.controls import ControlConfig
from masa_jax.rl.rollout import RolloutConfig
from masa_jax.rl.train_step import LossConfig, OptimConfig
from masa_jax.rl.update import UpdaterConfig
from masa_jax.sampling.generate import SamplerConfig


def settings_of(component, *names: str, exclude: tuple[str, ...] = (), **run_defaults) -> dict:
    """Run-config settings that are fields of `component` (a frozen dataclass): `names`, or all its fields
    but `exclude` when none are named, each under the field's own name with the component's default,
    unless `run_defaults` gives the run's. So a setting has one name and one default, and
    `components.build` fills the component from the leaves of the same names (its dataclass documents them).
    """
    fields = {f.name: f for f in dataclasses.fields(component)}
    chosen = names or tuple(n for n in fields if n not in exclude)
    unknown = [n for n in (*chosen, *exclude, *run_defaults) if n not in fields]
    if unknown or set(run_defaults) - set(chosen):
        raise TypeError(f"{component.__name__} has no fields {unknown or sorted(set(run_defaults) - set(chosen))}")
    out = {}
    for name in chosen:
        f = fields[name]
        if name in run_defaults:
            out[name] = run_defaults[name]
        elif f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
        else:
            raise TypeError(f"{component.__name__}.{name} has no default: give the run's")
    return out


def _section(*parts: dict, **own) -> mlc.ConfigDict:
    """A config section: component settings (`settings_of`) and the run's own (`own`)."""
    merged: dict = {}
    for part in (*parts, own):
        if set(part) & set(merged):
            raise TypeError(f"settings {sorted(set(part) & set(merged))} named twice in one section")
        merged.update(part)
    return mlc.ConfigDict(merged)

@dataclasses.dataclass(frozen=True)
class Features:
    """What an algorithm runs on top of GRPO's solution path (docs/method.md)."""
    meta_path: bool = False         # M meta rollouts per problem, the self-alignment reward (and BC)
    dynamic_sampling: bool = False  # DAPO: resample until the batch has groups with reward variance
    efficient: bool = False         # MASA-efficient: gating / cutoff / hints after the switch-over


# config.algorithm -> its features: the one place an algorithm's name is read.
ALGORITHM_FEATURES = {
    "grpo": Features(),
    "dapo": Features(dynamic_sampling=True),
    "masa": Features(meta_path=True),
    "masa_efficient": Features(meta_path=True, efficient=True),
}
ALGORITHMS = tuple(ALGORITHM_FEATURES)


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.algorithm = "masa"          # grpo | dapo | masa | masa_efficient
    c.seed = 0
    c.total_steps = 314           # paper: 1 epoch of DeepScaleR at 128 problems / step

    c.model = mlc.ConfigDict()
    c.model.path = ""             # local HF directory (config.json, safetensors, tokenizer files)
    c.model.tokenizer_path = ""   # defaults to model.path
    c.model.preset = ""           # architecture for --dry_run without a checkpoint (see qwen/presets.py)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"    # compute dtype
    c.model.remat = "full"        # none | full | save_dots
    c.model.scan_unroll = 1       # layers per layer-scan iteration (ModelConfig.scan_unroll)
    c.model.scan_layers = True    # False: the training forward loops over the layers in Python (faster on CPU)
    c.model.attention_impl = "xla"  # xla | cudnn | pallas (TPU kernels; falls back to xla elsewhere)

    # LoRA (parameter-efficient RL, masa_jax/models/qwen/lora.py LoraConfig): rank 0 = off (full fine-tuning).
    # With rank r >= 1 only the adapters A [in, r], B [r, out] of the target projections train (optimizer
    # state for them alone), the base weights stay frozen at model.path and checkpoints hold the adapters
    # only. alpha: the scale is alpha / rank (PEFT's lora_alpha). QLoRA: base_quantization "" keeps the frozen
    # base in model.param_dtype; "int8" / "int4" / "nf4" store its seven projection weights quantized
    # through qwix (models/qwen/quantize.py), dequantized per layer.
    c.lora = _section(settings_of(LoraConfig, rank=0, alpha=16.0))

    c.mesh = mlc.ConfigDict()
    c.mesh.shape = (1, -1, 1)     # (data, fsdp, tensor); -1 = the remaining devices
    c.mesh.coordinator_address = ""   # multi-process start-up outside TPU pods ("host:port")
    c.mesh.num_processes = 1
    c.mesh.process_id = 0
    c.mesh.tpu_pod = False        # jax.distributed.initialize() with auto-discovery
    c.mesh.device_memory_gib = 0.0  # for the formula's fit verdict (0: the topology's HBM per chip)
    # The TPU slice the run is sized for ("v5e-1", "v5p-64", ...: masa_jax.compile_check.SLICES): --dry_run
    # compiles every program of a step for it (with the [tpu] extra, on any host) and reads XLA's sizes.
    c.mesh.topology = ""

    c.data = mlc.ConfigDict()
    c.data.train_files = ("",)    # verl parquet / JSONL files, or "tfds:name:split"
    c.data.problems_per_step = 128
    c.data.max_prompt_length = 2048
    c.data.on_error = "raise"     # raise | skip (malformed rows)
    c.data.shuffle = True
    c.data.tfds_data_dir = ""     # where tfds:<name> specs are prepared (local or gs://); "" = $TFDS_DATA_DIR or ~/tensorflow_datasets

    # The authors generate meta and solution rollouts in one vLLM call capped at the response length
    # (akatigre/MASA-RL masa_train/masa_ray_trainer.py:242-247, data.max_response_length=8192 in
    # train_masagrpo.sh:15,32), and their meta prompt asks for reasoning before the JSON: the same cap.
    # num_slots: decode slots of the refill sampler, per host (each host samples its own problems).
    c.rollout = _section(
        settings_of(RolloutConfig, "num_solutions", "num_meta", "max_response_length", "meta_max_new_tokens",
                    num_solutions=16, num_meta=16, max_response_length=8192, meta_max_new_tokens=8192),
        settings_of(SamplerConfig, "temperature", "top_p", "top_k", "num_slots", num_slots=256),
        engine="native")  # the sampler (rl/rollout_engine.py ENGINES): masa_jax's refill engine

    # Templates: "" = the default templates of masa_jax.rl.prompts.
    c.prompts = _section(settings_of(RolloutConfig, "meta_template", "solution_template", "min_solution_length"))

    # k: pass_rate is an integer 0..k; base: b of the difficulty reward b ** |d_pred - d_sol|; weights: one
    # per reward component, in rewards/meta.py COMPONENTS order (length, difficulty, notion): the Figure-6
    # ablations.
    c.meta = _section(settings_of(RolloutConfig, "k", "base", "weights"))

    # MASA-efficient. switch_step k: from this step on, meta first, then gating / cutoff / hints;
    # auto_switch_threshold > 0: switch once the meta-reward moving average over auto_switch_window passes it.
    c.efficient = _section(
        settings_of(ControlConfig), settings_of(RolloutConfig, "gating", "cutoff", "hints"),
        switch_step=120, auto_switch_threshold=-1.0, auto_switch_window=10)

    c.bc = _section(settings_of(BCConfig))  # behaviour cloning (rl/bc.py BCConfig)

    # The loss and AdamW (rl/train_step.py LossConfig, OptimConfig; the loss scores tokens at the rollout
    # temperature), the advantage estimator, and the update's batching (rl/update.py UpdaterConfig).
    # PPO mini-batching as verl (ppo_mini_batch_size / ppo_epochs): each step's problems are shuffled and
    # split into ceil(problems / mini_batch_size) mini-batches, one optimizer update each, ppo_epochs
    # passes. Counted in PROBLEMS over all hosts (verl counts prompts too): a mini-batch holds all
    # solution and meta rollouts of its problems. 0 (or >= problems_per_step) = one update per step.
    # The paper gives no mini-batch size; the authors' script does (akatigre/MASA-RL train_masagrpo.sh:
    # data.train_batch_size=128, actor.ppo_mini_batch_size=128; verl's default ppo_epochs=1):
    # 128 problems / step -> 1 update. micro_batch_size: sequences per gradient-accumulation micro-batch;
    # chunk_size: the log-prob chunk along the sequence (RL and BC). prefix_sharing: the update computes
    # each prompt once per block of micro_batch_size / data-parallel rows that share it (the G solution
    # and M meta rollouts of a problem), exactly the same loss and gradients (rl/update.py).
    c.rl = _section(
        settings_of(LossConfig, exclude=("temperature", "entropy_metric")), settings_of(OptimConfig),
        settings_of(RolloutConfig, "advantage", "adv_eps"),
        settings_of(UpdaterConfig, "mini_batch_size", "ppo_epochs", "micro_batch_size", "prefix_sharing",
                    mini_batch_size=128, micro_batch_size=8))

    c.dapo = mlc.ConfigDict()
    c.dapo.dynamic_sampling = False   # drop zero-variance solution groups, resample to fill the batch
    c.dapo.max_rounds = 3             # cap on extra sampling rounds per step

    c.reward = _section(settings_of(VerifierConfig))  # the verifier pool (rewards/math.py VerifierConfig)

    c.eval = mlc.ConfigDict()     # held-out evaluation inside the training run (solution path, no hints)
    c.eval.files = ()             # held-out problems: files, tfds:... or "toy-heldout:<n>[:<seed>]"; () = none
    c.eval.every = 0              # also after every N-th step (0: only before the first and after the last)
    c.eval.num_samples = 4        # samples per problem; accuracy = mean over them (pass@1)
    c.eval.temperature = 1.0      # 0 = greedy

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every = 20
    c.checkpoint.max_to_keep = 3

    c.log = mlc.ConfigDict()
    c.log.tensorboard = True
    c.log.wandb = False
    c.log.wandb_project = "masa_jax"
    c.log.figures = True            # PNGs at the end of a run: calibration, meta rewards, gating
    c.log.calibration_steps = 5     # steps pooled for the start / end calibration panels and summary table
    c.log.num_samples = 2           # meta and solution generations per step (with rewards) in samples.jsonl,
                                    # TensorBoard text and a W&B table; 0 = none
    # Peak FLOP/s of one device for perf/mfu; 0 = masa_jax.perf's table by device kind (unknown: no MFU).
    c.log.peak_flops_per_device = 0.0

    # JAX's persistent compilation cache (masa_jax/compile_cache.py): a rerun, a resume or an evaluation
    # reads the executables back instead of compiling them. dir "" = $MASA_JAX_COMPILE_CACHE_DIR, else
    # $XDG_CACHE_HOME (~/.cache)/masa_jax/xla; local or gs://. Not part of the run: a resume may change it.
    c.compile_cache = mlc.ConfigDict()
    c.compile_cache.enabled = True
    c.compile_cache.dir = ""
    c.compile_cache.min_compile_time_s = 0.0  # programs that compile faster are not written (0: all)
    c.lock()  # config files and overrides may change fields, never invent them (typos are errors)
    return c


def resolve(config: mlc.ConfigDict) -> mlc.ConfigDict:
    """Checks the algorithm switch and fills derived defaults; returns a locked copy.

    grpo: solution path only. masa: both paths, meta rewards, BC. masa_efficient: masa, then from the
    switch-over on meta first with gating / cutoff / hints. dapo: grpo with dynamic sampling,
    clip-higher and token-mean (paper Table 4).
    """
    c = mlc.ConfigDict(config.to_dict())
    if c.algorithm not in ALGORITHMS:
        raise UserError(f"config.algorithm must be one of {ALGORITHMS}, got {c.algorithm!r}")
    _check_values(c)
    if ALGORITHM_FEATURES[c.algorithm].dynamic_sampling:
        c.dapo.dynamic_sampling = True
    if not c.model.tokenizer_path:
        c.model.tokenizer_path = c.model.path
    names = meta_lib.component_names()
    if len(c.meta.weights) != len(names) or abs(sum(c.meta.weights) - 1.0) > 1e-6:
        raise UserError(f"config.meta.weights must be {len(names)} weights summing to 1, one per reward component "
                        f"{names}, got {c.meta.weights}")
    if not c.rl.mini_batch_size >= 0:
        raise UserError(f"config.rl.mini_batch_size must be >= 0 (0: the whole step), got {c.rl.mini_batch_size!r}")
    from masa_jax import components  # it reads this module's features
    components.check(c)
    c.lock()
    return c


# Counts that must be >= 1: 0 divides by zero (checkpoint.every) or silently trains on nothing.
_COUNTS = ("total_steps", "data.problems_per_step", "data.max_prompt_length", "rollout.num_solutions",
           "rollout.max_response_length", "rollout.num_slots", "meta.k", "bc.buffer_size", "rl.ppo_epochs",
           "rl.micro_batch_size", "rl.chunk_size", "reward.num_workers", "checkpoint.every",
           "checkpoint.max_to_keep", "efficient.auto_switch_window", "log.calibration_steps",
           "reward.max_answer_chars", "reward.max_gold_chars", "reward.worker_memory_mb", "model.scan_unroll")
_META_COUNTS = ("rollout.num_meta", "rollout.meta_max_new_tokens")  # only read when the meta path runs


def _check_values(c: mlc.ConfigDict) -> None:
    """Rejects values that would fail only later (mid-run), naming the field."""
    for name in _COUNTS + (_META_COUNTS if uses_meta(c) else ()):
        if not c[name] >= 1:
            raise UserError(f"config.{name} must be >= 1, got {c[name]!r}")
    r = c.rollout
    if not r.temperature > 0:
        raise UserError(f"config.rollout.temperature must be > 0 (the training log-probs divide the logits by it), "
                        f"got {r.temperature!r}")
    if not 0 < r.top_p <= 1:
        raise UserError(f"config.rollout.top_p must be in (0, 1], got {r.top_p!r}")
    if not r.top_k >= 0:
        raise UserError(f"config.rollout.top_k must be >= 0 (0: off), got {r.top_k!r}")
    if not c.eval.every >= 0 or not c.eval.num_samples >= 1 or not c.eval.temperature >= 0:
        raise UserError(f"config.eval needs every >= 0, num_samples >= 1 and temperature >= 0, got every="
                        f"{c.eval.every!r}, num_samples={c.eval.num_samples!r}, temperature={c.eval.temperature!r}")
    if c.data.on_error not in ("raise", "skip"):
        raise UserError(f"config.data.on_error must be one of ('raise', 'skip'), got {c.data.on_error!r}")
    _check_ranges(c)
    _check_lora(c)
    if isinstance(c.log.num_samples, bool) or not isinstance(c.log.num_samples, int) or c.log.num_samples < 0:
        raise UserError(f"config.log.num_samples must be an integer >= 0 (0: no samples), got {c.log.num_samples!r}")
    if not c.log.peak_flops_per_device >= 0:
        raise UserError("config.log.peak_flops_per_device must be >= 0 (0: from the device kind), got "
                        f"{c.log.peak_flops_per_device!r}")


_DTYPES = ("float32", "bfloat16", "float16")


def _check_ranges(c: mlc.ConfigDict) -> None:
    """Values that used to be accepted and then trained on nonsense (or raised only at step 1): one place,
    the valid range in the message."""
    import math

    from masa_jax.models.qwen.config import ATTENTION_IMPLS, REMAT_POLICIES
    from masa_jax.rewards.answers import FALLBACK_MODES
    from masa_jax.rl.grpo import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS
    from masa_jax.rl.rollout_engine import ENGINES

    def number(name, ok, valid):
        v = c[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise UserError(f"config.{name} must be {valid}, got {v!r}")

    number("rl.lr", lambda v: v > 0, "a finite number > 0")
    number("bc.lr", lambda v: v > 0, "a finite number > 0")
    number("rl.warmup_steps", lambda v: v >= 0 and v == int(v), "an integer >= 0")
    number("rl.clip_low", lambda v: 0 <= v < 1, "in [0, 1)")
    number("rl.clip_high", lambda v: v >= 0, "a finite number >= 0")
    number("rl.kl_coef", lambda v: v >= 0, "a finite number >= 0 (0: no KL term)")
    number("rl.b1", lambda v: 0 <= v < 1, "in [0, 1)")
    number("rl.b2", lambda v: 0 <= v < 1, "in [0, 1)")
    number("rl.eps", lambda v: v > 0, "a finite number > 0")
    number("rl.weight_decay", lambda v: v >= 0, "a finite number >= 0")
    number("rl.clip_norm", lambda v: v > 0, "a finite number > 0")
    number("efficient.gate_min_valid", lambda v: v >= 0 and v == int(v), "an integer >= 0")
    number("efficient.cutoff_factor", lambda v: v > 0, "a finite number > 0")
    number("efficient.gate_std", lambda v: v >= 0, "a finite number >= 0")
    number("efficient.gate_tol", lambda v: v >= 0, "a finite number >= 0")
    number("meta.base", lambda v: 0 < v < 1, "in (0, 1) (the difficulty reward is base ** |error|)")
    number("prompts.min_solution_length", lambda v: v >= 0 and v == int(v), "an integer >= 0")
    number("rollout.max_response_length", lambda v: v == int(v) and v <= 1 << 20, "an integer <= 1048576")
    number("reward.batch_budget_s", lambda v: v > 0, "a finite number of seconds > 0")
    number("reward.per_item_timeout_s", lambda v: v > 0, "a finite number of seconds > 0")
    number("compile_cache.min_compile_time_s", lambda v: v >= 0, "a finite number of seconds >= 0")
    names = meta_lib.component_names()
    if len(c.meta.weights) != len(names) or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0
                                                    for w in c.meta.weights):
        raise UserError(f"config.meta.weights must be {len(names)} weights >= 0 summing to 1, one per reward "
                        f"component {names}, got {c.meta.weights}")
    choices = {"model.param_dtype": _DTYPES, "model.dtype": _DTYPES, "model.remat": REMAT_POLICIES,
               "model.attention_impl": ATTENTION_IMPLS, "rl.kl_estimator": tuple(KL_ESTIMATORS),
               "rl.loss_agg": tuple(LOSS_AGGREGATIONS),
               "rl.advantage": tuple(ADVANTAGE_ESTIMATORS), "reward.answer_fallback": FALLBACK_MODES,
               "rollout.engine": tuple(sorted(ENGINES))}
    for name, valid in choices.items():
        if c[name] not in valid:
            raise UserError(f"config.{name} must be one of {valid}, got {c[name]!r}")
    if not isinstance(c.model.scan_layers, bool):
        raise UserError(f"config.model.scan_layers must be True or False, got {c.model.scan_layers!r}")
    if not c.model.scan_layers and c.model.scan_unroll != 1:
        raise UserError(f"config.model.scan_unroll={c.model.scan_unroll} unrolls the layer scan, but "
                        "config.model.scan_layers=False runs no scan: set scan_unroll to 1")
    for name, fields in (("prompts.meta_template", prompts_lib.META_FIELDS),
                         ("prompts.solution_template", prompts_lib.SOLUTION_FIELDS)):
        _check_template(name, c[name], fields)
    if c.mesh.topology:
        from masa_jax.compile_check import slice_info
        slice_info(c.mesh.topology)  # a UserError naming the known slices
    shape = tuple(c.mesh.shape)
    if len(shape) != 3 or any(not isinstance(d, int) or (d < 1 and d != -1) for d in shape) or shape.count(-1) > 1:
        raise UserError(f"config.mesh.shape must be 3 sizes (data, fsdp, tensor), each >= 1 or one -1, got {shape}")


def _check_lora(c: mlc.ConfigDict) -> None:
    from masa_jax.models.qwen.lora import TARGETS
    from masa_jax.models.qwen.quantize import QTYPES

    rank, alpha, targets = c.lora.rank, c.lora.alpha, c.lora.targets
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"config.lora.rank must be an integer >= 0 (0: no LoRA, full fine-tuning), got {rank!r}")
    quant = c.lora.base_quantization
    if quant not in ("",) + tuple(QTYPES):
        raise UserError(f"config.lora.base_quantization must be one of {['', *QTYPES]}, got {quant!r}")
    if rank == 0:
        if quant:  # full fine-tuning trains the base: there is no frozen base to quantize
            raise UserError(f"config.lora.base_quantization={quant!r} needs LoRA (config.lora.rank >= 1): it "
                            "quantizes the frozen base, and full fine-tuning trains every weight")
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"config.lora.alpha must be a finite number > 0 (the scale is alpha / rank), got {alpha!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise UserError(f"config.lora.targets must be distinct names from {list(TARGETS)}, got {list(targets)}"
                        + (f" (unknown: {unknown})" if unknown else ""))


def _check_template(name: str, template: str, fields: tuple[str, ...]) -> None:
    """A config template ("" = the default) formats with `fields` and contains the problem."""
    if not template:
        return
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:  # a lone "{" or "}"
        raise UserError(f"config.{name} is not a format string ({e}): write literal braces as {{{{ }}}}") from e
    if used - set(fields):
        raise UserError(f"config.{name} has unknown placeholders {sorted(used - set(fields))}: the fields are "
                        f"{list(fields)}")
    if "question" not in used:
        raise UserError(f"config.{name} has no {{question}} placeholder: the prompt would not contain the problem")


def override(config: mlc.ConfigDict, overrides: dict) -> mlc.ConfigDict:
    """Sets dotted fields ({"rl.lr": 1e-3}) in place, as --config.<field> does; returns the config."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def features(config) -> Features:
    """The features of `config.algorithm` (see ALGORITHM_FEATURES)."""
    return ALGORITHM_FEATURES[config.algorithm]


def uses_meta(config) -> bool:
    return features(config).meta_path
