"""Test setup: several CPU devices before JAX starts, so sharding is exercised on every run."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Scans in tests (and the CLI processes they start) keep JAX's persistent compilation cache
# in a directory of this session, never in the user's ~/.cache.
os.environ["JAXINDUCT_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jaxinduct-test-jax-cache-")
atexit.register(shutil.rmtree, os.environ["JAXINDUCT_COMPILATION_CACHE"], ignore_errors=True)

import jax  # noqa: E402

N_CPU_DEVICES = 8
jax.config.update("jax_num_cpu_devices", N_CPU_DEVICES)
