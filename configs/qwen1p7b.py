"""Qwen3-1.7B-Base on a single host: 4 chips of 32 GiB (TPU v6e-4, or a v4-8) or one 80 GB GPU.

`--dry_run` compiles for the v6e-4 (config.mesh.topology): libtpu's compile-only client does not model
v4's megacore chips (compile_check.SLICES); a v4-8 has the same 4 x 32 GiB.
"""
from masa_jax.config import base_config


def get_config():
    c = base_config()
    c.algorithm = "masa_efficient"
    c.model.path = "/path/to/Qwen3-1.7B-Base"
    c.model.preset = "qwen3-1.7b"               # for --dry_run without the checkpoint
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.topology = "v6e-4"               # --dry_run compiles for it (HBM per chip: compile_check.SLICES)
    c.mesh.shape = (1, -1, 1)          # pure FSDP over the host's chips
    c.data.train_files = ("/path/to/deepscaler/train.parquet",)
    c.data.problems_per_step = 64
    c.rollout.max_response_length = 4096
    c.rollout.meta_max_new_tokens = c.rollout.max_response_length  # as the authors: one cap for both paths
    # XLA's count on a v6e-4 (docs/benchmarks.md): 128 slots with a 6144-position cache do not fit (decode
    # needs 45.67 GiB, resize 35.00 GiB of 31.25 per chip); 32 slots cut the cache and decode by 4x.
    c.rollout.num_slots = 32
    c.rl.mini_batch_size = 32          # 64 problems / step in 2 updates (the 8B config: 1 update of 128)
    c.rl.micro_batch_size = 8
    return c
