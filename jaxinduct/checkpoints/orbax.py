"""The source for jaxinduct's own Orbax trajectories (either `Layout`), and the Orbax
reading machinery that `jaxinduct.checkpoints.mapped` shares.

Layouts of a step's params item, named by its meta item (`jaxinduct.checkpoints.layout`):

- ``jaxinduct.nnx/1``: the reference model's NNX state (what ``jaxinduct train`` writes);
- ``jaxinduct.canonical/1``: a plain dict of canonical arrays by name (``Weights.arrays()``),
  what a user's own code can save with `jaxinduct.checkpoints.layout.save_canonical_step`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxinduct.checkpoints.layout import (
    DIRECTORY_HINT,
    RUN_FILE,
    StepMeta,
    abstract_params,
    list_steps,
    params_target,
    params_to_weights,
    reader_item_handlers,
    reader_manager,
    restore_meta,
    restore_tree,
    tree_metadata,
)
from jaxinduct.checkpoints.mapping import flatten_tree
from jaxinduct.checkpoints.protocol import LoadedCheckpoint, SourceError
from jaxinduct.errors import RunDirError
from jaxinduct.model.weights import ModelSpec, Weights


class ThreadReaders:
    """One reader (a read-only CheckpointManager) per loader thread over one directory.

    Reused: creating a CheckpointManager lists the directory and costs more than restoring
    a small checkpoint. Managers are not shared between threads.
    """

    def __init__(self, directory: Path, item_handlers: Callable[[], dict[str, ocp.CheckpointHandler]]):
        self._directory = directory
        self._item_handlers = item_handlers  # called per reader: handlers are not shared either
        self._local = threading.local()
        self._open: list[ocp.CheckpointManager] = []

    def get(self, step: int) -> ocp.CheckpointManager:
        """This thread's reader (created on first use, reloaded for a step it has not listed)."""
        manager = getattr(self._local, "manager", None)
        if manager is None:
            manager = reader_manager(self._directory, self._item_handlers())
            self._local.manager = manager
            self._open.append(manager)  # list.append is atomic: safe from loader threads
        elif step not in manager.all_steps():
            manager.reload()  # a live run saved it after this reader listed the directory
        return manager

    def close(self) -> None:
        """Close every thread's reader (new ones are created on the next `get`)."""
        while self._open:
            self._open.pop().close()
        self._local = threading.local()


def existing_directory(path: str | os.PathLike) -> Path:
    """``path`` as the absolute directory Orbax wants, or a SourceError saying what it is instead."""
    directory = Path(path).expanduser().resolve()
    if not directory.exists():
        raise SourceError(f"{directory} does not exist; give the directory a training run saves checkpoints to")
    if not directory.is_dir():
        raise SourceError(f"{directory} is a file, not a checkpoint directory")
    return directory


def require_steps(directory: Path) -> None:
    """Refuse a directory with no committed step, saying whether a run is yet to commit one."""
    if list_steps(directory):
        return
    hint = (
        "its run has not committed a checkpoint yet (use `jaxinduct watch` to wait for them)"
        if (directory / RUN_FILE).exists()
        else DIRECTORY_HINT
    )
    raise SourceError(f"{directory} holds no committed checkpoint: {hint}")


def first_step(directory: Path) -> int:
    steps = list_steps(directory)
    if not steps:
        raise SourceError(f"{directory} holds no committed checkpoint yet")
    return steps[0]


@dataclasses.dataclass
class OrbaxSource:
    """An Orbax CheckpointManager directory written by jaxinduct (or in one of its layouts)."""

    directory: Path
    description: str
    _meta_cache: dict[int, StepMeta] = dataclasses.field(default_factory=dict, repr=False)
    _readers: ThreadReaders = dataclasses.field(init=False, repr=False)  # of params and meta

    def __post_init__(self) -> None:
        self._readers = ThreadReaders(self.directory, reader_item_handlers)

    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_empty: bool = False) -> OrbaxSource:
        """Check that ``path`` is a checkpoint directory; ``allow_empty`` for a run yet to save."""
        directory = existing_directory(path)
        if not allow_empty:
            require_steps(directory)
        return cls(directory, str(directory))

    def steps(self) -> list[int]:
        return list_steps(self.directory)

    def meta(self, step: int) -> StepMeta:
        """The step's small JSON item (spec, layout, tokens_seen); no array is read."""
        if step not in self._meta_cache:
            where = f"step {step} of {self.directory}"
            self._meta_cache[step] = restore_meta(self._readers.get(step), step, where=where)
        return self._meta_cache[step]

    def spec(self, step: int | None = None) -> ModelSpec:
        step = first_step(self.directory) if step is None else step
        meta = self.meta(step)
        self._check_param_shapes(meta)
        return meta.spec

    def _check_param_shapes(self, meta: StepMeta) -> None:
        """Compare the params tree's metadata (shapes only, no arrays) with the spec."""
        step = meta.step
        stored = tree_metadata(self._readers.get(step), step)
        flat_expected = {k: tuple(v.shape) for k, v in flatten_tree(abstract_params(meta.layout, meta.spec)).items()}
        flat_stored = {k: tuple(v.shape) for k, v in flatten_tree(stored).items()}
        missing = sorted(set(flat_expected) - set(flat_stored))
        if missing:
            raise SourceError(f"step {step} of {self.directory}: params lack {missing[:5]}, which its spec requires")
        for key, shape in flat_expected.items():
            if flat_stored[key] != shape:
                raise SourceError(
                    f"step {step} of {self.directory}: params tensor {key} has shape {flat_stored[key]}, "
                    f"but its spec says {shape}"
                )

    def load_with_meta(self, step: int) -> tuple[Weights, StepMeta]:
        meta = self.meta(step)
        params = restore_tree(self._readers.get(step), step, params_target(meta.layout, meta.spec))
        return params_to_weights(meta.layout, meta.spec, params), meta

    def load(self, step: int) -> LoadedCheckpoint:
        weights, meta = self.load_with_meta(step)
        return LoadedCheckpoint(step=step, weights=weights, tokens_seen=meta.tokens_seen)

    def close(self) -> None:
        """Close the readers the loader threads opened (the source stays usable)."""
        self._readers.close()


def restore_weights(directory: str | os.PathLike, step: int) -> tuple[Weights, dict[str, Any]]:
    """Canonical Weights and the meta item (as JSON, `StepMeta.to_json`) of one step of a
    jaxinduct trajectory (either layout)."""
    source = OrbaxSource.open(directory)
    try:
        if step not in source.steps():
            raise RunDirError(f"{source.directory} has no committed step {step}; committed steps: {source.steps()}")
        weights, meta = source.load_with_meta(step)
        return weights, meta.to_json()
    finally:
        source.close()
