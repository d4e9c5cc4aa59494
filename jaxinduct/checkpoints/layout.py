"""jaxinduct's own Orbax trajectory layout.

A trajectory directory is a plain Orbax CheckpointManager directory (any Orbax
user can call ``CheckpointManager(dir).all_steps()``) plus files that say which
run wrote it::

    DIR/jaxinduct_run.json     run identity: config, config hash, schedule
    DIR/jaxinduct_run.lock     held (flock) by the one process writing the run
    DIR/<step>/params/         the reference model's params, nnx.to_pure_dict layout
    DIR/<step>/opt_state/      optimizer state (for resuming training)
    DIR/<step>/meta/           JSON: step, tokens_seen, loss, spec, layout

Every step describes itself (its ``meta`` carries the model spec and layout), so
a step copied out of its directory can still be read. Readers never write.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxinduct.errors import RunDirError
from jaxinduct.model.nnx import nnx_params_to_weights, weights_to_nnx_params
from jaxinduct.model.weights import ModelSpec, Weights, expected_shapes, make_weights

RUN_FILE = "jaxinduct_run.json"
LOCK_FILE = "jaxinduct_run.lock"
PARAMS, OPT_STATE, META = "params", "opt_state", "meta"


class Layout(enum.StrEnum):
    """How a step's ``params`` item is laid out; one adapter to Weights each (jaxinduct.checkpoints.sources)."""

    NNX = "jaxinduct.nnx/1"  # the reference model's nnx.to_pure_dict tree
    CANONICAL = "jaxinduct.canonical/1"  # a plain dict of canonical arrays by name (Weights.arrays())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_run_file(directory: Path) -> dict[str, Any] | None:
    path = directory / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is unreadable ({e}); delete the directory or choose another --out") from e


@contextlib.contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run directory for as long as one process writes it.

    Two writers would delete each other's in-progress saves and race on step names.
    The lock is released by the OS if the process dies, so a crash never leaves it held.
    """
    with open(directory / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"another process is writing {directory} (it holds {LOCK_FILE}); wait for it or stop it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def writer_options() -> ocp.CheckpointManagerOptions:
    # Keep every step (a trajectory is the point); clear leftovers of saves a crash
    # interrupted (safe only because the writer holds the lock).
    return ocp.CheckpointManagerOptions(max_to_keep=None, cleanup_tmp_directories=True)


class _DropReadOnlyNotice(logging.Filter):
    # Orbax warns on every read-only manager (every read jaxinduct does), and on every item
    # of a step that a reader did not ask for (a scan reads params and meta, not opt_state).
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Given directory is read only") or "was found in the checkpoint, but could not be restored" in message
        )


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


def reader_options() -> ocp.CheckpointManagerOptions:
    # Readers may look at a run that is still being written: never create, clean or delete.
    # Reading is process-local: under jax.distributed each process restores its own
    # checkpoints, from loader threads, so Orbax must not wait for the other processes at
    # its barriers (it would deadlock them); this process is the only one taking part.
    me = jax.process_index()
    return ocp.CheckpointManagerOptions(
        read_only=True,
        create=False,
        save_interval_steps=0,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"jaxinduct-reader-{me}"
        ),
    )


def committed_steps(directory: str | os.PathLike) -> list[int]:
    directory = Path(directory).expanduser().resolve()  # Orbax wants absolute paths
    if not directory.is_dir():
        raise RunDirError(f"trajectory directory {directory} does not exist")
    with ocp.CheckpointManager(directory, options=reader_options()) as manager:
        return sorted(manager.all_steps())


def restore_weights(directory: str | os.PathLike, step: int) -> tuple[Weights, dict[str, Any]]:
    """Canonical Weights and the meta dict of one step of a jaxinduct trajectory (either layout)."""
    from jaxinduct.checkpoints.sources import OrbaxSource  # the adapters live there; this is a shortcut

    source = OrbaxSource.open(directory)
    try:
        if step not in source.steps():
            raise RunDirError(f"{source.directory} has no committed step {step}; committed steps: {source.steps()}")
        return source.load_with_meta(step)
    finally:
        source.close()


def save_canonical_step(manager: ocp.CheckpointManager, step: int, weights: Weights, meta: dict[str, Any]) -> None:
    """Save one checkpoint in the CANONICAL layout (params: a dict of arrays by canonical name).

    ``manager`` must have item_names including PARAMS and META. The layout, spec and step
    are added to ``meta``.
    """
    meta = {**meta, "step": step, "spec": weights.spec.to_dict(), "layout": Layout.CANONICAL.value}
    params = {name: np.asarray(array) for name, array in weights.arrays().items()}
    manager.save(
        step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(meta)})
    )


def abstract_nnx_params(spec: ModelSpec) -> dict:
    """The nnx params tree of a spec as shape/dtype structs (a restore target; no arrays made)."""
    shapes = expected_shapes(spec)
    structs = {name: jax.ShapeDtypeStruct(shape, jax.numpy.float32) for name, shape in shapes.items()}
    return jax.eval_shape(lambda arrays: weights_to_nnx_params(make_weights(spec, arrays)), structs)
