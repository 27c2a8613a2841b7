"""The toy world: generated integer-arithmetic problems and a character-level Qwen-style tokenizer.

    from masa_jax.toy import world, tokenizer
    train = world.source(seed=0)                 # unbounded random-access stream of Problems
    evals = world.heldout(500)                   # fixed evaluation set, levels 1..5
    tok = tokenizer.load_tokenizer()             # AutoTokenizer on masa_jax/toy/assets/tokenizer
"""

from masa_jax.toy import tokenizer, world
from masa_jax.toy.world import LEVELS, NOTIONS, heldout, notions_of, problem_at, solve, source, stream

__all__ = [
    "LEVELS",
    "NOTIONS",
    "heldout",
    "notions_of",
    "problem_at",
    "solve",
    "source",
    "stream",
    "tokenizer",
    "world",
]
