"""Qwen3-14B-Base with the paper's MASA-efficient recipe on a larger pod slice (v5p-128 / v4-128)."""
from masa_jax.config import base_config


def get_config():
    c = base_config()
    c.algorithm = "masa_efficient"
    c.model.path = "/path/to/Qwen3-14B-Base"
    c.model.preset = "qwen3-14b"               # for --dry_run without the checkpoint
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    # 64 chips, a 4x4x4 torus: tensor-parallel over one physical axis of 4 (40 q-heads / 8 kv-heads shard
    # over 4), FSDP over the other two (16). A tensor axis of 8 has no place on that torus (no product of
    # physical axis sizes is 8 once fsdp takes its share): jax.make_mesh refuses (1, 8, 8) there.
    c.mesh.topology = "v5p-128"               # --dry_run compiles for it (HBM per chip: compile_check.SLICES)
    c.mesh.shape = (1, 16, 4)
    c.mesh.tpu_pod = True
    c.data.train_files = ("/path/to/deepscaler/train.parquet",)
    # Decode slots PER HOST (each host samples on its own 4 chips, as in qwen8b.py): 512 asked XLA for a
    # 240 GB KV cache per chip (40 layers x 12288 positions); 64 as in qwen8b.
    c.rollout.num_slots = 64
    c.rl.mini_batch_size = 128                 # authors' train_masagrpo.sh line 47 (ppo_mini_batch_size=128), as qwen8b
    c.rl.micro_batch_size = 16                 # a multiple of data x fsdp (16): one sequence per chip
    c.rl.chunk_size = 1024
    return c
