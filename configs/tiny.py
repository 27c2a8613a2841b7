"""MASA-efficient on the toy world with the shipped 0.8 M parameter base model: a whole run on a laptop CPU.

    python -m masa_jax.train --config=configs/tiny.py

The model (masa_jax/toy/assets/base_model, built by experiments/build_toy_base.py) was fine-tuned on
exactly these prompt templates and prompt-length values (masa_jax.toy.defaults): it speaks both
formats; about half of its answers are unworked estimates (the answer rounded to ten, so almost always
wrong), and its worked solutions get level 1 ~always, level 2 about half the time, level 3 rarely and
levels 4-5 never right (docs/results.md). Its meta predictions are uninformative. So there is
something for GRPO to teach that carries over to held-out problems (work the problem out) and something
for the meta reward to teach (calibration). Change a template or a length knob below and the prompts
leave the model's training distribution (rebuild the base model with the recipe if you must).
Timings and what MASA does here: docs/results.md.
"""
from masa_jax.config import base_config
from masa_jax.toy import defaults


def get_config():
    c = base_config()
    c.algorithm = "masa_efficient"
    c.seed = 0
    c.total_steps = 30  # 30 x 8 problems: enough to see the meta reward and the switch-over move

    # Model: the shipped float32 checkpoint (its dir has the tokenizer files too), resolved from the
    # package so the config works from any cwd. Float32 compute and no remat: on CPU bf16 is slower
    # and the activations of a 0.8 M parameter model are tiny.
    c.model.path = defaults.BASE_MODEL_DIR
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.attention_impl = "xla"
    c.model.scan_layers = False  # a Python loop over the 4 layers: XLA CPU's scan costs the update ~10 %

    # One host, whatever devices it has (CPU: one).
    c.mesh.shape = (1, -1, 1)

    # Data: the first 4096 problems of the toy training stream, levels 1..5 uniform: the gating has
    # easy (level 1) and hopeless (levels 4-5) problems to find; the GRPO signal comes from levels 2-3.
    # Prompts are <= ~150 tokens (character-level tokenizer); 192 leaves room for notion hints.
    c.data.train_files = ("toy:4096",)
    c.data.problems_per_step = 8
    c.data.max_prompt_length = 192

    # Rollouts: G = M = 8. Toy solutions are <= ~100 tokens and the base model's meta outputs
    # <= 52; the lengths the meta prompt prints come from the same defaults, so keep them in sync.
    c.rollout.num_solutions = 8
    c.rollout.num_meta = 8
    c.rollout.max_response_length = defaults.MAX_RESPONSE_LENGTH
    c.rollout.meta_max_new_tokens = defaults.META_MAX_NEW_TOKENS
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.num_slots = 64  # 128 rollouts per step: two refills of 64 decode slots

    # Prompts: the short templates the base model was trained on.
    c.prompts.meta_template = defaults.META_TEMPLATE
    c.prompts.solution_template = defaults.SOLUTION_TEMPLATE
    c.prompts.min_solution_length = defaults.MIN_SOLUTION_LENGTH

    # Meta reward: K as in the meta prompt; the paper's difficulty base and equal weights.
    c.meta.k = defaults.K

    # MASA-efficient: switch to meta-first (gating / cutoff / hints) after a third of the run. Hints
    # name at most 3 notions: the base model saw hints of 1-3 notions, and with 5 (the default cap) its
    # level-1 accuracy falls from 0.93 to 0.14 — a 0.8 M parameter model does not generalise to the
    # longer prompt.
    c.efficient.switch_step = 10
    c.efficient.max_hint_notions = defaults.MAX_HINT_NOTIONS

    # Behaviour cloning: 16 expert trajectories fill the buffer in ~2-3 steps of 8 problems.
    c.bc.buffer_size = 16
    c.bc.steps = 2
    c.bc.lr = 1e-4

    # RL: a 0.8 M parameter model fine-tuned at 3.5e-3 takes ~3e-4 where an 8B model needs 1e-6 (learning
    # rates measured: docs/results.md). Two PPO mini-batches of 4 problems per step, so the second update
    # is off-policy and the clip acts. 8 problems x (8 + 8) rollouts = 128 sequences per step, in
    # micro-batches of 32.
    c.rl.lr = 3e-4
    c.rl.warmup_steps = 3
    c.rl.mini_batch_size = 4
    c.rl.ppo_epochs = 1
    c.rl.micro_batch_size = 32
    c.rl.chunk_size = 256

    # Held-out accuracy before the first and after the last step (100 problems, 20 per level, never
    # trained on; 4 samples each at the rollout temperature): the closing table shows both.
    c.eval.files = ("toy-heldout:100:4321",)
    c.eval.num_samples = 4

    # Answers are integers, decided without the sympy workers in almost every case.
    c.reward.num_workers = 1

    c.checkpoint.every = 10
    c.checkpoint.max_to_keep = 2

    c.log.wandb = False
    return c
