"""File access for everything a run reads or writes: run directories, model and tokenizer directories,
data files. Every path goes through `etils.epath` (what Orbax uses), so `gs://bucket/run1` works wherever
a local path does.

Backends: local paths use the OS; `gs://` uses fsspec's gcsfs (or tf.io.gfile when TensorFlow is
installed), which the `[tpu]` / `[gcs]` extras install together with google-cloud-storage (Orbax asks
it for the bucket's layout). Credentials are the environment's (a TPU VM's service account, or
`gcloud auth application-default login`).

An object store is not a disk in two ways this module hides: there is no append (`append_text` rewrites
the object) and no atomic rename (a single object write is atomic, so `write_text` writes in place
there and through a temporary file and a rename only on a local disk).

Libraries that read local files only (transformers' tokenizer loader, safetensors, the evaluation
outputs) get a local path from `local_copy` / `local_dir_for`: a remote file or directory is copied
once per host into `$MASA_JAX_CACHE` (default ~/.cache/masa_jax), keyed by its path and file sizes.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import IO, Iterator

from etils import epath

_CHUNK = 16 << 20


def path(p: str | os.PathLike) -> epath.Path:
    return epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
    """A URI (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(p)


def absolute(p: str | os.PathLike) -> str:
    """`p` as an absolute local path (`~` expanded), or unchanged when it is a URI or empty. Run paths are
    resolved once, at the edge: Orbax's OCDBT writer refuses a relative checkpoint path (in its background
    save thread, so a relative workdir used to crash the run at its second checkpoint)."""
    if not p or is_remote(p):
        return os.fspath(p)
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


def join(p: str | os.PathLike, *parts: str) -> str:
    return os.fspath(epath.Path(p, *parts))


def parent(p: str | os.PathLike) -> str:
    return os.fspath(epath.Path(p).parent)


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def isdir(p: str | os.PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: str | os.PathLike) -> bool:
    q = path(p)
    return q.exists() and not q.is_dir()


def makedirs(p: str | os.PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def open(p: str | os.PathLike, mode: str = "r") -> IO:  # noqa: A001 (the module's own open)
    return path(p).open(mode)


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def write_text(p: str | os.PathLike, text: str) -> None:
    """Writes `p` whole; a reader (another host, the run after a crash) sees the old or the new
    content, never a mix."""
    q = path(p)
    if is_remote(p):  # one object write is atomic; a rename there would be copy + delete
        q.write_text(text)
        return
    tmp = q.with_name(q.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(q)


def append_text(p: str | os.PathLike, text: str) -> None:
    """Appends `text`; on an object store (no append) the object is read and written again."""
    q = path(p)
    if not is_remote(p):
        with q.open("a") as f:
            f.write(text)
        return
    q.write_text((q.read_text() if q.exists() else "") + text)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Renames `src` to `dst` (atomic on a local disk; copy + delete on an object store)."""
    path(src).replace(dst)


def rmtree(p: str | os.PathLike) -> None:
    """Removes a directory tree; a missing one is fine."""
    path(p).rmtree(missing_ok=True)


def cache_dir() -> str:
    return os.environ.get("MASA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "masa_jax")


def local_copy(p: str | os.PathLike) -> str:
    """A local path holding the file or directory `p`: `p` itself when it is local (or does not exist,
    so the caller's own check names it), else a copy in `cache_dir()`, made once per host and reused
    while the remote files keep their names and sizes."""
    if not p or not is_remote(p) or not exists(p):
        return os.fspath(p)
    src = path(p)
    listing = sorted((os.fspath(f), f.stat().length) for f in _files(src))
    key = hashlib.sha256(repr((os.fspath(p), listing)).encode()).hexdigest()[:16]
    dest = os.path.join(cache_dir(), "remote", key, src.name)
    if not os.path.exists(dest):  # copies are renamed into place when complete
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
            _download(src, os.path.join(tmp, src.name))
            with contextlib.suppress(OSError):  # another process on this host was faster
                os.replace(os.path.join(tmp, src.name), dest)
    return dest


@contextlib.contextmanager
def local_dir_for(p: str | os.PathLike) -> Iterator[str]:
    """A local directory standing in for the directory `p` while code that writes local files only
    runs; on a clean exit its files are copied to `p`. For a local `p`: `p` itself."""
    if not is_remote(p):
        yield os.fspath(p)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                local = os.path.join(root, name)
                with builtins.open(local, "rb") as fi, open(join(p, os.path.relpath(local, tmp)), "wb") as fo:
                    shutil.copyfileobj(fi, fo, _CHUNK)


def _files(p: epath.Path) -> Iterator[epath.Path]:
    if not p.is_dir():
        yield p
        return
    for child in p.iterdir():
        yield from _files(child)


def _download(src: epath.Path, dst: str) -> None:
    if src.is_dir():
        os.makedirs(dst)
        for child in src.iterdir():
            _download(child, os.path.join(dst, child.name))
        return
    # Streamed: epath's own copy() would pick the remote backend for both ends.
    with src.open("rb") as fi, builtins.open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, _CHUNK)
