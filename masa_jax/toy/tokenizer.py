"""A character-level tokenizer for the toy world, in Hugging Face format (Qwen-style chat).

Vocabulary (ids in this order, < 512 in all):
  0..3   special tokens <|endoftext|> (pad and eos, as in Qwen3 base models), <|im_start|>,
         <|im_end|> and <|unk|> (any character outside the vocabulary);
  then   one token per character: "\\n", "\\t", printable ASCII (space .. "~"), and a few
         typographic characters prompt templates commonly contain (’ “ ” – — … × ≤ ≥ ...);
  then   whole-word tokens for the strings the toy world and the meta format repeat most
         (KEYWORDS: "\\boxed", "<meta>", "add", "carry", "math_notion", ...). They are added
         tokens, matched before the character model runs, so they only shorten sequences: any
         text still round-trips character by character.
Digits stay single characters, so numbers are always spelled digit by digit.

The model is a BPE with no merges (so: one token per known character, <|unk|> otherwise) and a
Fuse decoder (tokens are concatenated, no spaces inserted). `build_tokenizer(out_dir)` writes
tokenizer.json and tokenizer_config.json; load the result exactly like a real Qwen checkpoint:

    transformers.AutoTokenizer.from_pretrained(out_dir)

The committed copy lives in `TOKENIZER_DIR` (masa_jax/toy/assets/tokenizer); a test rebuilds it and
checks both files are byte-identical.
"""

from __future__ import annotations

import json
import os
from typing import Any

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>")
PAD_TOKEN = EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"

_PRINTABLE_ASCII = tuple(chr(c) for c in range(32, 127))
# Typographic characters that hand-written prompt templates tend to contain.
_EXTRA_CHARS = tuple("’‘“”–—…×÷≤≥−·°")
CHARACTERS: tuple[str, ...] = ("\n", "\t") + _PRINTABLE_ASCII + _EXTRA_CHARS

# Strings worth one token each: the meta format, the answer box, and the toy solution words.
KEYWORDS: tuple[str, ...] = (
    "<meta>",
    "</meta>",
    "\\boxed",
    "math_notion",
    "pass_rate",
    "solution_length",
    "Compute",
    "parentheses",
    "first",
    "add",
    "subtract",
    "multiply",
    "carry",
    "borrow",
    "negative",
)

# Qwen's message format without the default system prompt (Qwen3 base models add none either).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_MAX_LENGTH = 8192
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")


def vocabulary() -> dict[str, int]:
    """token -> id for the whole vocabulary (special tokens, characters, keywords)."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS) + list(KEYWORDS)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate token in the toy vocabulary")
    return {t: i for i, t in enumerate(tokens)}


def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = vocabulary()
    base = {t: i for t, i in vocab.items() if t not in KEYWORDS}
    tok = Tokenizer(models.BPE(vocab=base, merges=[], unk_token=UNK_TOKEN, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in KEYWORDS])
    for t in KEYWORDS:
        if tok.token_to_id(t) != vocab[t]:
            raise AssertionError(f"keyword {t!r} got id {tok.token_to_id(t)}, expected {vocab[t]}")
    return tok.to_str(pretty=True) + "\n"


def _tokenizer_config() -> dict[str, Any]:
    vocab = vocabulary()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would turn "a ," into "a," and break round trips
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(vocab[t]): {
                "content": t,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": t in SPECIAL_TOKENS,
            }
            for t in SPECIAL_TOKENS + KEYWORDS
        },
    }


def build_tokenizer(out_dir: str | os.PathLike[str]) -> str:
    """Writes tokenizer.json and tokenizer_config.json into `out_dir` (created if needed).

    Deterministic: the same code always writes byte-identical files. Returns `out_dir` as a str.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(_tokenizer_json())
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    return out_dir


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """`transformers.AutoTokenizer.from_pretrained(path)`; path defaults to the committed toy copy."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path) if path is not None else TOKENIZER_DIR)


if __name__ == "__main__":
    # Regenerate the committed assets: python -m masa_jax.toy.tokenizer
    print(build_tokenizer(TOKENIZER_DIR))
