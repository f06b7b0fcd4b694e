"""Test setup: four virtual CPU devices so sharded code paths run on a laptop.

XLA reads the flag once, before the first backend is created, so it is set here,
before any test module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
# The tests' tiny programs spend more time in LLVM than running: without its backend
# optimisations the suite compiles faster. (Skipping only LLVM's expensive passes, with one
# Eigen thread per process, ran the training steps faster but the whole suite no faster here.)
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The tests build the same small programs many times (every tiny training run compiles the
# same train step): a session-wide persistent compilation cache turns repeats into cache hits.
import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "vqlc-test-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
