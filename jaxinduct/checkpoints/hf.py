"""The source for Hugging Face model directories: one model, or a trajectory of revisions.

Weights are read by `jaxinduct.checkpoints.hf_weights` (safetensors, no torch); this
module finds the revisions and their steps.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from jaxinduct.checkpoints.hf_weights import CONFIG_FILE, load_hf_weights, read_hf_config, spec_from_hf_config
from jaxinduct.checkpoints.protocol import LoadedCheckpoint, SourceError
from jaxinduct.model.weights import ModelSpec

TRAINER_STATE = "trainer_state.json"
_REVISION_NAMES = (re.compile(r"^step(\d+)$"), re.compile(r"^checkpoint-(\d+)$"), re.compile(r"^revision-.+$"))


def _hf_step(directory: Path) -> int | None:
    """A revision's step: from its name (stepN, checkpoint-N), else from trainer_state.json."""
    for pattern in _REVISION_NAMES[:2]:
        match = pattern.match(directory.name)
        if match:
            return int(match[1])
    state = directory / TRAINER_STATE
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{state}: no readable integer 'global_step' ({e}); rename the directory stepN") from e
    return None


@dataclasses.dataclass
class HFSource:
    """Hugging Face model directories (config.json + safetensors): one, or a trajectory of
    revision subdirectories named ``step{N}``, ``checkpoint-{N}`` or ``revision-*`` (the step
    from the name, or from the revision's trainer_state.json)."""

    directory: Path
    description: str
    single: bool
    _first_spec: ModelSpec | None = dataclasses.field(default=None, repr=False)
    # step -> revision directory as last listed: load() looks steps up here instead of
    # listing (and reading trainer_state.json of) every revision per checkpoint.
    _listed: dict[int, Path] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def detect(cls, directory: Path) -> HFSource | None:
        if (directory / CONFIG_FILE).is_file():
            return cls(directory, str(directory), single=True)
        if any(_is_revision(child) for child in _children(directory)):
            return cls(directory, str(directory), single=False)
        return None

    def _revisions(self) -> dict[int, Path]:
        if self.single:
            step = _hf_step(self.directory)
            self._listed = {0 if step is None else step: self.directory}
            return self._listed
        revisions: dict[int, Path] = {}
        for child in _children(self.directory):
            if not _is_revision(child):
                continue
            step = _hf_step(child)
            if step is None:
                raise SourceError(f"{child}: a revision needs its step in its name (stepN, checkpoint-N) or in {TRAINER_STATE}")
            if step in revisions:
                raise SourceError(f"{revisions[step]} and {child} both claim step {step}")
            revisions[step] = child
        self._listed = revisions
        return revisions

    def _revision(self, step: int) -> Path:
        if step not in self._listed:  # a revision that appeared since the last listing
            self._revisions()
        if step not in self._listed:
            raise SourceError(f"{self.directory} has no revision for step {step}; it has steps {sorted(self._listed)}")
        return self._listed[step]

    def steps(self) -> list[int]:
        return sorted(self._revisions())

    def spec(self, step: int | None = None) -> ModelSpec:
        path = self._revision(min(self._revisions()) if step is None else step)
        return spec_from_hf_config(read_hf_config(path), source=path / CONFIG_FILE)

    def load(self, step: int) -> LoadedCheckpoint:
        path = self._revision(step)
        weights = load_hf_weights(path)
        if self._first_spec is None:  # read once: every revision is checked against it
            self._first_spec = self.spec()
        if weights.spec != self._first_spec:
            raise SourceError(f"{path}: its config.json describes another architecture than the first revision's")
        return LoadedCheckpoint(step=step, weights=weights, tokens_seen=None)

    def close(self) -> None:
        pass


def _children(directory: Path) -> list[Path]:
    return sorted(child for child in directory.iterdir() if child.is_dir()) if directory.is_dir() else []


def _is_revision(child: Path) -> bool:
    return any(p.match(child.name) for p in _REVISION_NAMES) and (child / CONFIG_FILE).is_file()
