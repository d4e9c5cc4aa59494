"""The source for someone else's Orbax trajectory, read through a YAML mapping.

The mapping (`jaxinduct.checkpoints.mapping`) gives the spec and says where each canonical
tensor lives in one Orbax item of every step; that item is restored as a plain tree (no
meta item is read: such a trajectory has none) and mapped to canonical Weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinduct.checkpoints.layout import list_steps, reader_item_handlers, restore_tree, tree_metadata
from jaxinduct.checkpoints.mapping import Mapping, apply_mapping, check_shapes, flatten_tree, load_mapping
from jaxinduct.checkpoints.orbax import ThreadReaders, existing_directory, first_step, require_steps
from jaxinduct.checkpoints.protocol import LoadedCheckpoint, SourceError
from jaxinduct.model.weights import ModelSpec, host_zeros


@dataclasses.dataclass
class MappedSource:
    """An Orbax CheckpointManager directory in someone else's layout, read through ``mapping``."""

    directory: Path
    description: str
    mapping: Mapping
    _readers: ThreadReaders = dataclasses.field(init=False, repr=False)  # of the mapping's item

    def __post_init__(self) -> None:
        handlers = functools.partial(reader_item_handlers, self.mapping.item, with_meta=False)
        self._readers = ThreadReaders(self.directory, handlers)

    @classmethod
    def open(
        cls, path: str | os.PathLike, mapping: str | os.PathLike | Mapping, *, allow_empty: bool = False
    ) -> MappedSource:
        """Check that ``path`` is a checkpoint directory and read ``mapping`` (a YAML file, see
        `jaxinduct.checkpoints.mapping`, or a parsed one); ``allow_empty`` for a run yet to save."""
        directory = existing_directory(path)
        if not isinstance(mapping, Mapping):
            mapping = load_mapping(mapping)
        if not allow_empty:
            require_steps(directory)
        return cls(directory, str(directory), mapping)

    def steps(self) -> list[int]:
        return list_steps(self.directory)

    def spec(self, step: int | None = None) -> ModelSpec:
        step = first_step(self.directory) if step is None else step
        shapes = {k: tuple(v.shape) for k, v in flatten_tree(self._metadata(step)).items()}
        check_shapes(self.mapping, shapes, where=f"step {step} of {self.directory}")
        return self.mapping.spec

    def _metadata(self, step: int) -> Any:
        """The mapping item's tree of array metadata (shapes, dtypes); no array is read."""
        item = self.mapping.item
        try:
            metadata = tree_metadata(self._readers.get(step), step, item)
        except Exception as e:
            metadata, error = None, e
        else:
            error = None
        if metadata is None:
            step_dir = self.directory / str(step)
            found = sorted(p.name for p in step_dir.iterdir() if p.is_dir()) if step_dir.is_dir() else []
            detail = f" ({type(error).__name__}: {error})" if error is not None else ""
            raise SourceError(
                f"step {step} of {self.directory}: mapping {self.mapping.file} reads Orbax item {item!r}, "
                f"which this step does not hold{detail}; its items: {found} (a bare StandardSave is item 'default')"
            ) from error
        return getattr(metadata, "tree", metadata)

    def load(self, step: int) -> LoadedCheckpoint:
        target = host_zeros(self._metadata(step))
        tree = restore_tree(self._readers.get(step), step, target, self.mapping.item)
        weights = apply_mapping(self.mapping, tree, where=f"step {step} of {self.directory}")
        return LoadedCheckpoint(step=step, weights=jax.tree_util.tree_map(np.asarray, weights), tokens_seen=None)

    def close(self) -> None:
        """Close the readers the loader threads opened (the source stays usable)."""
        self._readers.close()
