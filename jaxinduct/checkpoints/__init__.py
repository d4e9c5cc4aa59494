"""Where checkpoints come from: jaxinduct's Orbax layout, the sources that read trajectories into canonical Weights, step selection and converters.

The public names below are imported from their modules on first use (PEP 562), so that
importing one light module of the package (`selection`, which the command line parses
``--steps`` with) does not load Orbax, Flax and JAX with the others.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "convert_hf": "jaxinduct.checkpoints.convert",
    "HFSource": "jaxinduct.checkpoints.hf",
    "Layout": "jaxinduct.checkpoints.layout",
    "RunRecord": "jaxinduct.checkpoints.layout",
    "StepMeta": "jaxinduct.checkpoints.layout",
    "committed_steps": "jaxinduct.checkpoints.layout",
    "save_canonical_step": "jaxinduct.checkpoints.layout",
    "save_step": "jaxinduct.checkpoints.layout",
    "writer_lock": "jaxinduct.checkpoints.layout",
    "writer_manager": "jaxinduct.checkpoints.layout",
    "MappedSource": "jaxinduct.checkpoints.mapped",
    "Mapping": "jaxinduct.checkpoints.mapping",
    "MappingError": "jaxinduct.checkpoints.mapping",
    "load_mapping": "jaxinduct.checkpoints.mapping",
    "OrbaxSource": "jaxinduct.checkpoints.orbax",
    "restore_weights": "jaxinduct.checkpoints.orbax",
    "StepSelection": "jaxinduct.checkpoints.selection",
    "StepSelectionError": "jaxinduct.checkpoints.selection",
    "select_steps": "jaxinduct.checkpoints.selection",
    "CheckpointSource": "jaxinduct.checkpoints.protocol",
    "LoadedCheckpoint": "jaxinduct.checkpoints.protocol",
    "SourceError": "jaxinduct.checkpoints.protocol",
    "open_source": "jaxinduct.checkpoints.source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
