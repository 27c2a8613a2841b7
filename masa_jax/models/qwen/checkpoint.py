"""HF safetensors checkpoints <-> masa_jax Qwen params, streamed one tensor at a time.

Reading never goes through `safetensors`/`torch`: we parse the header ourselves and `np.memmap` each file,
so a tensor's bytes are read only when a device shard asks for them. The HF-name/layout table is
`params.param_rules`; every `to_ours` there is a transpose or an axis split, so applied to a memmapped
tensor it is still a lazy view and slicing it reads only the requested shard.

Writing is the mirror image: the safetensors header is computed from the config alone, then each HF
tensor is gathered to the host, converted and appended, so the host holds one tensor at a time.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # bfloat16 as a numpy dtype
import numpy as np

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.model import Params, param_logical_axes, param_shapes
from masa_jax.models.qwen.params import ParamRule, hf_names, param_rules
from masa_jax.parallel.rules import TRAIN_RULES, Rules, tree_shardings

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag <-> numpy dtype (bfloat16 through ml_dtypes).
_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


class CheckpointError(ValueError):
    """A checkpoint directory or file is malformed or does not fit the model config."""


# ------------------------------------------------------------------------------- safetensors reading


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parses and validates a safetensors header: (tensor entries without `__metadata__`, data start).

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the raw data; each entry's
    `data_offsets` are relative to the data start. Raises CheckpointError naming the file when the header
    is truncated, not JSON, or describes tensors that do not fit the file.
    """
    path = Path(path)
    size = path.stat().st_size
    bad = lambda why: CheckpointError(f"corrupt safetensors header in {path}: {why}")
    if size < 8:
        raise bad(f"file is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise bad(f"header length {n} exceeds the file size {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, entry in header.items():
        try:
            dtype = _ST_TO_NP[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is malformed: {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= start <= end <= data_len or end - start != nbytes:
            raise bad(f"tensor {name!r} (dtype {entry['dtype']}, shape {shape}) has data_offsets "
                      f"[{start}, {end}] that do not fit {nbytes} bytes inside {data_len} data bytes")
    return header, 8 + n


def open_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> read-only array view of a memmapped safetensors file; no tensor data is read yet."""
    header, data_start = read_safetensors_header(path)
    if not header:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, e in header.items():
        start, end = e["data_offsets"]
        buf = mm[data_start + start: data_start + end]
        out[name] = buf.view(_ST_TO_NP[e["dtype"]]).reshape(e["shape"])
    return out


def open_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF directory (`model.safetensors` or a sharded index) as lazy memmap views."""
    path = Path(path)
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        return open_safetensors(single)
    if not index.is_file():
        raise FileNotFoundError(f"no weights in {path}: expected {single} or {index}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"malformed index {index}: {e!r}") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"index {index} points to missing shard file {path / missing[0]}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        views = open_safetensors(path / f)
        # Only the tensors the index assigns to this file, so a stale duplicate elsewhere is ignored.
        tensors.update({k: v for k, v in views.items() if weight_map.get(k) == f})
    absent = [k for k, f in weight_map.items() if k not in tensors]
    if absent:
        raise CheckpointError(f"index {index} maps tensor {absent[0]!r} to {path / weight_map[absent[0]]}, "
                              "which does not contain it")
    return tensors


# ------------------------------------------------------------------------------------------ loading


def _hf_shape(rule: ParamRule, cfg: ModelConfig, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one HF tensor behind `rule` (our per-layer slice shape mapped through `to_hf`)."""
    slice_shape = our_shape[1:] if rule.per_layer else our_shape
    out = jax.eval_shape(lambda w: rule.to_hf(w, cfg), jax.ShapeDtypeStruct(slice_shape, jnp.float32))
    return tuple(out.shape)


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], where: str = "checkpoint") -> None:
    """Raises CheckpointError naming the first tensor the config needs that is missing or mis-shaped."""
    shapes = param_shapes(cfg)
    for rule in param_rules(cfg):
        want = _hf_shape(rule, cfg, _get(shapes, rule.path).shape)
        for name in hf_names(rule, cfg):
            if name not in tensors:
                raise CheckpointError(f"tensor {name!r} is missing from {where}")
            got = tuple(tensors[name].shape)
            if got != want:
                raise CheckpointError(f"shape mismatch for tensor {name!r}: {where} has {got}, the config "
                                      f"needs {want}")


def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple(s.indices(n) for s, n in zip(index, shape))


def _read_shard(rule: ParamRule, cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                index: tuple[tuple[int, int, int], ...], dtype: np.dtype) -> np.ndarray:
    """Host array (in `dtype`) of one device shard `index` of our param for `rule`, read from the
    memmapped HF tensors: for stacked params only the layers in the index, one layer at a time."""
    sl = tuple(slice(*i) for i in index)
    shape = tuple(len(range(*i)) for i in index)
    out = np.empty(shape, dtype)  # a fresh buffer: never alias the memmap into a device array
    names = hf_names(rule, cfg)
    if rule.per_layer:
        for j, layer in enumerate(range(*index[0])):
            out[j] = rule.to_ours(tensors[names[layer]], cfg)[sl[1:]]
    else:
        out[...] = rule.to_ours(tensors[names[0]], cfg)[sl]
    return out


def _place(read, shape: tuple[int, ...], sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Builds one global array from `read(index) -> host shard`, reading each distinct shard once and
    moving it to its device(s) before reading the next, so the host holds one shard at a time (unlike
    `jax.make_array_from_callback`, which first reads every addressable shard)."""
    full = tuple((0, n, 1) for n in shape)
    if sharding is None:
        return jax.device_put(read(full)).block_until_ready()
    groups: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        groups.setdefault(_normalize(index, shape), []).append(device)
    arrays = []
    for index, devices in groups.items():
        host = read(index)
        arrays += [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(arrays)  # the transfer owns `host` until done; bound what is in flight
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def read_hf_config(path: str | os.PathLike) -> dict:
    """The `config.json` of an HF directory as a dict; CheckpointError naming the file if it is not JSON."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"missing {config_file}")
    try:
        hf = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    return hf


def _open_checked(path: Path, **config_kwargs) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    cfg = ModelConfig.from_hf_dict(read_hf_config(path), **config_kwargs)
    tensors = open_checkpoint(path)
    check_tensors(cfg, tensors, where=str(path))
    return cfg, tensors


def check_checkpoint(path: str | os.PathLike) -> ModelConfig:
    """Everything `from_pretrained` checks, without reading a tensor's data: config.json parses and is a
    supported Qwen config, every weight file's header is sound and fits the file, and every tensor the
    config needs is there with its shape. Raises what `from_pretrained` raises; returns the config."""
    cfg, _ = _open_checked(Path(path))
    return cfg


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    *, compute_dtype: Any = None, rules: Rules = TRAIN_RULES,
                    **config_overrides) -> tuple[ModelConfig, Params]:
    """Loads a local HF Qwen3 / Qwen2 / Qwen2.5 directory -> (ModelConfig, params).

    `path` holds `config.json` and either `model.safetensors` or `model.safetensors.index.json` with its
    shard files. `dtype` is the param dtype (float32 master weights by default; becomes
    `ModelConfig.param_dtype`); `compute_dtype` is the matmul/activation dtype (`ModelConfig.dtype`,
    default: the param dtype). Any other `ModelConfig` field can be overridden by keyword (e.g.
    `remat="full"`, `attention_impl="cudnn"`). With `mesh`, every param is placed straight onto its
    sharding from `tree_shardings(param_logical_axes(cfg), param_shapes(cfg), mesh, rules)`; without one,
    on the default device. Layers are stacked on a leading [L] axis for the scanned decoder.

    Each process reads only the shards of its addressable devices, one distinct shard at a time, from
    the memmapped files. Peak host memory is therefore about one device shard of the largest param in
    `dtype` (plus page cache, which the OS can drop), never the model: for Qwen3-8B with float32 params
    that is 7.2 GB for a stacked [36, 4096, 12288] MLP weight on a single device, 0.9 GB when it is split
    8 ways (fsdp x tensor), against 32.8 GB for the whole model in float32.

    Raises FileNotFoundError (missing directory, config.json, weights or index shard, naming the path),
    UnsupportedConfigError (unknown architecture, sliding window, ...), CheckpointError (corrupt header,
    missing tensor, shape mismatch, naming the tensor and both shapes).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"missing {config_file}")
    if "param_dtype" in config_overrides:  # one way to say each dtype: `dtype=` and `compute_dtype=`
        raise TypeError("pass the param dtype as dtype= and the compute dtype as compute_dtype=, not "
                        "param_dtype=")
    param_dtype = jnp.dtype(dtype).name
    compute = jnp.dtype(compute_dtype).name if compute_dtype is not None else param_dtype
    cfg, tensors = _open_checked(path, param_dtype=param_dtype, dtype=compute, **config_overrides)
    shapes = param_shapes(cfg)
    shardings = (tree_shardings(param_logical_axes(cfg), shapes, mesh, rules) if mesh is not None else None)
    np_dtype = np.dtype(cfg.jnp_param_dtype)
    params: Params = {}
    for rule in param_rules(cfg):
        shape = tuple(_get(shapes, rule.path).shape)
        read = functools.partial(_read_shard, rule, cfg, tensors, dtype=np_dtype)
        sharding = _get(shardings, rule.path) if shardings is not None else None
        _set(params, rule.path, _place(read, shape, sharding))
    return cfg, params


# ------------------------------------------------------------------------------------------ saving


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" / "500MB" / "2GiB" (decimal units as in transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base ** power)


@functools.partial(jax.jit, static_argnames="dtype")
def _layer(x: jax.Array, i: jax.Array, dtype) -> jax.Array:
    # Traced layer index: one compile per param shape, not per layer.
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False).astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _cast(x: jax.Array, dtype) -> jax.Array:
    return x.astype(dtype)


def _to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host sharded) array on this host. Collective across
    processes when not fully addressable, so every process must call it."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _token_ids(model_cfg: ModelConfig, tokenizer) -> dict:
    """bos / eos / pad ids for config.json and generation_config.json: the model's bos / eos, and the
    tokenizer's pad token, else the first eos id (the pad `tokenization.load_codec` uses)."""
    eos = list(model_cfg.eos_token_id) if isinstance(model_cfg.eos_token_id, tuple) else model_cfg.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {"bos_token_id": model_cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}


def _write_tokenizer_and_generation_config(model_cfg: ModelConfig, path: Path, tokenizer_dir) -> dict:
    """Writes the tokenizer files (re-saved by transformers from `tokenizer_dir`, local or gs://) and
    generation_config.json (the source's sampling defaults when it has one, with our token ids).
    Returns the token ids for config.json."""
    from transformers import AutoTokenizer, GenerationConfig

    from masa_jax import fs

    tokenizer, source = None, None
    if tokenizer_dir:
        source = fs.local_copy(tokenizer_dir)
        if not os.path.isdir(source):
            raise FileNotFoundError(f"tokenizer directory {os.fspath(tokenizer_dir)!r} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.save_pretrained(path)
    ids = _token_ids(model_cfg, tokenizer)
    if source is not None and os.path.exists(os.path.join(source, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(source)
    else:
        generation = GenerationConfig()
    generation.update(**ids)
    generation.save_pretrained(path)
    return ids


def save_pretrained(model_cfg: ModelConfig, params: Params, path: str | os.PathLike, dtype: Any = None, *,
                    max_shard_size: int | str = "5GB", tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Writes an HF directory `transformers` / vLLM load and generate from alone: config.json (with
    `pad_token_id`), generation_config.json (bos / eos / pad ids), the tokenizer files of `tokenizer_dir`
    (the run's `model.tokenizer_path`; None writes no tokenizer) and `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json` when the tensors exceed
    `max_shard_size` bytes per file. `dtype` is the dtype of the written tensors (default: the param
    dtype). Earlier weight files in `path` are removed so a stale single file cannot shadow new shards.

    The host holds one HF tensor at a time: each is sliced (one layer of a stacked param) and cast on
    device, gathered, converted to the HF layout and appended to its file. Every process must call this
    (the gathers are collective for multi-host arrays); only process 0 writes.
    """
    path = Path(path)
    dtype = jnp.dtype(dtype if dtype is not None else model_cfg.param_dtype)
    np_dtype = np.dtype(dtype)
    if np_dtype not in _NP_TO_ST:
        raise ValueError(f"cannot write dtype {np_dtype} to safetensors")
    writer = jax.process_index() == 0
    shapes = param_shapes(model_cfg)

    # (hf name, rule, layer or None, hf shape): the whole file layout is known before any data moves.
    entries = []
    for rule in param_rules(model_cfg):
        leaf = _get(params, rule.path)
        want = tuple(_get(shapes, rule.path).shape)
        if tuple(leaf.shape) != want:
            raise CheckpointError(f"param {'/'.join(rule.path)} has shape {tuple(leaf.shape)}, the config "
                                  f"needs {want}")
        hf_shape = _hf_shape(rule, model_cfg, want)
        for i, name in enumerate(hf_names(rule, model_cfg)):
            entries.append((name, rule, i if rule.per_layer else None, hf_shape))
    limit = parse_size(max_shard_size)
    files: list[list] = [[]]
    used = 0
    for entry in entries:
        nbytes = math.prod(entry[3]) * np_dtype.itemsize
        if files[-1] and used + nbytes > limit:
            files.append([])
            used = 0
        files[-1].append(entry)
        used += nbytes
    n = len(files)
    file_names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    if writer:
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("model*.safetensors*"):
            if old.name == SINGLE_FILE or old.name == INDEX_FILE or re.fullmatch(
                    r"model-\d+-of-\d+\.safetensors", old.name):
                old.unlink()
        hf_config = model_cfg.to_hf_dict(torch_dtype=np_dtype.name)
        hf_config.update(_write_tokenizer_and_generation_config(model_cfg, path, tokenizer_dir))
        (path / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2))

    total = 0
    weight_map = {}
    for file_name, group in zip(file_names, files):
        header, offset = {}, 0
        for name, _, _, hf_shape in group:
            nbytes = math.prod(hf_shape) * np_dtype.itemsize
            header[name] = {"dtype": _NP_TO_ST[np_dtype], "shape": list(hf_shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        total += offset
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as the reference writer does
        f = open(path / file_name, "wb") if writer else None
        try:
            if f is not None:
                f.write(struct.pack("<Q", len(raw)) + raw)
            for name, rule, layer, hf_shape in group:
                leaf = _get(params, rule.path)
                x = _layer(leaf, jnp.int32(layer), dtype) if layer is not None else _cast(leaf, dtype)
                host = _to_host(x)
                del x
                hf = np.ascontiguousarray(rule.to_hf(host, model_cfg))
                assert hf.shape == hf_shape and hf.dtype == np_dtype, (name, hf.shape, hf.dtype)
                if f is not None:
                    f.write(hf.reshape(-1).view(np.uint8).data)
                del host, hf
        finally:
            if f is not None:
                f.close()
    if writer and n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"masa_jax save_pretrained {path}")
