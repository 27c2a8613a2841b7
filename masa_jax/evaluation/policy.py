"""The policy of a checkpoint, for evaluation: an HF model directory, or a training run (its workdir or
checkpoints/ folder) restored from its newest Orbax checkpoint, LoRA adapters merged into their base."""
from __future__ import annotations

import json
import os

import jax

from masa_jax import checkpointing, components, errors, fs
from masa_jax.models import qwen
from masa_jax.models.qwen import lora
from masa_jax.models.qwen.presets import model_config_for
from masa_jax.parallel import mesh as mesh_lib
from masa_jax.rl import train_step
from masa_jax.rl import update as update_lib


def load_policy(config, checkpoint: str):
    """(model_cfg, params, mesh) from an HF directory (has config.json) or from an Orbax run checkpoint;
    a LoRA run's (config.lora.rank > 0) adapters come back merged into the base of config.model.path."""
    check_checkpoint(checkpoint)
    if errors.is_hf_dir(checkpoint):
        mesh = mesh_lib.make_mesh(config.mesh.shape)
        cfg, params = qwen.from_pretrained(fs.local_copy(checkpoint), dtype=config.model.param_dtype, mesh=mesh,
                                           compute_dtype=config.model.dtype)
        return cfg, params, mesh
    model_cfg, state, lora_cfg, mesh = restore_run(config, checkpoint)
    if lora_cfg is None:
        return model_cfg, state.params, mesh
    # A LoRA run: its adapters on the base of model.path, merged (W + alpha/r B A) once for sampling.
    policy = train_step.policy_params(state, lora_cfg)
    shardings = train_step.param_shardings(model_cfg, mesh)
    return model_cfg, jax.jit(lora.merge_attached, out_shardings=shardings)(policy), mesh


def restore_run(config, checkpoint: str):
    """(model_cfg, train state, lora_cfg or None, mesh) of a training run's newest checkpoint; a LoRA run's
    state has its frozen base (config.model.path, quantized as the run had it) put back."""
    check_checkpoint(checkpoint)
    mesh = mesh_lib.make_mesh(config.mesh.shape)
    ucfg = components.updater_config(config)
    model_cfg, params = model_config_for(config), None
    if ucfg.lora is not None:  # the frozen base is not in the checkpoint; full fine-tuning restores everything
        _, params = qwen.from_pretrained(fs.local_copy(config.model.path), dtype=config.model.param_dtype, mesh=mesh,
                                         compute_dtype=config.model.dtype)
    updater = update_lib.Updater.create(ucfg, model_cfg, params, mesh, pad_id=0)
    ckpt_dir = fs.join(checkpoint, "checkpoints") if fs.isdir(fs.join(checkpoint, "checkpoints")) \
        else checkpoint
    restored = checkpointing.RunCheckpointer(ckpt_dir, max_to_keep=1000).restore_latest(updater.restore_template())
    if restored is None:
        raise errors.UserError(f"no checkpoint found in {checkpoint}: {CHECKPOINT_HINT}")
    return model_cfg, updater.restored_state(restored[0]), updater.lora_cfg, mesh


CHECKPOINT_HINT = "pass a training workdir, its checkpoints/ folder or an HF model directory"


def check_checkpoint(checkpoint: str) -> None:
    """A UserError unless `checkpoint` is a directory. Checked before Orbax opens it: its
    CheckpointManager would create a missing one."""
    if not fs.isdir(checkpoint):
        raise errors.UserError(f"--checkpoint {checkpoint} is not a directory: {CHECKPOINT_HINT}")


def run_config(checkpoint: str):
    """The config.json a training run writes into its workdir (looked up in `checkpoint` and, for a
    checkpoints/ folder, its parent), as a ConfigDict; None when there is none."""
    from masa_jax import config as config_lib
    for d in (checkpoint, fs.parent(checkpoint.rstrip("/")) if fs.is_remote(checkpoint)
              else os.path.dirname(os.path.abspath(checkpoint))):
        path = fs.join(d, "config.json")
        if fs.isfile(path) and not errors.is_hf_dir(d):
            stored = json.loads(fs.read_text(path))
            if "model" in stored and "algorithm" in stored:
                c = config_lib.base_config()
                c.unlock()
                _merge_into(c, stored)
                return c
    return None


def _merge_into(c, d: dict) -> None:
    for k, v in d.items():
        if isinstance(v, dict) and k in c and hasattr(c[k], "keys"):
            _merge_into(c[k], v)
        else:
            c[k] = tuple(v) if isinstance(v, list) else v
