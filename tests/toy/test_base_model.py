"""The shipped toy base model (masa_jax/toy/assets/base_model): a complete HF directory that masa_jax and
transformers load to the same logits, small enough to live in the repo, whose tokenizer the trainer's
codec reads, which answers an easy toy problem in the \\boxed{} format and writes a meta output that
meta.parse reads; plus the tiny config that points at it. Rebuild it with experiments/build_toy_base.py."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from masa_jax.models import qwen
from masa_jax.rewards import math as math_lib
from masa_jax.rewards import meta as meta_lib
from masa_jax.rl import prompts
from masa_jax.tokenization import load_codec
from masa_jax.toy import defaults, world
from masa_jax.toy.tokenizer import TOKENIZER_DIR

pytestmark = pytest.mark.slow  # samples the shipped base model

MODEL_DIR = defaults.BASE_MODEL_DIR
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def loaded():
    return qwen.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def codec():
    return load_codec(MODEL_DIR)


def test_directory_is_complete_and_small():
    files = set(os.listdir(MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in files)
    assert size <= 10_000_000, f"{MODEL_DIR} is {size} bytes"
    # The tokenizer files are the committed toy tokenizer, byte for byte.
    for name in os.listdir(TOKENIZER_DIR):
        with open(os.path.join(TOKENIZER_DIR, name), "rb") as a, open(os.path.join(MODEL_DIR, name), "rb") as b:
            assert a.read() == b.read(), name


def test_config_is_a_small_tied_qwen3(loaded, codec):
    cfg, params = loaded
    assert cfg.family == "qwen3" and cfg.tie_word_embeddings and cfg.param_dtype == "float32"
    assert cfg.vocab_size == len(codec.tokenizer)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == cfg.num_params() and 500_000 <= n <= 5_000_000


def test_codec_loads_from_the_model_dir(codec):
    toy = load_codec(TOKENIZER_DIR)
    assert set(codec.eos_ids) == {0, 2} and codec.pad_id == 0
    msgs = prompts.solution_prompt("Compute 3+4.", template=defaults.SOLUTION_TEMPLATE)
    assert codec.encode_chat(msgs) == toy.encode_chat(msgs)


def test_transformers_logits_match(loaded, codec):
    torch = pytest.importorskip("torch")
    from transformers import Qwen3ForCausalLM

    cfg, params = loaded
    hf = Qwen3ForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    p = world.heldout(5)[4]  # a level-5 problem: the longest prompt + solution
    ids = codec.encode_chat(prompts.solution_prompt(p.question, template=defaults.SOLUTION_TEMPLATE))
    ids += codec.encode(p.solution)
    ours = np.asarray(qwen.forward(cfg, params, jnp.asarray([ids], jnp.int32)))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _greedy(cfg, params, prompt: list[int], eos: tuple[int, ...], max_new: int = 64) -> list[int]:
    """Plain greedy decoding over a fixed-size buffer with the full forward (one compile)."""
    S = len(prompt) + max_new
    buf = np.zeros((1, S), np.int32)
    buf[0, :len(prompt)] = prompt
    fwd = jax.jit(lambda t, m: qwen.forward(cfg, params, t, m))
    out = []
    for t in range(len(prompt), S):
        logits = fwd(buf, np.arange(S)[None] < t)
        nxt = int(jnp.argmax(logits[0, t - 1]))
        if nxt in eos:
            break
        buf[0, t] = nxt
        out.append(nxt)
    return out


def _estimate_of(answer: str) -> str:
    value = int(answer)
    tens = int(abs(value) / 10 + 0.5)
    return str(tens * 10 if value >= 0 else -tens * 10)


def _worked_or_estimate(text: str, answer: str) -> None:
    """The base model answers with a worked solution or the hasty teacher's estimate (the more likely
    first token wins under greedy decoding); either way it ends in the right \\boxed{} value."""
    boxed = math_lib.last_boxed(text)
    if text.startswith("estimate "):
        assert boxed == _estimate_of(answer) and text == f"estimate {boxed}\n\\boxed{{{boxed}}}", text
    else:  # the recipe measured ~95 % worked level-1 accuracy; a wrong answer means a broken rebuild
        assert boxed == answer, text


def test_greedy_level1_answer_is_boxed(loaded, codec):
    cfg, params = loaded
    p = world.heldout(1)[0]
    assert p.difficulty == 1
    prompt = codec.encode_chat(prompts.solution_prompt(p.question, template=defaults.SOLUTION_TEMPLATE))
    _worked_or_estimate(codec.decode(_greedy(cfg, params, prompt, codec.eos_ids)), p.answer)
    # Forced onto the worked path (its first word), greedy decoding solves it.
    verb = p.solution.split()[0] + " "
    worked = codec.decode(codec.encode(verb) + _greedy(cfg, params, prompt + codec.encode(verb), codec.eos_ids))
    assert math_lib.last_boxed(worked) == p.answer, (p.question, worked)


def test_greedy_level1_answer_survives_a_hint(loaded, codec):
    """MASA-efficient appends a notion hint after its switch-over; the base model must still answer."""
    cfg, params = loaded
    p = world.heldout(6)[5]
    assert p.difficulty == 1
    hint = world.NOTIONS[:defaults.MAX_HINT_NOTIONS]
    prompt = codec.encode_chat(prompts.solution_prompt(p.question, hint_notions=hint,
                                                       template=defaults.SOLUTION_TEMPLATE))
    _worked_or_estimate(codec.decode(_greedy(cfg, params, prompt, codec.eos_ids)), p.answer)
    verb = p.solution.split()[0] + " "
    worked = codec.decode(codec.encode(verb) + _greedy(cfg, params, prompt + codec.encode(verb), codec.eos_ids))
    assert math_lib.last_boxed(worked) == p.answer, (p.question, worked)


def test_greedy_meta_output_parses(loaded, codec):
    cfg, params = loaded
    p = world.heldout(3)[2]
    prompt = codec.encode_chat(prompts.meta_prompt(
        p.question, max_length=defaults.MAX_RESPONSE_LENGTH, k=defaults.K,
        min_length=defaults.MIN_SOLUTION_LENGTH, template=defaults.META_TEMPLATE))
    text = codec.decode(_greedy(cfg, params, prompt, codec.eos_ids, max_new=defaults.META_MAX_NEW_TOKENS))
    pred = meta_lib.parse(text, k=defaults.K, min_length=defaults.MIN_SOLUTION_LENGTH,
                          max_length=defaults.MAX_RESPONSE_LENGTH)
    assert all(field is not None for field in pred), text


def test_tiny_config_uses_the_shipped_model_and_its_templates():
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(REPO, "configs", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert os.path.samefile(c.model.path, MODEL_DIR)
    assert c.prompts.meta_template == defaults.META_TEMPLATE
    assert c.prompts.solution_template == defaults.SOLUTION_TEMPLATE
    assert c.prompts.min_solution_length == defaults.MIN_SOLUTION_LENGTH
    assert c.rollout.max_response_length == defaults.MAX_RESPONSE_LENGTH and c.meta.k == defaults.K
    assert c.algorithm == "masa_efficient"
    assert c.efficient.max_hint_notions == defaults.MAX_HINT_NOTIONS


def test_pass_rate_varies_with_difficulty(loaded, codec):
    """What the tiny run needs from its base model: at temperature 1 with G = 8 samples, about half of the
    answers on every level are the hasty teacher's estimates (a behaviour GRPO can unlearn on some
    problems and carry over to others, experiments/build_toy_base.py), worked level-1 answers are mostly
    right, worked level-2 answers in between, level 5 ~never right, and most level-1 and level-2 groups
    are mixed (a GRPO signal). Recipe numbers: docs/results.md."""
    from masa_jax import sampling

    cfg, params = loaded
    problems = [p for p in world.heldout(60) if p.difficulty in (1, 2, 5)]  # 12 per level
    G = 8
    ids = [codec.encode_chat(prompts.solution_prompt(p.question, template=defaults.SOLUTION_TEMPLATE))
           for p in problems for _ in range(G)]
    out = sampling.generate(cfg, params, ids, rng=jax.random.key(0), max_new_tokens=defaults.MAX_RESPONSE_LENGTH,
                            temperature=1.0, eos_ids=codec.eos_ids)
    texts = [codec.decode(r) for r in out.tokens]
    ok = np.asarray([math_lib.extract_answer(t) == problems[i // G].answer
                     for i, t in enumerate(texts)]).reshape(len(problems), G)
    estimate = np.asarray([t.startswith("estimate ") for t in texts]).reshape(len(problems), G)
    level = np.asarray([p.difficulty for p in problems])[:, None].repeat(G, 1)
    assert 0.3 <= estimate[level <= 2].mean() <= 0.7
    assert ok[(level == 1) & ~estimate].mean() >= 0.8
    assert 0.15 <= ok[(level == 2) & ~estimate].mean() <= 0.85
    assert 0.3 <= ok[level == 1].mean() <= 0.8
    n_ok = ok.sum(1)
    mixed = (n_ok > 0) & (n_ok < G)
    assert mixed[level[:, 0] == 1].mean() >= 0.5
    assert ok[level == 5].mean() <= 0.05
