"""Checkpoint sources, as the scan engine sees them: the contract
(`jaxinduct.checkpoints.protocol`) and `open_source`, the one place that decides which
source reads a path."""

from __future__ import annotations

import os
from pathlib import Path

from jaxinduct.checkpoints.hf import HFSource
from jaxinduct.checkpoints.mapped import MappedSource
from jaxinduct.checkpoints.orbax import OrbaxSource
from jaxinduct.checkpoints.protocol import CheckpointSource, LoadedCheckpoint, SourceError
from jaxinduct.checkpoints.selection import StepSelectionError

__all__ = ["CheckpointSource", "LoadedCheckpoint", "SourceError", "StepSelectionError", "open_source"]


def open_source(
    path: str | os.PathLike, *, allow_empty: bool = False, mapping: str | os.PathLike | None = None
) -> CheckpointSource:
    """The source for a path: a Hugging Face model or revision directory, else Orbax
    (read through ``mapping``, a `jaxinduct.checkpoints.mapping` YAML file, when given)."""
    directory = Path(path).expanduser().resolve()
    hf = HFSource.detect(directory) if directory.is_dir() else None
    if hf is not None:
        if mapping is not None:
            raise SourceError(f"{directory} is a Hugging Face model directory; --mapping applies to Orbax checkpoints")
        return hf
    if mapping is not None:
        return MappedSource.open(path, mapping, allow_empty=allow_empty)
    return OrbaxSource.open(path, allow_empty=allow_empty)
