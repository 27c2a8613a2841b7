"""Test-session settings: a persistent XLA compilation cache, so the many small jitted functions that
several end-to-end tests build again (same shapes, new closures) compile once per session; and the
`fake_gcs` fixture (gs:// paths on a local folder)."""
import os
import tempfile

import jax
import pytest

_CACHE = os.environ.get("MASA_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "masa_jax_xla_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
# Runs the tests start as subprocesses (python -m masa_jax.train) cache there too, never in the user's ~/.cache.
os.environ.setdefault("MASA_JAX_COMPILE_CACHE_DIR", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """`gs://` backed by a local folder, swapped in where the real bucket is reached: fsspec's `gs`
    protocol (what epath uses without TensorFlow, gcsfs in production), the tensorstore kvstore spec of
    Orbax's arrays, and Orbax's bucket lookup. Like GCS it has no directories and no append. Code that
    takes a gs:// path past epath (os.path, open()) writes under ./gs:/ of the cwd instead. Returns the
    folder (bucket `b` is <folder>/b)."""
    from etils.epath import backend
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.registry import _registry
    from orbax.checkpoint._src.path import gcs_utils

    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")
        cachable = False

        def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...) do not apply
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

        def open(self, path, mode="rb", *args, **kwargs):
            if "a" in mode or "+" in mode:
                raise NotImplementedError(f"GCS objects are written whole, no mode {mode!r}")
            return super().open(path, mode, *args, **kwargs)

        def makedirs(self, path, exist_ok=True):  # a prefix exists once an object under it does
            pass

        def mkdir(self, path, create_parents=True, **kwargs):
            pass

    for name in ("gs", "gcs"):
        monkeypatch.setitem(_registry, name, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()

    def no_client(*args, **kwargs):
        raise AssertionError("the GCS client was called")

    monkeypatch.setattr(gcs_utils, "get_bucket", no_client)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": str(root / str(path).removeprefix("gs://"))})
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()
