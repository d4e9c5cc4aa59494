"""Checkpoint trajectories: jaxinduct's Orbax layout, and the sources that read trajectories into canonical Weights."""

from jaxinduct.checkpoints.convert import convert_hf
from jaxinduct.checkpoints.hf import HFSource
from jaxinduct.checkpoints.layout import (
    Layout,
    RunRecord,
    StepMeta,
    committed_steps,
    save_canonical_step,
    save_step,
    writer_lock,
    writer_manager,
)
from jaxinduct.checkpoints.mapped import MappedSource
from jaxinduct.checkpoints.mapping import Mapping, MappingError, load_mapping
from jaxinduct.checkpoints.orbax import OrbaxSource, restore_weights
from jaxinduct.checkpoints.selection import select_steps
from jaxinduct.checkpoints.source import CheckpointSource, LoadedCheckpoint, SourceError, StepSelectionError, open_source

__all__ = [
    "CheckpointSource",
    "HFSource",
    "Layout",
    "LoadedCheckpoint",
    "MappedSource",
    "Mapping",
    "MappingError",
    "OrbaxSource",
    "RunRecord",
    "SourceError",
    "StepMeta",
    "StepSelectionError",
    "committed_steps",
    "convert_hf",
    "load_mapping",
    "open_source",
    "restore_weights",
    "save_canonical_step",
    "save_step",
    "select_steps",
    "writer_lock",
    "writer_manager",
]
