"""Qwen3-0.6B-Base with MASA-efficient on one Colab TPU: a v5e-1 (1 chip, 16 GiB HBM) or a v2-8
(8 cores of 8 GiB); also one 16 GiB GPU. Full fine-tuning (float32 master weights and AdamW moments,
bfloat16 compute, full remat) fits a v5e chip by XLA's count, so no LoRA is needed:

    python -m masa_jax.train --config=configs/qwen3_0p6b_colab.py --dry_run     # XLA, for mesh.topology
    python -m masa_jax.train --config=configs/qwen3_0p6b_colab.py --dry_run --dry_run_devices=8 \
        --config.mesh.device_memory_gib=8 --config.rl.micro_batch_size=8       # v2-8: the rough formula

(README "Colab TPU" has the output; docs/benchmarks.md "XLA compile check" the numbers per program: the
train step at micro-batch 2 needs 14.21 GiB of the chip, 4 would need 15.42, 8 XLA refuses.)
notebooks/colab_tpu_qwen3.ipynb runs it: it downloads the checkpoint from the HF Hub, writes GSM8K as
JSONL and sets model.path / data.train_files; from a shell, pass them:
--config.model.path=DIR --config.data.train_files="('train.jsonl',)".

Against configs/qwen1p7b.py: responses of at most 1024 tokens (meta 256), 8 problems x (8 + 8)
rollouts per step, micro-batches of 2 sequences, 256-token log-prob chunks (a [2, 256, 151936] float32
chunk is 0.3 GiB) and 16 decode slots (the KV cache of a slot at 1536 tokens is 0.16 GiB).
"""
from masa_jax.config import base_config


def get_config():
    c = base_config()
    c.algorithm = "masa_efficient"
    c.total_steps = 20
    c.model.path = ""                        # set by the notebook (snapshot_download) or --config.model.path
    c.model.preset = "qwen3-0.6b"            # for --dry_run without the checkpoint
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.shape = (1, -1, 1)                # FSDP over whatever the host has (1 chip, 8 cores, a GPU)
    c.mesh.topology = "v5e-1"               # --dry_run compiles for it (HBM per chip: compile_check.SLICES)
    c.data.train_files = ("",)               # set by the notebook or --config.data.train_files
    c.data.problems_per_step = 8
    c.data.max_prompt_length = 512           # the paper's meta prompt plus a GSM8K / MATH problem
    c.rollout.num_solutions = 8
    c.rollout.num_meta = 8
    c.rollout.max_response_length = 1024
    # The authors cap meta outputs at the response length (8192, the default here); a free Colab chip cannot
    # afford 8 x 8 meta rollouts that long, so this cap trades fidelity for time: a meta answer cut off before
    # its JSON parses as malformed and scores 0 (meta/truncated_rate in the logs says how often).
    c.rollout.meta_max_new_tokens = 256
    # 16 slots: with 32 the decode loop (KV cache 5.25 GiB + 3.9 GiB of XLA temporaries) next to the
    # resident train state needs 16.9 GiB of a v5e chip's 16 (docs/benchmarks.md, "XLA compile check").
    c.rollout.num_slots = 16
    c.prompts.min_solution_length = 32
    c.efficient.switch_step = 10
    c.bc.buffer_size = 32
    c.bc.steps = 2
    c.bc.lr = 1e-6
    c.rl.lr = 1e-6
    c.rl.warmup_steps = 2
    c.rl.mini_batch_size = 0                 # one update per step (8 problems)
    c.rl.micro_batch_size = 2
    c.rl.chunk_size = 256
    c.reward.num_workers = 2
    c.checkpoint.every = 10
    c.checkpoint.max_to_keep = 2             # a train state is ~7 GiB on disk (float32 params + AdamW)
    return c
