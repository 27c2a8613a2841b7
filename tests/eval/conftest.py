"""Fixtures of the evaluation tests, all built offline under tmp_path: a tiny random Qwen3 over the toy
(character-level) tokenizer, and local lm-eval tasks (task YAMLs + small JSON datasets, no downloads)."""
from __future__ import annotations

import json
import os
import shutil

import jax
import pytest

from masa_jax.models import qwen
from masa_jax.toy import tokenizer as toy_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_LENGTH = 96  # the models' context (config max_position_embeddings): short, so rolling windows split


@pytest.fixture(scope="session")
def lm_model_dir(tmp_path_factory):
    """A random 2-layer Qwen3 (weights std 0.5: logits well spread, so greedy decoding has no near-ties)
    saved as a complete HF directory that transformers and lm-eval's `hf` backend load."""
    path = str(tmp_path_factory.mktemp("lm_qwen3"))
    tok = toy_tokenizer.load_tokenizer()
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                           max_position_embeddings=MAX_LENGTH, rope_theta=10000.0, eos_token_id=tok.eos_token_id)
    params = qwen.init_params(cfg, jax.random.key(3), std=0.5)
    qwen.save_pretrained(cfg, params, path)
    for name in os.listdir(toy_tokenizer.TOKENIZER_DIR):
        shutil.copy(os.path.join(toy_tokenizer.TOKENIZER_DIR, name), path)
    return path


MC_DOCS = [
    {"question": "2 + 3", "choices": ["5", "6", "23"], "label": 0},
    {"question": "What colour is the sky?", "choices": ["blue", "green", "a deep red"], "label": 0},
    {"question": "7 * 6", "choices": ["42", "13", "76", "1"], "label": 0},
    {"question": "Which is larger, 9 or 12?", "choices": ["9", "12"], "label": 1},
    {"question": "Opposite of up", "choices": ["down", "left", "sideways"], "label": 0},
    {"question": "10 - 4", "choices": ["6", "14"], "label": 0},
]
GEN_DOCS = [
    {"question": "Add 2 and 2.", "answer": "4"},
    {"question": "Name a prime number.", "answer": "7"},
    {"question": "Spell cat backwards.", "answer": "tac"},
    {"question": "What is 10 times 3?", "answer": "30"},
    {"question": "Say hello.", "answer": "hello"},
    {"question": "Compute 9 - 1.", "answer": "8"},
]
PPL_DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 4},
    {"text": "Compute (3 + 4) * 2: first add 3 and 4 to get 7, then multiply by 2 to get 14."},
    {"text": "short"},
]

TASKS = {
    "masa_mc": """task: masa_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
""",
    "masa_gen": """task: masa_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until:
    - "."
    - "\\n\\n"
  do_sample: false
  temperature: 0.0
  max_gen_toks: 24
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""",
    "masa_ppl": """task: masa_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
metadata:
  version: 1.0
""",
}


@pytest.fixture(scope="session")
def task_docs():
    """task name -> its documents."""
    return {"masa_mc": MC_DOCS, "masa_gen": GEN_DOCS, "masa_ppl": PPL_DOCS}


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory):
    """A folder of lm-eval task YAMLs (masa_mc: multiple choice, masa_gen: generation with stop strings,
    masa_ppl: rolling log-likelihood) over local JSON files."""
    root = tmp_path_factory.mktemp("lm_tasks")
    for name, docs in (("masa_mc", MC_DOCS), ("masa_gen", GEN_DOCS), ("masa_ppl", PPL_DOCS)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(TASKS[name].format(data=str(data)))
    return str(root)
