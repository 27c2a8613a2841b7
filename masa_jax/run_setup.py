"""One training run's pieces, built once before the loop (`build_run`): mesh, model, tokenizer, data,
verifier, updater, checkpoints, logs and the rollout engine; the checks a start makes before building
anything, and where a run without a workdir writes. `train.py` is the loop over them."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import jax

from masa_jax import checkpointing, components, errors, fs
from masa_jax import metrics as metrics_lib
from masa_jax.data import pipeline, run_problems
from masa_jax.models import qwen
from masa_jax.models.qwen.presets import model_config_for
from masa_jax.parallel import mesh as mesh_lib
from masa_jax.parallel import multihost
from masa_jax.rewards import math as math_reward
from masa_jax.rl import rollout as rollout_lib
from masa_jax.rl import rollout_engine
from masa_jax.rl import update as update_lib
from masa_jax.tokenization import ChatCodec, load_codec

log = logging.getLogger("masa_jax.train")


@dataclasses.dataclass
class Run:
    """The components of one training run (built once by `build_run`, then only read by the loop)."""
    config: object
    workdir: str
    mesh: jax.sharding.Mesh
    model_cfg: qwen.ModelConfig
    codec: ChatCodec
    data: pipeline.BatchIterator
    verifier: math_reward.MathVerifier
    updater: update_lib.Updater
    rollout_cfg: rollout_lib.RolloutConfig
    checkpointer: checkpointing.RunCheckpointer
    writer: metrics_lib.MetricsWriter
    eval_problems: list                  # this host's share of the held-out problems (config.eval.files)
    engine: rollout_engine.RolloutEngine  # the sampler (config.rollout.engine), or a scripted policy


def build_run(config, workdir: str, generate_fn: Callable | None = None) -> Run:
    """Everything the loop needs: mesh, model, tokenizer, data, verifier, train step, checkpoints, logs."""
    m = config.mesh
    mesh_lib.initialize_distributed(m.coordinator_address or None, m.num_processes, m.process_id, auto=m.tpu_pod)
    mesh = mesh_lib.make_mesh(m.shape)
    fs.makedirs(workdir)
    if jax.process_index() == 0:
        checkpointing.write_config(config, workdir)
    codec = load_codec(config.model.tokenizer_path)
    rcfg = components.rollout_config(config)
    try:  # data before the model: a bad file stops the start in seconds, not after loading the weights
        eval_problems, eval_questions = run_problems.load_eval_problems(config)
        problems, data_stats = run_problems.load_training_problems(config, codec, rcfg, exclude_questions=eval_questions)
        failure = None
    except errors.UserError as e:  # a malformed row in one host's share: every host must stop, not hang
        problems, data_stats, failure = [], {}, str(e)
    shares = multihost.allgather_json({"n": len(problems), "error": failure})
    if any(sh["error"] for sh in shares):
        raise errors.UserError(next(sh["error"] for sh in shares if sh["error"]))
    shard_sizes = [sh["n"] for sh in shares]
    if not min(shard_sizes):
        raise errors.UserError(f"no training problems left for host(s) {[i for i, n in enumerate(shard_sizes) if not n]} "
                               f"of {len(shard_sizes)} from {list(config.data.train_files)} (after data.max_prompt_length="
                               f"{config.data.max_prompt_length}): each host trains on its own block of rows")
    per_host = pipeline.per_host_batch_size(config.data.problems_per_step, jax.process_count())
    data = pipeline.batches(problems, batch_size=per_host, seed=config.seed, shuffle=config.data.shuffle,
                            sharded=True, shard_sizes=shard_sizes)
    log.info("training problems: %d on this host of %d (%s)", len(problems), sum(shard_sizes), data_stats)
    checkpointer = checkpointing.RunCheckpointer(fs.join(workdir, "checkpoints"),
                                                 max_to_keep=config.checkpoint.max_to_keep)
    ucfg = components.updater_config(config)
    model_cfg = model_config_for(config)
    params = None
    # A resume restores the whole train state: the HF weights are read only for a fresh run, or for a
    # LoRA run's frozen base (its checkpoints hold the adapters).
    if checkpointer.latest_step() is None or ucfg.lora is not None:
        model_cfg, params = qwen.from_pretrained(fs.local_copy(config.model.path), dtype=model_cfg.param_dtype,
                                                 mesh=mesh, compute_dtype=model_cfg.dtype, remat=model_cfg.remat,
                                                 attention_impl=model_cfg.attention_impl)
    verifier = math_reward.MathVerifier(components.verifier_config(config))
    updater = update_lib.Updater.create(ucfg, model_cfg, params, mesh, pad_id=codec.pad_id)
    run_config = json.loads(json.dumps(config.to_dict(), default=str))  # as config.json holds it
    writer = metrics_lib.MetricsWriter(workdir, use_tensorboard=config.log.tensorboard, use_wandb=config.log.wandb,
                                       wandb_project=config.log.wandb_project, is_primary=jax.process_index() == 0,
                                       wandb_config=run_config, hparams=run_config)
    engine = (rollout_engine.FunctionEngine(generate_fn) if generate_fn is not None
              else components.rollout_engine_for(config, model_cfg, codec.eos_ids, mesh))
    return Run(config, workdir, mesh, model_cfg, codec, data, verifier, updater, rcfg, checkpointer, writer,
               eval_problems, engine)


def check_inputs(config, workdir: str, allow_config_change: bool = False) -> None:
    """UserErrors a run would otherwise meet only after building the model (or mid-way through its start)."""
    errors.check_workdir(workdir)
    checkpointing.check_config_change(config, workdir, allow_config_change)
    errors.check_model_dir(config)
    errors.check_data_file_names(config.data.train_files)
    errors.check_data_file_names(config.eval.files, field="config.eval.files")


def first_missing_dir(path: str) -> str | None:
    """The outermost directory that creating `path` would create (None: it exists). An object store has
    no directories: there it is `path` itself unless something is stored under it."""
    if fs.is_remote(path):
        return None if fs.exists(path) else path
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def default_workdir(config) -> str:
    """runs/<algorithm> under the cwd: where a run without --workdir (or `train(config, "")`) writes."""
    return os.path.join("runs", config.algorithm)
