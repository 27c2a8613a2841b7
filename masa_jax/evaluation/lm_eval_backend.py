"""masa_jax as an lm-evaluation-harness model, registered as ``masa_jax`` (extra ``masa_jax[eval]``).

    python -m masa_jax.evaluation.harness --model masa_jax \
        --model_args pretrained=/data/Qwen3-8B-Base,dtype=bfloat16 --tasks gsm8k,arc_easy

    import masa_jax.evaluation.lm_eval_backend, lm_eval       # the import registers the model
    lm_eval.simple_evaluate(model="masa_jax", model_args="checkpoint=runs/x,config=configs/qwen8b.py",
                            tasks=["gsm8k"])

(lm-eval's own ``lm_eval`` executable has no plugin discovery: its models are a fixed table, so a model
defined outside lm-eval is only known once its module is imported; `harness` is that executable with
this module imported first, same flags.)

model_args (all optional except the model):
  pretrained=DIR          a local HF directory (config.json + safetensors + tokenizer files);
  checkpoint=DIR          the same, or a training run's workdir / its checkpoints/ folder (the newest
                          checkpoint); `config` (or the run's own config.json) names the base model;
  config=FILE[:ARG]       a masa_jax config file (configs/*.py): model path, dtypes, mesh, tokenizer;
  config.<field>=VALUE    overrides a config field (e.g. config.model.path=/data/Qwen3-8B-Base);
  tokenizer=DIR           tokenizer directory (default: the model directory / config.model.tokenizer_path);
  dtype=float32|bfloat16  param and compute dtype; compute_dtype= sets the compute dtype alone
                          (default without a config: bfloat16 on accelerators, float32 on CPU);
  mesh=DxFxT              (data, fsdp, tensor) mesh shape, one -1 allowed (default: the config's, or
                          1x-1x1: fully sharded over every device);
  max_length, max_gen_toks=256, add_bos_token, prefix_token_id, think_end_token, enable_thinking
                          (passed to the chat template, e.g. Qwen3's): as lm-eval's `hf`;
  num_slots               decode slots of the refill sampler (default: min(256, #requests));
  max_batch_tokens=16384  rows x padded length of one log-likelihood batch;
  chunk_size=256          sequence chunk of the log-prob computation (logits never exceed [B, chunk, V]);
  seed=1234               sampling seed (greedy decoding ignores it).

Requests:
  * `loglikelihood` / `loglikelihood_rolling`: tokenised exactly as the `hf` backend (context /
    continuation split, rolling windows of `max_length`), sorted by length, left-padded into batches of
    at most `max_batch_tokens` (rows a power of two, lengths in `length_bucket`s: few shapes compile)
    and scored with one jitted program: the decoder's hidden states, then the chunked log-prob path of
    `qwen.logprobs_from_hidden` on the scored window only, plus (for `loglikelihood`) whether every
    continuation token is the argmax.
  * `generate_until`: all requests with the same sampling settings (temperature / top-p / top-k from
    the task's `gen_kwargs`; do_sample=false or temperature 0 is greedy) go to ONE call of the jitted
    refill sampler `sampling.generate`, each with its own `max_gen_toks` as its token budget; a request
    stops at an end-of-sequence id (the tokenizer's EOS and the model's `eos_token_id`s, as
    transformers' `generate` does). The `until` stop strings are applied after generation: the text is
    cut at the first stop string, as the `hf` backend does after its own (on-line) stop check. So a
    request may decode past its stop string up to its budget (wasted tokens, never a different
    answer): greedy outputs are identical to `hf`'s for the same `max_gen_toks`.
  * chat templates: lm-eval applies the tokenizer's chat template itself (`--apply_chat_template`)
    through `apply_chat_template`, as for `hf`.

Multi-host: every JAX process runs the harness on all requests (one SPMD program over the global
mesh) and reports rank 0 / world size 1 to lm-eval.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("masa_jax's lm-eval backend needs lm-evaluation-harness: pip install 'masa_jax[eval]'") from e

from masa_jax import errors, fs
from masa_jax.models import qwen
from masa_jax.models.qwen.model import unembed
from masa_jax.parallel.rules import logical_to_spec

log = logging.getLogger("masa_jax.evaluation.lm_eval")

NAME = "masa_jax"
_SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k"}
_IGNORED_KEYS = {"until", "max_gen_toks", "seed"}


# ----------------------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedModel:
    model_cfg: qwen.ModelConfig
    params: Any                  # training layout (stacked layers), sharded over `mesh`
    mesh: jax.sharding.Mesh
    tokenizer_path: str
    model_dir: str               # the HF directory holding config.json (eos ids, generation_config.json)
    config: Any                  # the resolved masa_jax ConfigDict
    source: str                  # what was loaded (for lm-eval's results)


def load_config_file(spec: str):
    """A masa_jax ConfigDict from "path/to/config.py" or "path/to/config.py:ARG" (get_config(ARG))."""
    path, _, arg = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
    if not os.path.isfile(path):
        raise errors.UserError(f"config file {path} does not exist: pass config=configs/<name>.py")
    module_spec = importlib.util.spec_from_file_location(f"_masa_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_mesh(mesh) -> tuple[int, ...] | None:
    """(data, fsdp, tensor) from "1x-1x1" / "1:-1:1" / a sequence; None stays None."""
    if mesh is None or mesh == "":
        return None
    if isinstance(mesh, str):
        parts = mesh.replace(":", "x").replace("/", "x").split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise errors.UserError(f"mesh={mesh!r}: expected DATAxFSDPxTENSOR, e.g. 1x-1x1") from None
    else:
        shape = tuple(int(s) for s in mesh)
    if len(shape) != 3:
        raise errors.UserError(f"mesh={mesh!r}: expected 3 sizes (data, fsdp, tensor), e.g. 1x-1x1")
    return shape


def load_model(*, pretrained: str | None = None, checkpoint: str | None = None, config=None,
               tokenizer: str | None = None, dtype: str | None = None, compute_dtype: str | None = None,
               mesh=None, config_overrides: dict | None = None) -> LoadedModel:
    """Loads an HF directory or a training run's checkpoint (through `evaluation.policy.load_policy`)."""
    from masa_jax import config as config_lib
    from masa_jax.evaluation import policy

    if pretrained and checkpoint:
        raise errors.UserError("pass pretrained=DIR or checkpoint=DIR, not both")
    path = pretrained or checkpoint
    if not path:
        raise errors.UserError("model_args needs pretrained=DIR (an HF directory) or checkpoint=DIR (an HF "
                               "directory or a training run), e.g. --model_args pretrained=/data/Qwen3-8B-Base")
    if not fs.isdir(path):
        raise errors.UserError(f"{'pretrained' if pretrained else 'checkpoint'}={path} is not a directory")
    hf = errors.is_hf_dir(path)
    if isinstance(config, str) and config:
        c = load_config_file(config)
    elif config is not None and not isinstance(config, str):
        c = config
    else:
        c = None if hf else policy.run_config(path)
        if c is None and not hf:
            raise errors.UserError(f"{path} is not an HF directory and holds no run config.json: pass "
                                   "config=configs/<name>.py (its model.path is the base model)")
        if c is None:
            c = config_lib.base_config()
            c.model.path = path
            on_cpu = jax.default_backend() == "cpu"
            c.model.param_dtype = dtype or ("float32" if on_cpu else "bfloat16")
            c.model.dtype = compute_dtype or c.model.param_dtype
            c.mesh.shape = (1, -1, 1)
    c = ml_collections.ConfigDict(c.to_dict())  # an unlocked copy
    if hf and not c.model.path:
        c.model.path = path
    if dtype:
        c.model.param_dtype = dtype
        c.model.dtype = compute_dtype or dtype
    elif compute_dtype:
        c.model.dtype = compute_dtype
    shape = parse_mesh(mesh)
    if shape is not None:
        c.mesh.shape = shape
    for key, value in (config_overrides or {}).items():
        _set_dotted(c, key, value)
    c = config_lib.resolve(c)
    if tokenizer:
        tok_path = tokenizer
    elif hf and _has_tokenizer(path):
        tok_path = path
    else:
        tok_path = c.model.tokenizer_path
    if not tok_path or not fs.isdir(tok_path):
        raise errors.UserError(f"no tokenizer directory ({tok_path!r}): pass tokenizer=DIR")
    tok_path = fs.local_copy(tok_path)  # transformers reads local files only
    model_cfg, params, mesh_obj = policy.load_policy(c, path)
    model_dir = path if hf else c.model.path
    return LoadedModel(model_cfg, params, mesh_obj, tok_path, model_dir, c,
                       path if fs.is_remote(path) else os.path.abspath(path))


def _has_tokenizer(path: str) -> bool:
    return any(fs.isfile(fs.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json",
                                                               "vocab.json"))


def _set_dotted(c, key: str, value) -> None:
    parts = key.split(".")
    node = c
    for p in parts[:-1]:
        if p not in node:
            raise errors.UserError(f"unknown config field {key}: the fields are those of masa_jax/config.py")
        node = node[p]
    if parts[-1] not in node:
        raise errors.UserError(f"unknown config field {key}: the fields are those of masa_jax/config.py")
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(value, str):
        import ast
        value = tuple(ast.literal_eval(value)) if value.strip().startswith(("(", "[")) else (value,)
    node[parts[-1]] = value


def model_eos_ids(model_dir: str, model_cfg: qwen.ModelConfig) -> tuple[int, ...]:
    """The ids transformers' `generate` stops at: generation_config.json's eos_token_id when the directory
    has one, else config.json's."""
    eos = model_cfg.eos_token_id
    gen = fs.join(model_dir, "generation_config.json")
    if fs.isfile(gen):
        eos = json.loads(fs.read_text(gen)).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


# ----------------------------------------------------------------------------------------- scoring


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def length_bucket(n: int) -> int:
    """Padded length of a scoring batch: multiples of 16 up to 64, of 32 up to 256, then two per octave
    (384, 512, 768, ...): at most ~1/3 padding, and few distinct shapes to compile."""
    n = max(1, int(n))
    if n <= 64:
        return -(-n // 16) * 16
    if n <= 256:
        return -(-n // 32) * 32
    p = _pow2(n)
    return p * 3 // 4 if n <= p * 3 // 4 else p


@functools.lru_cache(maxsize=None)
def make_scorer(model_cfg: qwen.ModelConfig, mesh: jax.sharding.Mesh | None, chunk_size: int = 256):
    """(Cached per model config / mesh / chunk, so every instance reuses the compiled programs.) Jitted `(params, tokens int32 [B, T + 1], mask bool [B, T + 1], W, greedy)` ->
    (log p float32 [B, W], is_argmax bool [B, W]) of the last W tokens of each row given the rest
    (rows left-padded). The decoder runs on tokens[:, :-1]; only the W scored positions are unembedded,
    chunk by chunk (`qwen.logprobs_from_hidden`), so the logits never exceed [B, chunk, V]."""
    cfg = model_cfg

    @functools.partial(jax.jit, static_argnames=("W", "greedy"))
    def score(params, tokens, mask, W: int, greedy: bool):
        inp, m, tgt = tokens[:, :-1], mask[:, :-1], tokens[:, 1:]
        h = qwen.hidden_states(cfg, params, inp, m)[:, -W:]
        t = tgt[:, -W:]
        lp = qwen.logprobs_from_hidden(cfg, params, h, t, chunk_size=chunk_size)
        if not greedy:
            return lp, jnp.zeros(lp.shape, bool)
        B, _, D = h.shape
        C = min(chunk_size, W)
        n = -(-W // C)
        hp = jnp.pad(h, ((0, 0), (0, n * C - W), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
        tp = jnp.pad(t, ((0, 0), (0, n * C - W))).reshape(B, n, C).swapaxes(0, 1)

        def body(_, xs):
            hc, tc = xs
            return None, jnp.argmax(unembed(cfg, params, hc), axis=-1) == tc

        _, eq = jax.lax.scan(body, None, (hp, tp))
        return lp, eq.swapaxes(0, 1).reshape(B, n * C)[:, :W]

    def run(params, tokens: np.ndarray, mask: np.ndarray, W: int, greedy: bool):
        if mesh is None:
            return score(params, tokens, mask, W=W, greedy=greedy)
        sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))
        with jax.set_mesh(mesh):
            tokens, mask = jax.device_put((tokens, mask), sharding)
            return score(params, tokens, mask, W=W, greedy=greedy)

    return run


def data_parallel_size(mesh: jax.sharding.Mesh | None) -> int:
    if mesh is None:
        return 1
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return int(sizes.get("data", 1) * sizes.get("fsdp", 1))


# ----------------------------------------------------------------------------------------- the model


@register_model(NAME)
class MasaJaxLM(TemplateLM):
    """lm-eval model over masa_jax's Qwen decoder and refill sampler (module doc: the arguments)."""

    backend = "causal"

    def __init__(self, pretrained: str | None = None, checkpoint: str | None = None, config=None,
                 tokenizer: str | None = None, dtype: str | None = None, compute_dtype: str | None = None,
                 mesh=None, max_length: int | None = None, max_gen_toks: int = 256,
                 num_slots: int | None = None, max_batch_tokens: int = 16384, chunk_size: int = 256,
                 seed: int = 1234, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 think_end_token: str | int | None = None, enable_thinking: bool | None = None,
                 batch_size=None, max_batch_size=None, device=None, **kwargs):
        super().__init__()
        overrides = {k[len("config."):]: v for k, v in kwargs.items() if k.startswith("config.")}
        unknown = sorted(k for k in kwargs if not k.startswith("config.") and k not in ("trust_remote_code",))
        if unknown:
            log.warning("masa_jax ignores model_args %s", unknown)
        if device not in (None, "", "cpu", "cuda", "tpu", "gpu") and not str(device).startswith("cuda"):
            log.warning("masa_jax places the model on its mesh; device=%s is ignored", device)
        t0 = time.perf_counter()
        loaded = load_model(pretrained=pretrained, checkpoint=checkpoint, config=config, tokenizer=tokenizer,
                            dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, config_overrides=overrides)
        self.loaded = loaded
        self.model_cfg, self.params, self.mesh = loaded.model_cfg, loaded.params, loaded.mesh
        from transformers import AutoTokenizer  # tokenizer only
        self.tokenizer = AutoTokenizer.from_pretrained(loaded.tokenizer_path)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.num_slots = int(num_slots) if num_slots else None
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_rows = int(batch_size) if isinstance(batch_size, int) or (
            isinstance(batch_size, str) and batch_size.isdigit()) else None
        self.seed = int(seed)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.think_end_token = (int(think_end_token) if isinstance(think_end_token, str) and think_end_token.isdigit()
                                else think_end_token)
        self.chat_template_args = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
        tok_eos = self.tokenizer.eos_token_id
        self.stop_ids = tuple(dict.fromkeys(
            ([int(tok_eos)] if tok_eos is not None else []) + list(model_eos_ids(loaded.model_dir, self.model_cfg))))
        self._scorer = make_scorer(self.model_cfg, self.mesh, chunk_size=int(chunk_size))
        self._rollout_engine = None
        self._warned: set = set()
        log.info("masa_jax: loaded %s in %.1f s (mesh %s)", loaded.source, time.perf_counter() - t0,
                 dict(zip(self.mesh.axis_names, self.mesh.axis_sizes)))

    # --- lm-eval properties ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return int(self.model_cfg.max_position_embeddings)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": int(self.model_cfg.num_params()), "model_dtype": self.model_cfg.dtype,
                "model_source": self.loaded.source}

    # --- tokenisation (the `hf` backend's rules) --------------------------------------------------------

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_prompt(self, string: str) -> list[int]:
        """A generation prompt, as the `hf` backend's batch encoder treats it."""
        if has_bos_prefix(string, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        return list(self.tokenizer(string, **special)["input_ids"])

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import jinja2
        kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt, **self.chat_template_args)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kw)
        except jinja2.exceptions.TemplateError:
            log.warning("chat template failed; retrying without the system message")
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kw)

    # --- log-likelihoods ------------------------------------------------------------------------------

    def _score_sequences(self, seqs: Sequence[Sequence[int]], n_scored: Sequence[int], greedy: bool,
                         desc: str = "", disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p of the last n_scored[i] tokens of seqs[i] given the ones before, all of them argmax)
        per sequence. Each sequence holds at most max_length + 1 tokens and n_scored[i] < len(seqs[i])."""
        from tqdm import tqdm
        N = len(seqs)
        out: list[tuple[float, bool] | None] = [None] * N
        order = sorted(range(N), key=lambda i: (-len(seqs[i]), tuple(seqs[i])))
        dp = data_parallel_size(self.mesh)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bar = tqdm(total=N, desc=desc or "masa_jax log-likelihoods", disable=disable_tqdm)
        i = 0
        while i < N:
            T = min(length_bucket(len(seqs[order[i]]) - 1), length_bucket(self.max_length))
            rows = max(1, self.max_batch_tokens // T)
            if self.max_batch_rows:
                rows = min(rows, self.max_batch_rows)
            rows = max(1, 1 << (rows.bit_length() - 1))  # a power of two
            batch = order[i:i + rows]
            B = min(_pow2(len(batch)), rows)
            B = -(-B // dp) * dp
            W = min(_pow2(max(n_scored[j] for j in batch), 16), T)  # >= 16: one W per T for short answers
            tokens = np.full((B, T + 1), pad_id, np.int32)
            mask = np.zeros((B, T + 1), bool)
            for r, j in enumerate(batch):
                s = seqs[j]
                tokens[r, T + 1 - len(s):] = s
                mask[r, T + 1 - len(s):] = True
            lp, eq = self._scorer(self.params, tokens, mask, W, greedy)
            lp, eq = np.asarray(jax.device_get(lp)), np.asarray(jax.device_get(eq))
            for r, j in enumerate(batch):
                n = n_scored[j]
                out[j] = (float(lp[r, W - n:].sum(dtype=np.float32)), bool(eq[r, W - n:].all()))
            bar.update(len(batch))
            i += len(batch)
        bar.close()
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        seqs, n_scored = [], []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("masa_jax: a log-likelihood request needs a non-empty context and continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"masa_jax: continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            seqs.append((list(ctx) + list(cont))[-(self.max_length + 1):])
            n_scored.append(len(cont))
        res = self._score_sequences(seqs, n_scored, greedy=True, disable_tqdm=disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(list(ctx) + list(cont))
                owner.append((idx, len(cont)))
        res = self._score_sequences(windows, [n for _, n in owner], greedy=False,
                                    desc="masa_jax rolling log-likelihoods", disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (idx, _), (lp, _) in zip(owner, res):
            totals[idx] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------------------

    def _sampling(self, kwargs: dict) -> tuple[float, float, int]:
        """(temperature, top_p, top_k) of normalised gen_kwargs; temperature 0 is greedy."""
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = kwargs.get("temperature")
        if not do_sample:
            temperature = 0.0
        elif temperature is None:
            temperature = 1.0  # transformers' default when sampling
        elif float(temperature) == 0.0:
            self._warn_once("do_sample=True with temperature 0: decoding greedily")
        top_p = kwargs.get("top_p")
        top_k = kwargs.get("top_k")
        for key in sorted(set(kwargs) - _SAMPLING_KEYS - _IGNORED_KEYS):
            self._warn_once(f"masa_jax ignores the generation argument {key}={kwargs[key]!r}")
        return (float(temperature), float(top_p) if top_p not in (None, "") else 1.0,
                int(top_k) if top_k not in (None, "") else 0)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)

    def _engine(self):
        """The run config's rollout engine (config.rollout.engine), built on first use: its own sampler
        settings (lm-eval's stop ids, num_slots), the per-request sampling given per call."""
        if self._rollout_engine is None:
            from masa_jax.rl import rollout_engine
            from masa_jax.sampling import SamplerConfig
            spec = rollout_engine.EngineSpec(self.model_cfg, SamplerConfig(eos_ids=self.stop_ids,
                                                                           num_slots=self.num_slots), self.mesh)
            self._rollout_engine = rollout_engine.make_engine(self.loaded.config.rollout.engine, spec, self.params)
        return self._rollout_engine

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict = collections.OrderedDict()
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_gen} must be below max_length={self.max_length}")
            ids = self._encode_prompt(context)[-max_ctx:] or [self.prefix_token_id]
            prepared.append((ids, until, max_gen))
            groups.setdefault(self._sampling(kwargs), []).append(i)
        out: list[str | None] = [None] * len(requests)
        engine = self._engine() if requests else None
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="masa_jax generate_until", disable=disable_tqdm)
        for g, ((temperature, top_p, top_k), members) in enumerate(groups.items()):
            budgets = [prepared[i][2] for i in members]
            t0 = time.perf_counter()
            res = engine.generate([prepared[i][0] for i in members], budgets, max(budgets),
                                  jax.random.fold_in(jax.random.key(self.seed), g), temperature=temperature,
                                  top_p=top_p, top_k=top_k, on_done=bar.update)
            log.info("masa_jax: %d generations (temperature %g) in %.1f s, %d tokens", len(members), temperature,
                     time.perf_counter() - t0, res.stats.generated_tokens)
            for k, i in enumerate(members):
                toks = res.tokens[k]
                if isinstance(self.think_end_token, int) and self.think_end_token in toks:
                    toks = toks[len(toks) - toks[::-1].index(self.think_end_token):]
                text = self.tok_decode(toks)
                if isinstance(self.think_end_token, int):
                    text = text.lstrip()
                text = postprocess_generated_text(
                    generation=text, stop=prepared[i][1],
                    think_end_token=self.think_end_token if isinstance(self.think_end_token, str) else None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.close()
        return out  # type: ignore[return-value]
