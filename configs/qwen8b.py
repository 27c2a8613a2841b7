"""The paper's setup: Qwen3-8B-Base, MASA-efficient, on a TPU v5p-64 / v4-64 pod slice.

Numbers marked (paper) come from the MASA paper's training details (docs/method.md §5).
"""
from masa_jax.config import base_config


def get_config():
    c = base_config()
    c.algorithm = "masa_efficient"
    c.total_steps = 314                        # (paper) 1 epoch of DeepScaleR at 128 problems / step
    c.model.path = "/path/to/Qwen3-8B-Base"    # local HF directory with tokenizer files
    c.model.preset = "qwen3-8b"               # for --dry_run without the checkpoint
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    # 32 chips: FSDP over 8, tensor-parallel over 4 (8 kv-heads shard evenly over 4).
    c.mesh.topology = "v5p-64"               # --dry_run compiles for it (HBM per chip: compile_check.SLICES)
    c.mesh.shape = (1, 8, 4)
    c.mesh.tpu_pod = True
    c.data.train_files = ("/path/to/deepscaler/train.parquet",)
    c.data.problems_per_step = 128             # (paper)
    c.data.max_prompt_length = 2048            # (paper)
    c.rollout.num_solutions = 16               # (paper) G
    c.rollout.num_meta = 16                    # (paper) M
    c.rollout.max_response_length = 8192       # (paper)
    # Authors: meta and solution rollouts in one call capped at the response length (masa_ray_trainer.py:242-247).
    c.rollout.meta_max_new_tokens = c.rollout.max_response_length
    c.rollout.temperature = 1.0                # (paper)
    c.rollout.top_p = 1.0                      # (paper)
    # Decode slots PER HOST: on a pod each host samples its own problems on its own 4 chips
    # (multihost.local_sampling_mesh), so a slot's KV cache (12288 positions) is split over 4 chips only.
    # 64 slots: 16 problems x 32 rollouts per host in 8 refills; 512 would need 216 GiB per chip for the cache alone.
    c.rollout.num_slots = 64
    c.meta.k = 8                               # (paper) pass_rate in 0..8
    c.meta.base = 0.01                         # (paper) b
    c.efficient.switch_step = 120              # (paper) k
    c.bc.buffer_size = 128                     # (paper) N_expert
    c.bc.steps = 5                             # (paper) E_bc
    c.rl.lr = 1e-6                             # (paper)
    c.rl.warmup_steps = 20                     # (paper)
    c.rl.weight_decay = 0.1                    # (paper)
    c.rl.clip_norm = 1.0                       # (paper)
    c.rl.clip_low, c.rl.clip_high = 0.2, 0.28  # (paper) clip-higher
    c.rl.clip_c = 10.0                         # (paper) dual clip
    c.rl.kl_coef = 0.0                         # (paper) beta = 0
    # Not in the paper: the authors' script (akatigre/MASA-RL train_masagrpo.sh line 47,
    # actor.ppo_mini_batch_size=128 with data.train_batch_size=128; verl's default ppo_epochs=1):
    # the step's 128 problems in one mini-batch, one update per step.
    c.rl.mini_batch_size = 128
    c.rl.ppo_epochs = 1
    c.rl.micro_batch_size = 16
    c.rl.chunk_size = 1024
    return c
