"""Test setup: several CPU devices before JAX starts, so sharding is exercised on every run."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

N_CPU_DEVICES = 8
jax.config.update("jax_num_cpu_devices", N_CPU_DEVICES)
