"""The toy world's embedded defaults: prompt templates, prompt-length knobs and the shipped base model.

One place for everything the base-model recipe (`experiments/build_toy_base.py`) trained with and the
tiny run config (`configs/tiny.py`) must therefore send: a 1-3 M parameter model only follows the
prompts it was fine-tuned on, so the trainer's prompts have to be byte-identical to the recipe's.
That includes the values the meta template prints (`K`, `MIN_SOLUTION_LENGTH`, `MAX_RESPONSE_LENGTH`):
changing one of them changes the prompt text the model sees.

The templates are `masa_jax.rl.prompts` templates (str.format fields, `{{`/`}}` for braces), kept
short because the toy tokenizer is character-level: every prompt character is a token that each
rollout and each training step pays for.
"""
from __future__ import annotations

import os

# Solution prompt: the paper's step-by-step / \boxed{} instruction, shortened.
SOLUTION_TEMPLATE = "{question} Answer in \\boxed{{}}."

# Meta prompt: assess without solving, <meta> reasoning, then the one JSON object `meta.parse` reads.
# The key names are single tokens of the toy tokenizer.
META_TEMPLATE = (
    "Assess, do not solve: {question}\n"
    "<meta> notes </meta> then JSON: math_notion, pass_rate 0-{k}, solution_length {min_length}-{max_length}."
)

K = 8                     # pass_rate counts correct attempts out of K (config meta.k)
MIN_SOLUTION_LENGTH = 8   # toy solutions are ~10-100 tokens (config prompts.min_solution_length)
MAX_RESPONSE_LENGTH = 128  # longest toy solution is ~100 tokens (config rollout.max_response_length)
META_MAX_NEW_TOKENS = 64   # the meta outputs the base model is trained on are <= 52 tokens
MAX_HINT_NOTIONS = 3       # hints in the recipe name 1-3 notions (config efficient.max_hint_notions):
                           # with 5 the prompt outgrows what the model saw and level 1 drops to ~14 %

# The shipped HF directory (config.json, model.safetensors, tokenizer files) built by the recipe.
BASE_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "base_model")
