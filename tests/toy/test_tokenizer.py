"""Tests for masa_jax.toy.tokenizer: HF loading, round trips, unknown characters, chat template,
and that the committed assets are exactly what build_tokenizer writes."""

import json
import os
import random
import string

import pytest
from transformers import AutoTokenizer

from masa_jax.toy import tokenizer as toy_tok
from masa_jax.toy import world


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(toy_tok.TOKENIZER_DIR)


def _meta_outputs(rng, n):
    """Meta-rollout texts in the shapes the parser accepts (JSON, single quotes, fences, LaTeX)."""
    out = []
    for _ in range(n):
        notions = rng.sample(world.NOTIONS, rng.randint(0, 4))
        k, length = rng.randint(0, 8), rng.randint(1, 400)
        obj = {"math_notion": notions, "pass_rate": k, "solution_length": length}
        body = rng.choice(
            [
                json.dumps(obj),
                json.dumps(obj, indent=2),
                str(obj),  # single-quoted Python literal
                "```json\n" + json.dumps(obj) + ",\n```",
                '{"math_notion": ["\\\\frac{a}{b}", "x^{2}"], "pass_rate": "7", "solution_length": 12.0,}',
            ]
        )
        reasoning = f"The problem needs {', '.join(notions) or 'nothing'}; about {k}/8 tries succeed."
        out.append(f"<meta>\n{reasoning}\n</meta>\n{body}")
    return out


def test_loads_through_autotokenizer_like_a_qwen_checkpoint(tok):
    assert len(tok) <= 512
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.unk_token == "<|unk|>" and tok.bos_token is None
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]) == [0, 1, 2, 3]
    assert tok.eos_token_id == tok.pad_token_id == 0
    assert toy_tok.load_tokenizer().get_vocab() == tok.get_vocab() == toy_tok.vocabulary()
    # No BOS / EOS is added implicitly: a prompt is exactly its characters.
    assert tok("ab")["input_ids"] == tok.convert_tokens_to_ids(["a", "b"])


def test_round_trip_on_toy_texts_and_meta_outputs(tok):
    problems = list(world.heldout(500, seed=7)) + [world.problem_at(i, seed=7) for i in range(1500)]
    texts = [p.question for p in problems] + [p.solution for p in problems]
    texts += _meta_outputs(random.Random(0), 1000)
    ids = tok(texts)["input_ids"]
    assert tok.batch_decode(ids) == texts
    assert all(tok.unk_token_id not in x for x in ids)
    # Digits are always single tokens; the keywords are one token each.
    assert tok.tokenize("\\boxed{-12045}") == ["\\boxed", "{", "-", "1", "2", "0", "4", "5", "}"]
    for word in toy_tok.KEYWORDS:
        assert tok.tokenize(word) == [word]
    # The keywords shorten the toy texts a lot; a mid-level solution stays well under 100 tokens.
    mid = [len(x) for p, x in zip(problems, ids[len(problems) :]) if p.difficulty == 3]
    assert max(mid) < 100


def test_round_trip_on_arbitrary_ascii(tok):
    rng = random.Random(1)
    alphabet = string.printable  # letters, digits, punctuation, whitespace incl. \r \x0b \x0c
    known = set(toy_tok.CHARACTERS)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(500)]
    texts += ["a , b . ' s  double  space\n\n\ttab", "  leading and trailing  ", "addition address carrying"]
    for text, ids in zip(texts, tok(texts)["input_ids"]):
        if set(text) <= known:
            assert tok.decode(ids) == text
        else:  # \r \x0b \x0c are outside the vocabulary
            assert tok.unk_token_id in ids


def test_unknown_characters_map_to_unk(tok):
    ids = tok("é→ß 中 🙂 x")["input_ids"]
    unk = tok.unk_token_id
    assert ids == [unk, unk, unk, tok.convert_tokens_to_ids(" "), unk, tok.convert_tokens_to_ids(" "), unk,
                   tok.convert_tokens_to_ids(" "), tok.convert_tokens_to_ids("x")]
    assert tok.decode(ids, skip_special_tokens=True) == "   x"
    # Typographic characters common in prompt templates are in the vocabulary.
    assert tok.decode(tok("It’s “fine” — x≤y…")["input_ids"]) == "It’s “fine” — x≤y…"


def test_chat_template_is_qwen_format(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Compute (37+5)*4-12."},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nCompute (37+5)*4-12.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = tok.apply_chat_template(messages[1:], add_generation_prompt=False, tokenize=False)
    assert no_gen == "<|im_start|>user\nCompute (37+5)*4-12.<|im_end|>\n"  # no default system prompt
    multi = messages + [{"role": "assistant", "content": "add 37+5=42 carry\n\\boxed{156}"}]
    assert tok.apply_chat_template(multi, tokenize=False).endswith(
        "<|im_start|>assistant\nadd 37+5=42 carry\n\\boxed{156}<|im_end|>\n"
    )
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    assert tok.decode(ids) == text


def test_committed_assets_equal_a_fresh_build(tmp_path):
    out = toy_tok.build_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(out, name), "rb") as f_new, open(os.path.join(toy_tok.TOKENIZER_DIR, name), "rb") as f_old:
            assert f_new.read() == f_old.read(), f"{name} differs: run python -m masa_jax.toy.tokenizer"
    assert sorted(os.listdir(toy_tok.TOKENIZER_DIR)) == ["tokenizer.json", "tokenizer_config.json"]
    fresh = AutoTokenizer.from_pretrained(out)
    assert fresh("Compute 3+4.")["input_ids"] == AutoTokenizer.from_pretrained(toy_tok.TOKENIZER_DIR)(
        "Compute 3+4."
    )["input_ids"]
