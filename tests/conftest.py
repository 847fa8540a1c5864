"""Test-wide JAX set-up: 8 fake CPU devices and a persistent compilation cache.

This runs before any test module imports JAX, so every test sees the same
8-device platform and sharding is exercised on every run.
"""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The embedded dataset is built once into the repo's cache and reused across runs.
os.environ.setdefault("TFDS_DATA_DIR", str(REPO / ".cache" / "tfds"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Faster random init on CPU; the partitionable variant is only needed on real meshes.
jax.config.update("jax_threefry_partitionable", False)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
