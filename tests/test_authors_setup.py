"""Hyper-parameters that follow the authors' akatigre/MASA-RL scripts (train_masagrpo.sh, eval/inference.py)."""

import importlib.util
import os

import pytest

from masa_jax.config import base_config, resolve
from masa_jax.evaluation import paper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["qwen8b", "qwen14b"])
def test_mini_batch_is_the_authors_ppo_mini_batch_size(name):
    assert resolve(_config(name)).rl.mini_batch_size == 128  # train_masagrpo.sh: ppo_mini_batch_size=128


def test_default_mini_batch_and_paper_top_p():
    assert base_config().rl.mini_batch_size == 128
    assert paper.PAPER["top_p"] == 1.0  # eval/inference.py: SamplingParams(top_p=1.0)


@pytest.mark.parametrize("name", ["qwen8b", "qwen14b", "qwen1p7b"])
def test_meta_rollouts_are_capped_at_the_response_length(name):
    # The authors generate meta and solution rollouts in one vLLM call capped at data.max_response_length
    # (masa_train/masa_ray_trainer.py:242-247; train_masagrpo.sh:15,32 MAX_RESPONSE_LENGTH=8192).
    c = resolve(_config(name))
    assert c.rollout.meta_max_new_tokens == c.rollout.max_response_length
    assert resolve(base_config()).rollout.meta_max_new_tokens == 8192
    if name != "qwen1p7b":
        assert c.rollout.max_response_length == 8192


class _CharCodec:
    def encode_chat(self, messages):
        return [ord(ch) for ch in messages[-1]["content"]]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _prompts_sent(settings_flags, config):
    """The user messages the protocol's solution path sends for one problem."""
    from collections import namedtuple

    from masa_jax.data.problem import Problem

    sent = []
    Out = namedtuple("Out", "tokens finish_reasons")

    def generate(prompt_ids, budgets, max_new_tokens, rng):
        sent.extend("".join(chr(i) for i in ids) for ids in prompt_ids)
        return Out([[ord("x")] for _ in prompt_ids], ["eos"] * len(prompt_ids))

    def verify(texts, answers):
        return [False] * len(texts), {}

    settings = paper.resolve_settings(config, dict(settings_flags, n=1, ks="1"))
    paper.run_protocol({"b": [Problem(uid="u", question="What is {1+1}?", answer="2")]}, generate, _CharCodec(),
                       verify, settings, config=config, rng_fn=lambda i, kind: None)
    return sent


def test_paper_protocol_prompts_with_the_raw_problem_by_default():
    # eval/utils.py _simple_data_processing: {"role": "user", "content": item[problem]}: no instruction.
    config = _config("qwen8b")
    assert paper.PAPER["prompt"] == "raw"
    assert _prompts_sent({}, config) == ["What is {1+1}?"]
    assert _prompts_sent({"prompt": "solution"}, config) == [
        "What is {1+1}? Let's think step by step and output the final answer within \\boxed{}."]
    from masa_jax import errors
    with pytest.raises(errors.UserError, match="config.evaluate.prompt must be one of"):
        paper.resolve_settings(config, {"prompt": "chat"})


def test_eval_paper_config_prompt_option():
    spec = importlib.util.spec_from_file_location("eval_paper_cfg", os.path.join(REPO, "configs", "eval_paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert paper.resolve_settings(resolve(module.get_config())).prompt == "raw"
    assert paper.resolve_settings(resolve(module.get_config("tiny"))).prompt == "solution"


def test_authors_setup_doc_names_every_field_qwen8b_sets():
    # docs/authors-setup.md lists each hyper-parameter of configs/qwen8b.py next to the authors' value.
    import re
    source = open(os.path.join(REPO, "configs", "qwen8b.py")).read()
    fields = set()
    for lhs in re.findall(r"^\s*(c\.[\w.]+(?:\s*,\s*c\.[\w.]+)*)\s*=", source, re.M):
        fields.update(f.strip()[2:] for f in lhs.split(","))
    doc = open(os.path.join(REPO, "docs", "authors-setup.md")).read()
    named = {f for f in fields if f"`{f}`" in doc or f.startswith("mesh.") and "`mesh.*`" in doc
             or f in ("model.path", "model.preset")}
    assert len(fields) > 30 and fields - named == set()
