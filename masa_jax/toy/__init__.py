"""The toy world: generated integer-arithmetic problems and a character-level Qwen-style tokenizer.

    from masa_jax.toy import world, tokenizer
    train = world.source(seed=0)                 # unbounded random-access stream of Problems
    fixed = world.load_spec("toy:20000")         # the first 20000 of them (config string)
    evals = world.heldout(500)                   # fixed evaluation set, levels 1..5
    world.notions_of(evals[0])                   # ("add", "carry") etc.
    tok = tokenizer.load_tokenizer()             # AutoTokenizer on masa_jax/toy/assets/tokenizer
"""

from masa_jax.toy import solver, tokenizer, world
from masa_jax.toy.world import (
    LEVELS,
    NOTIONS,
    heldout,
    load_spec,
    notions_of,
    problem_at,
    solve,
    source,
    stream,
    training_problems,
)

__all__ = [
    "LEVELS",
    "NOTIONS",
    "heldout",
    "load_spec",
    "notions_of",
    "problem_at",
    "solve",
    "solver",
    "source",
    "stream",
    "tokenizer",
    "training_problems",
    "world",
]
