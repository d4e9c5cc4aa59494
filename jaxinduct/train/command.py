"""The `jaxinduct train` command's config: a preset's `TrainConfig`, overridable field by field.

``--preset NAME`` (or ``preset:`` in a YAML config) picks the preset whose values every
other field starts from; any field of the training config can then be changed with its
own flag (``--steps 500``, ``--model.n-layers 3``, ``--schedule.dense-every 10``), and
``--print-config`` shows the config that will train, preset values included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from jaxinduct.flags import NO_PREFIX
from jaxinduct.train.trainer import PRESETS, TrainConfig, get_preset

DEFAULT_PRESET = "quickstart"


@dataclasses.dataclass(frozen=True)
class TrainCommandConfig:
    """Train a small reference model on built-in data (or a text corpus) and save checkpoints
    dense early and sparse late. Re-running with the same options resumes."""

    out: str | None = None
    """trajectory directory (new, empty, or a run of the same config to resume)"""
    train: Annotated[TrainConfig, NO_PREFIX] = PRESETS[DEFAULT_PRESET]
    corpus: str | None = None
    """train byte-level on this text file or folder instead of generated data"""
    progress: bool = True
    """show progress"""
    list_presets: bool = False
    """list presets and exit"""

    def resolved(self) -> TrainConfig:
        """The training config with ``corpus`` applied (byte-level data from that file or folder)."""
        if self.corpus is None:
            return self.train
        return dataclasses.replace(self.train, data=dataclasses.replace(self.train.data, kind="bytes", corpus=self.corpus))


def preset_named(args: Sequence[str], data: Mapping[str, Any] | None) -> str:
    """The preset a command line (``--preset NAME``) or else a YAML config (``train: {preset:}``) names."""
    for i, arg in enumerate(args):
        if arg == "--preset" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--preset="):
            return arg.partition("=")[2]
    train = (data or {}).get("train")
    if isinstance(train, Mapping) and isinstance(train.get("preset"), str):
        return train["preset"]
    return DEFAULT_PRESET


def seeded(args: Sequence[str], data: Mapping[str, Any] | None) -> TrainCommandConfig:
    """The defaults this command line starts from: those of the preset it names."""
    return TrainCommandConfig(train=get_preset(preset_named(args, data)))
