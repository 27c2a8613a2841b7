"""The tokenizer as the trainer sees it: chat messages -> prompt ids, ids -> text, stop ids.

Loads any HF tokenizer directory (a real Qwen checkpoint or the toy world's) through
`transformers.AutoTokenizer`, so both take the same code path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from masa_jax import fs


@dataclasses.dataclass
class ChatCodec:
    tokenizer: Any
    eos_ids: tuple[int, ...]
    pad_id: int
    end_of_turn: int  # appended to behaviour-cloning targets: where an assistant turn stops

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation with the generation prompt appended (chat template)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_codec(path: str, extra_eos: Sequence[int] = ()) -> ChatCodec:
    """ChatCodec for a tokenizer directory (local, or gs:// copied to a local cache: transformers reads
    local files only). Stop ids: the tokenizer's eos, `<|im_end|>` (the end of a chat turn for Qwen
    templates) and `<|endoftext|>` where present, plus `extra_eos`."""
    path = fs.local_copy(path)
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    from transformers import AutoTokenizer  # tokenizer only: masa_jax never uses transformers' models

    tok = AutoTokenizer.from_pretrained(path)
    vocab = tok.get_vocab()
    stops = [tok.eos_token_id] + [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab]
    stops += list(extra_eos)
    eos = tuple(dict.fromkeys(int(s) for s in stops if s is not None))
    if not eos:
        raise ValueError(f"tokenizer at {path} defines no end-of-sequence token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    end_of_turn = vocab.get("<|im_end|>", eos[0])
    return ChatCodec(tok, eos, int(pad), int(end_of_turn))
