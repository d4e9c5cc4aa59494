"""`jaxinduct convert hf`: a Hugging Face revision trajectory into an Orbax trajectory, once.

Each selected revision becomes one Orbax step in the canonical layout (a dict of
canonical arrays plus a meta item with the spec), which `jaxinduct scan` reads to the
same scores as the Hugging Face directories themselves. Resumable: steps already
committed in the output are skipped; an output that holds another run is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import orbax.checkpoint as ocp

from jaxinduct.errors import RunDirError
from jaxinduct.checkpoints.sources import HFSource, select_steps
from jaxinduct.checkpoints.layout import META, PARAMS, save_canonical_step, writer_lock, writer_options


def convert_hf(source: str | os.PathLike, out: str | os.PathLike, *, steps: str = "all") -> list[int]:
    """Convert the selected revisions; returns the steps written now."""
    directory = Path(source).expanduser().resolve()
    hf = HFSource.detect(directory) if directory.is_dir() else None
    if hf is None:
        raise RunDirError(
            f"{directory} is not a Hugging Face model directory (config.json + model.safetensors) "
            "nor a directory of revisions named stepN, checkpoint-N or revision-*"
        )
    selected = select_steps(steps, hf.steps())
    hf.spec()  # fail before writing anything when the first revision is unreadable
    target = Path(out).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    with writer_lock(target), ocp.CheckpointManager(target, options=writer_options(), item_names=(PARAMS, META)) as manager:
        existing = set(manager.all_steps())
        if existing:
            first = manager.restore(min(existing), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
            if first.get("source") != str(directory):
                raise RunDirError(
                    f"{target} already holds a trajectory converted from {first.get('source')!r}; choose another --out"
                )
        written = []
        for step in selected:
            if step in existing:
                continue
            loaded = hf.load(step)  # refuses a revision whose architecture differs from the first
            save_canonical_step(manager, step, loaded.weights, {"source": str(directory), "tokens_seen": None})
            written.append(step)
        manager.wait_until_finished()
    return written
