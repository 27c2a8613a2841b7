"""The policy of a checkpoint, for evaluation: an HF model directory, or a training run (its workdir or
checkpoints/ folder) restored from its newest Orbax checkpoint, LoRA adapters merged into their base."""
from __future__ import annotations

import jax

from masa_jax import checkpointing, errors, fs
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
    mesh = mesh_lib.make_mesh(config.mesh.shape)
    if errors.is_hf_dir(checkpoint):
        cfg, params = qwen.from_pretrained(fs.local_copy(checkpoint), dtype=config.model.param_dtype, mesh=mesh,
                                           compute_dtype=config.model.dtype)
        return cfg, params, mesh
    model_cfg = model_config_for(config)
    model_cfg, params = qwen.from_pretrained(fs.local_copy(config.model.path), dtype=config.model.param_dtype,
                                             mesh=mesh, compute_dtype=config.model.dtype)
    updater = update_lib.Updater.create(config, model_cfg, params, mesh, pad_id=0)
    ckpt_dir = fs.join(checkpoint, "checkpoints") if fs.isdir(fs.join(checkpoint, "checkpoints")) \
        else checkpoint
    restored = checkpointing.RunCheckpointer(ckpt_dir, max_to_keep=1000).restore_latest(
        train_step.checkpoint_view(updater.state))
    if restored is None:
        raise errors.UserError(f"no checkpoint found in {checkpoint}: {CHECKPOINT_HINT}")
    if updater.lora_cfg is None:
        return model_cfg, restored[0].params, mesh
    # A LoRA run: its adapters on the base of model.path, merged (W + alpha/r B A) once for sampling.
    policy = train_step.policy_params(train_step.with_base(restored[0], updater.state.base_params), updater.lora_cfg)
    shardings = train_step.param_shardings(model_cfg, mesh)
    return model_cfg, jax.jit(lora.merge_attached, out_shardings=shardings)(policy), mesh


CHECKPOINT_HINT = "pass a training workdir, its checkpoints/ folder or an HF model directory"


def check_checkpoint(checkpoint: str) -> None:
    """A UserError unless `checkpoint` is a directory. Checked before Orbax opens it: its
    CheckpointManager would create a missing one."""
    if not fs.isdir(checkpoint):
        raise errors.UserError(f"--checkpoint {checkpoint} is not a directory: {CHECKPOINT_HINT}")
