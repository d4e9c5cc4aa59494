"""jaxinduct's own Orbax trajectory layout: the one module that knows it.

A trajectory directory is a plain Orbax CheckpointManager directory (any Orbax
user can call ``CheckpointManager(dir).all_steps()``) plus files that say which
run wrote it::

    DIR/jaxinduct_run.json     run identity (`RunRecord`): config, config hash, schedule
    DIR/jaxinduct_run.lock     held (flock) by the one process writing the run
    DIR/<step>/params/         the model's params, in the step's `Layout`
    DIR/<step>/opt_state/      optimizer state (for resuming training; the trainer's steps only)
    DIR/<step>/meta/           JSON (`StepMeta`): step, tokens_seen, loss, spec, layout, ...

Every step describes itself (its ``meta`` carries the model spec and layout), so
a step copied out of its directory can still be read. Readers never write.

The Orbax item names and the meta keys are spelled here and nowhere else in jaxinduct:
writers and readers (the trainer, `jaxinduct.checkpoints.convert`, the sources) go
through `StepMeta`, `RunRecord` and the save/restore functions below. Each layout has
one pair of converters to and from canonical `Weights` here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxinduct.checkpoints.protocol import SourceError
from jaxinduct.errors import RunDirError
from jaxinduct.model.nnx import nnx_params_to_weights, weights_to_nnx_params
from jaxinduct.model.weights import ModelSpec, Weights, abstract_weights, host_zeros, make_weights

RUN_FILE = "jaxinduct_run.json"
LOCK_FILE = "jaxinduct_run.lock"
PARAMS, OPT_STATE, META = "params", "opt_state", "meta"


class Layout(enum.StrEnum):
    """How a step's ``params`` item is laid out; one converter pair to and from Weights each."""

    NNX = "jaxinduct.nnx/1"  # the reference model's nnx.to_pure_dict tree
    CANONICAL = "jaxinduct.canonical/1"  # a plain dict of canonical arrays by name (Weights.arrays())


# --- records: a step's meta item and the run file -------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepMeta:
    """A step's ``meta`` item: what a reader needs to restore the step without its run."""

    step: int
    spec: ModelSpec
    layout: Layout
    tokens_seen: int | None = None
    loss: float | None = None  # mean training loss since the previous save; None before any update
    config_hash: str | None = None  # the training run's identity (steps the trainer wrote)
    source: str | None = None  # what a converted step was converted from
    # Keys this version does not know (another writer's, a newer jaxinduct's): kept, so that
    # reading and writing an item gives it back unchanged.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The item's JSON, key for key as jaxinduct has always written it.

        tokens_seen is always recorded (null when unknown). A training step (config_hash
        set) always records its loss, null at step 0, so that "no loss yet" reads apart
        from "not trained here".
        """
        data: dict[str, Any] = {"step": self.step, "tokens_seen": self.tokens_seen}
        if self.config_hash is not None or self.loss is not None:
            data["loss"] = self.loss
        data["spec"] = self.spec.to_dict()
        data["layout"] = self.layout.value
        if self.config_hash is not None:
            data["config_hash"] = self.config_hash
        if self.source is not None:
            data["source"] = self.source
        return {**self.extra, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, step: int | None = None, where: str = "a step") -> StepMeta:
        """Read a meta item as saved; keys it does not know are accepted and kept in ``extra``.

        ``step``: the step the item was restored from, for an item that does not record its
        own; ``where`` names the step in errors ("step 8 of DIR").
        """
        if not isinstance(data, Mapping):
            raise SourceError(f"{where}: its meta item is not a JSON object")
        if "spec" not in data:
            raise SourceError(f"{where}: its meta item has no 'spec'")
        spec = ModelSpec.from_dict(data["spec"])
        value = data.get("layout")
        try:
            layout = Layout(value)
        except ValueError:
            known = ", ".join(layout.value for layout in Layout)
            raise SourceError(f"{where} has params layout {value!r}; known layouts: {known}") from None
        recorded = data.get("step", step)
        if recorded is None:
            raise SourceError(f"{where}: its meta item has no 'step'")
        tokens, loss = data.get("tokens_seen"), data.get("loss")
        return cls(
            step=int(recorded),
            spec=spec,
            layout=layout,
            tokens_seen=None if tokens is None else int(tokens),
            loss=None if loss is None else float(loss),
            config_hash=data.get("config_hash"),
            source=data.get("source"),
            extra={k: v for k, v in data.items() if k not in _STEP_META_KEYS},
        )


_STEP_META_KEYS = frozenset(f.name for f in dataclasses.fields(StepMeta) if f.name != "extra")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """``DIR/jaxinduct_run.json``: the run a trajectory directory holds.

    Read leniently (every field may be missing): a crash before the first commit can leave
    a partial file, and a directory whose run committed nothing may be reclaimed.
    """

    config: dict[str, Any]  # TrainConfig.to_dict()
    config_hash: str | None
    format: str | None = None  # the layout the run writes (a Layout value)
    jaxinduct_version: str | None = None
    checkpoint_steps: tuple[int, ...] = ()
    created: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "jaxinduct_version": self.jaxinduct_version,
            "config": self.config,
            "config_hash": self.config_hash,
            "checkpoint_steps": list(self.checkpoint_steps),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        return cls(
            config=data.get("config", {}),
            config_hash=data.get("config_hash"),
            format=data.get("format"),
            jaxinduct_version=data.get("jaxinduct_version"),
            checkpoint_steps=tuple(data.get("checkpoint_steps") or ()),
            created=data.get("created"),
        )


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


def read_run_file(directory: Path) -> RunRecord | None:
    path = directory / RUN_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is unreadable ({e}); delete the directory or choose another --out") from e
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is unreadable (not a JSON object); delete the directory or choose another --out")
    return RunRecord.from_json(data)


def write_run_file(directory: Path, record: RunRecord) -> None:
    write_json_atomic(directory / RUN_FILE, record.to_json())


def foreign_entries(directory: Path) -> list[str]:
    """Names in ``directory`` that are not a run's own files (run file, lock, a run file
    write a crash interrupted): what makes a directory someone else's."""
    ours = {RUN_FILE, LOCK_FILE}
    return sorted(p.name for p in directory.iterdir() if p.name not in ours and not p.name.startswith(f".{RUN_FILE}."))


# --- writing ---------------------------------------------------------------------------------


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


def writer_manager(directory: Path, *, with_opt_state: bool = False) -> ocp.CheckpointManager:
    """The CheckpointManager a writer saves steps with (hold `writer_lock` around it)."""
    items = (PARAMS, OPT_STATE, META) if with_opt_state else (PARAMS, META)
    return ocp.CheckpointManager(directory, options=writer_options(), item_names=items)


def save_step(manager: ocp.CheckpointManager, meta: StepMeta, params: Any, opt_state: Any | None = None) -> None:
    """Save one step: its params (laid out as ``meta.layout`` says), optimizer state if any, and meta."""
    items: dict[str, Any] = {PARAMS: ocp.args.StandardSave(params)}
    if opt_state is not None:
        items[OPT_STATE] = ocp.args.StandardSave(opt_state)
    items[META] = ocp.args.JsonSave(meta.to_json())
    manager.save(meta.step, args=ocp.args.Composite(**items))


def save_canonical_step(
    manager: ocp.CheckpointManager, step: int, weights: Weights, meta: Mapping[str, Any] | None = None
) -> None:
    """Save one checkpoint in the CANONICAL layout (params: a dict of arrays by canonical name).

    ``manager`` must have item_names including the params and meta items (`writer_manager`
    makes one). ``meta``: more of the meta item by JSON key (tokens_seen, loss, source,
    or keys of the caller's own); the step, spec and layout are filled in.
    """
    fields = {**(meta or {}), "step": step, "spec": weights.spec.to_dict(), "layout": Layout.CANONICAL.value}
    save_step(manager, StepMeta.from_json(fields), weights_to_params(Layout.CANONICAL, weights))


def restore_training_state(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, StepMeta]:
    """A trainer's (params, opt_state, meta) of ``step``, restored into the shapes and
    dtypes of the given live ``params`` and ``opt_state``."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, (params, opt_state))
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                PARAMS: ocp.args.StandardRestore(abstract[0]),
                OPT_STATE: ocp.args.StandardRestore(abstract[1]),
                META: ocp.args.JsonRestore(),
            }
        ),
    )
    meta = StepMeta.from_json(restored[META], step=step, where=f"step {step} of {manager.directory}")
    return restored[PARAMS], restored[OPT_STATE], meta


# --- reading ---------------------------------------------------------------------------------


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


def reader_item_handlers(tree_item: str = PARAMS, *, with_meta: bool = True) -> dict[str, ocp.CheckpointHandler]:
    """Handlers of a reader of ``tree_item`` (any tree, standard handler) and, unless
    ``with_meta`` is false (someone else's trajectory), of the meta item."""
    handlers: dict[str, ocp.CheckpointHandler] = {tree_item: ocp.StandardCheckpointHandler()}
    if with_meta:
        handlers[META] = ocp.JsonCheckpointHandler()
    return handlers


def reader_manager(directory: Path, item_handlers: dict[str, ocp.CheckpointHandler] | None = None) -> ocp.CheckpointManager:
    """A read-only CheckpointManager; ``item_handlers`` (`reader_item_handlers`) to restore items."""
    handlers = {} if item_handlers is None else {"item_handlers": item_handlers}
    return ocp.CheckpointManager(directory, options=reader_options(), **handlers)


def list_steps(directory: Path) -> list[int]:
    """The committed steps of an (absolute) directory, ascending."""
    # Orbax lists finalized steps only: saves in progress (tmp dirs) are not steps yet.
    with reader_manager(directory) as manager:
        return sorted(int(s) for s in manager.all_steps())


def committed_steps(directory: str | os.PathLike) -> list[int]:
    directory = Path(directory).expanduser().resolve()  # Orbax wants absolute paths
    if not directory.is_dir():
        raise RunDirError(f"trajectory directory {directory} does not exist")
    return list_steps(directory)


def restore_meta(manager: ocp.CheckpointManager, step: int, *, where: str) -> StepMeta:
    """The step's meta item (no array is read); ``where`` names the step in errors."""
    try:
        data = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    except Exception as e:
        raise SourceError(
            f"{where} has no readable {META!r} item ({type(e).__name__}: {e}); "
            f"jaxinduct reads trajectories whose steps hold {PARAMS!r} and {META!r} (layout and spec) items"
        ) from e
    return StepMeta.from_json(data, step=step, where=where)


def restore_tree(manager: ocp.CheckpointManager, step: int, target: Any, item: str = PARAMS) -> Any:
    """One tree item of a step, restored into ``target`` (arrays or shape/dtype structs)."""
    return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]


def tree_metadata(manager: ocp.CheckpointManager, step: int, item: str = PARAMS) -> Any:
    """A tree item's array metadata (shapes, dtypes); no array is read. None when absent."""
    return manager.item_metadata(step)[item]


# Why a directory with no committed step is not a trajectory, for error messages.
DIRECTORY_HINT = (
    "expected an Orbax CheckpointManager directory: subdirectories named by step "
    f"number, each holding {PARAMS!r} and {META!r} items"
)


# --- layouts <-> canonical Weights ------------------------------------------------------------

# One converter pair per layout: canonical Weights -> the layout's params tree, and back.
_TO_TREE: dict[Layout, Callable[[Weights], Any]] = {
    Layout.NNX: weights_to_nnx_params,
    Layout.CANONICAL: Weights.arrays,
}
_TO_WEIGHTS: dict[Layout, Callable[[ModelSpec, Any], Weights]] = {
    Layout.NNX: nnx_params_to_weights,
    Layout.CANONICAL: make_weights,
}


def weights_to_params(layout: Layout, weights: Weights) -> Any:
    """The layout's params tree of ``weights``, as host arrays (what a step saves)."""
    return jax.tree_util.tree_map(np.asarray, _TO_TREE[layout](weights))


def params_to_weights(layout: Layout, spec: ModelSpec, params: Any) -> Weights:
    """Canonical host Weights from a restored params tree of the layout."""
    params = jax.tree_util.tree_map(np.asarray, params)  # host arrays: the converters stay in numpy
    return jax.tree_util.tree_map(np.asarray, _TO_WEIGHTS[layout](spec, params))


@functools.cache
def abstract_params(layout: Layout, spec: ModelSpec) -> Any:
    """The layout's params tree of a spec as shape/dtype structs; no arrays are made
    (cached: the NNX one traces the converter)."""
    return jax.eval_shape(_TO_TREE[layout], abstract_weights(spec))


def params_target(layout: Layout, spec: ModelSpec) -> Any:
    """The layout's params tree as numpy arrays of the right shapes: Orbax restores into numpy.

    Host numpy, not jax arrays: the batcher stacks checkpoints on the host and places
    the stack on the mesh once. Restoring into jax arrays would also put device work of
    the loader threads in the queue behind the running score computation (measured: it
    serialises loading with compute on the CPU backend) and is ~2.5x slower per restore.
    """
    # Fresh arrays per call: each loader thread restores into its own.
    return host_zeros(abstract_params(layout, spec))
