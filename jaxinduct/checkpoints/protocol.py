"""The contract every checkpoint source implements: `CheckpointSource`, `LoadedCheckpoint`
and the errors of reading a trajectory.

A source lists its committed steps and reads the model spec from metadata alone (no
array is read to discover a trajectory); ``load(step)`` restores one checkpoint into
canonical host (numpy-backed) Weights. The scan engine sees only `CheckpointSource`, so a
new kind of trajectory is one more module beside `jaxinduct.checkpoints.orbax` (jaxinduct's
own layouts), `jaxinduct.checkpoints.mapped` (someone else's Orbax tree through a YAML
mapping) and `jaxinduct.checkpoints.hf` (Hugging Face revision directories), and one more
branch in `jaxinduct.checkpoints.source.open_source`.

This module imports none of the sources: each of them imports it, and
`jaxinduct.checkpoints.source` imports all of them, without an import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from jaxinduct.errors import RunDirError
from jaxinduct.model.weights import ModelSpec, Weights


class SourceError(RunDirError):
    """A checkpoint source cannot be read (not a trajectory, unknown layout, bad metadata)."""


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    weights: Weights  # host arrays (numpy), one checkpoint
    tokens_seen: int | None


class CheckpointSource(Protocol):
    """What the scan engine needs of a trajectory."""

    description: str  # recorded in the store as the run's source

    def steps(self) -> list[int]:
        """Committed steps, ascending; re-read on every call (a live run grows)."""
        ...

    def spec(self, step: int | None = None) -> ModelSpec:
        """The architecture, from metadata only: of ``step``, or of the first committed step
        (which lists the steps: a caller that just listed them passes one)."""
        ...

    def load(self, step: int) -> LoadedCheckpoint: ...

    def close(self) -> None:
        """Release what loading opened (files, readers); called when a scan ends."""
        ...
