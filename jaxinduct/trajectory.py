"""jaxinduct's own Orbax trajectory layout.

A trajectory directory is a plain Orbax CheckpointManager directory (any Orbax
user can call ``CheckpointManager(dir).all_steps()``) plus one JSON file that
says which run wrote it::

    DIR/jaxinduct_run.json     run identity: config, config hash, schedule
    DIR/<step>/params/         the reference model's params, nnx.to_pure_dict layout
    DIR/<step>/opt_state/      optimizer state (for resuming training)
    DIR/<step>/meta/           JSON: step, tokens_seen, loss, spec, layout

Every step describes itself (its ``meta`` carries the model spec), so a step
copied out of its directory can still be read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxinduct.errors import RunDirError
from jaxinduct.model import nnx_params_to_weights
from jaxinduct.weights import ModelSpec, Weights

RUN_FILE = "jaxinduct_run.json"
LAYOUT_NNX = "jaxinduct.nnx/1"
PARAMS, OPT_STATE, META = "params", "opt_state", "meta"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_file(directory: Path) -> dict[str, Any] | None:
    path = directory / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path} is unreadable ({e}); delete the directory or choose another --out") from e


def manager_options(**overrides: Any) -> ocp.CheckpointManagerOptions:
    # Keep every step (a trajectory is the point); clear leftovers of saves a crash interrupted.
    return ocp.CheckpointManagerOptions(max_to_keep=None, cleanup_tmp_directories=True, **overrides)


def restore_weights(directory: str | os.PathLike, step: int) -> tuple[Weights, dict[str, Any]]:
    """Canonical Weights and the meta dict of one step of a jaxinduct trajectory."""
    directory = Path(directory)
    with ocp.CheckpointManager(directory, item_names=(PARAMS, META)) as manager:
        if step not in manager.all_steps():
            raise RunDirError(f"{directory} has no committed step {step}; it has {manager.all_steps()}")
        restored = manager.restore(
            step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(), META: ocp.args.JsonRestore()})
        )
    meta = restored[META]
    spec = ModelSpec.from_dict(meta["spec"])
    return nnx_params_to_weights(spec, restored[PARAMS]), meta
