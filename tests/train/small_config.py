"""The small trainer config of the end-to-end tests (imported by conftest.py and by mp_worker.py,
which runs as a script in its own processes)."""
from masa_jax.config import base_config, override


def make_small_config(model_dir: str, algorithm: str = "masa", **overrides):
    """A few-second config: 2 problems per step, G = M = 2, short responses, float32 on CPU."""
    c = base_config()
    c.algorithm = algorithm
    c.total_steps = 3
    c.model.path = model_dir
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.mesh.shape = (1, -1, 1)
    c.data.train_files = ("toy:64",)
    c.data.problems_per_step = 2
    c.data.max_prompt_length = 512
    c.rollout.num_solutions = 2
    c.rollout.num_meta = 2
    c.rollout.max_response_length = 24
    c.rollout.meta_max_new_tokens = 24
    c.rollout.num_slots = 8
    c.prompts.min_solution_length = 4
    c.prompts.meta_template = ("Assess {question} Write <meta>...</meta>, then JSON with math_notion, "
                               "pass_rate (0-{k}), solution_length ({min_length}-{max_length}).")
    c.prompts.solution_template = "{question} Answer in \\boxed{{}}."
    c.efficient.switch_step = 1
    c.bc.buffer_size = 2
    c.bc.steps = 1
    c.bc.min_notion_reward = 0.0
    c.rl.lr = 1e-3
    c.rl.warmup_steps = 1
    c.rl.micro_batch_size = 2
    c.rl.chunk_size = 64
    c.reward.num_workers = 1
    c.checkpoint.every = 1
    c.checkpoint.max_to_keep = 3
    c.log.tensorboard = True
    return override(c, overrides)
