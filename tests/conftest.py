"""Test-session settings: a persistent XLA compilation cache, so the many small jitted functions that
several end-to-end tests build again (same shapes, new closures) compile once per session."""
import os
import tempfile

import jax

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MASA_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "masa_jax_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
