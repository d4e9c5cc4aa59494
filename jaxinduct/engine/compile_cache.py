"""JAX's persistent compilation cache for the scan program: compile a shape once per machine.

The scan program of a Pythia-sized model takes seconds to compile on CPU and tens of
seconds on accelerators; a second scan (or `watch` poll, or bench) of the same shape,
mesh and selection loads it from disk instead. This is JAX's own cache
(``jax_compilation_cache_dir``); jaxinduct only chooses where it lives:

- ``JAX_COMPILATION_CACHE_DIR`` (or a ``jax.config`` setting made before the scan) wins:
  a user or cluster that configured JAX keeps its cache;
- else the ``--compilation-cache`` flag / ``JAXINDUCT_COMPILATION_CACHE``: a directory, or
  ``off``;
- else ``$XDG_CACHE_HOME/jaxinduct/jax`` (``~/.cache/jaxinduct/jax``), bounded to
  `MAX_BYTES` (JAX evicts the least recently used entries).

JAX writes only programs that took at least a second to compile, only from process 0,
and never a program with a host callback: on TPU the eigenvalue step is one
(`jaxinduct.scores.mechanistic.eigenvalues`), and so is it on CPU when one program
spans several CPU devices, so those programs compile every time.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JAXINDUCT_COMPILATION_CACHE"
OFF = "off"
MAX_BYTES = 4 * 1024**3
DEFAULT = f"${ENV}, else $XDG_CACHE_HOME/jaxinduct/jax ('{OFF}' disables it)"


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxinduct" / "jax"


def enable(directory: str | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``directory`` (see the module docstring).

    Returns the directory in use, or None when the cache is off. Idempotent; a directory
    that cannot be created leaves the cache off rather than failing the scan.
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:  # the user's (JAX_COMPILATION_CACHE_DIR or their own config) wins
        return Path(configured)
    choice = directory if directory is not None else os.environ.get(ENV)
    if choice is not None and choice.strip().lower() == OFF:
        return None
    path = Path(choice).expanduser() if choice else default_directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if jax.config.jax_compilation_cache_max_size < 0:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX decides whether to use the cache at its first compile; make it decide again.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    return path
