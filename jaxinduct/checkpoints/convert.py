"""`jaxinduct convert hf`: a Hugging Face revision trajectory into an Orbax trajectory, once.

Each selected revision becomes one Orbax step in the canonical layout (a dict of
canonical arrays plus a meta item with the spec), which `jaxinduct scan` reads to the
same scores as the Hugging Face directories themselves. Resumable: steps already
committed in the output are skipped; an output that holds another run is refused.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from jaxinduct.checkpoints.hf import HFSource
from jaxinduct.checkpoints.layout import Layout, StepMeta, restore_meta, save_step, weights_to_params, writer_lock, writer_manager
from jaxinduct.checkpoints.selection import ALL_STEPS, StepSelection, select_steps
from jaxinduct.errors import RunDirError
from jaxinduct.flags import SourcePath, StepsFlag


@dataclasses.dataclass(frozen=True)
class ConvertHFConfig:
    """Write each selected Hugging Face revision (config.json + safetensors) as one Orbax step
    in jaxinduct's canonical layout. Resumable."""

    source: SourcePath
    """Hugging Face revisions (stepN, checkpoint-N, revision-*) or one model directory"""
    out: str
    """Orbax trajectory directory to write"""
    steps: StepsFlag = ALL_STEPS
    """which revisions: all | latest | N | A:B | A:B:S | every:N, comma-separated"""


def convert_hf(
    source: str | os.PathLike, out: str | os.PathLike, *, steps: str | StepSelection = ConvertHFConfig.steps
) -> list[int]:
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
    with writer_lock(target), writer_manager(target) as manager:
        existing = set(manager.all_steps())
        if existing:
            first = min(existing)
            converted_from = restore_meta(manager, first, where=f"step {first} of {target}").source
            if converted_from != str(directory):
                raise RunDirError(
                    f"{target} already holds a trajectory converted from {converted_from!r}; choose another --out"
                )
        written = []
        for step in selected:
            if step in existing:
                continue
            loaded = hf.load(step)  # refuses a revision whose architecture differs from the first
            meta = StepMeta(step=step, spec=loaded.weights.spec, layout=Layout.CANONICAL, source=str(directory))
            save_step(manager, meta, weights_to_params(Layout.CANONICAL, loaded.weights))
            written.append(step)
        manager.wait_until_finished()
    return written
