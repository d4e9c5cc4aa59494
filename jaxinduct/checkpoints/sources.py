"""Checkpoint sources: discovery, step selection and one adapter per layout into Weights.

A source lists its committed steps and reads the model spec from metadata alone (no
array is read to discover a trajectory); ``load(step)`` restores one checkpoint into
canonical host (numpy-backed) Weights. The scan engine sees only `CheckpointSource`,
so a new layout (Hugging Face revisions, someone else's Flax tree) is one more class or
adapter here.

Layouts of an Orbax CheckpointManager directory, named by each step's ``meta`` item
(`jaxinduct.checkpoints.layout.Layout`):

- ``jaxinduct.nnx/1``: the reference model's NNX state (what ``jaxinduct train`` writes);
- ``jaxinduct.canonical/1``: a plain dict of canonical arrays by name (``Weights.arrays()``),
  what a user's own code can save with `jaxinduct.checkpoints.layout.save_canonical_step`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxinduct.errors import JaxInductError, RunDirError
from jaxinduct.checkpoints.mapping import Mapping, apply_mapping, check_shapes, flatten_tree, load_mapping
from jaxinduct.model.nnx import nnx_params_to_weights
from jaxinduct.checkpoints.layout import META, PARAMS, RUN_FILE, Layout, abstract_nnx_params, reader_options
from jaxinduct.model.weights import ModelSpec, Weights, expected_shapes, make_weights


class SourceError(RunDirError):
    """A checkpoint source cannot be read (not a trajectory, unknown layout, bad metadata)."""


class StepSelectionError(JaxInductError, ValueError):
    """A --steps expression is malformed or selects nothing."""


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


# --- Orbax CheckpointManager directories -------------------------------------------------------

_ADAPTERS: dict[Layout, Callable[[ModelSpec, Any], Weights]] = {
    Layout.NNX: nnx_params_to_weights,
    Layout.CANONICAL: make_weights,
}


@functools.cache
def _abstract_target(layout: Layout, spec: ModelSpec) -> Any:
    """A layout's params tree of ShapeDtypeStructs (cached: the NNX one traces the model)."""
    if layout == Layout.NNX:
        return abstract_nnx_params(spec)
    return {name: jax.ShapeDtypeStruct(shape, np.float32) for name, shape in expected_shapes(spec).items()}


def _restore_target(layout: Layout, spec: ModelSpec) -> Any:
    """A layout's params tree as numpy arrays of the right shapes: Orbax restores into numpy.

    Host numpy, not jax arrays: the batcher stacks checkpoints on the host and places
    the stack on the mesh once. Restoring into jax arrays would also put device work of
    the loader threads in the queue behind the running score computation (measured: it
    serialises loading with compute on the CPU backend) and is ~2.5x slower per restore.
    """
    # Fresh arrays per call: each loader thread restores into its own.
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), _abstract_target(layout, spec))


@dataclasses.dataclass
class OrbaxSource:
    """An Orbax CheckpointManager directory written by jaxinduct (or in one of its layouts)."""

    directory: Path
    description: str
    _meta_cache: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)
    # One params reader per loader thread, reused: creating a CheckpointManager lists the
    # directory and costs more than restoring a small checkpoint. Managers are not shared
    # between threads.
    _readers: threading.local = dataclasses.field(default_factory=threading.local, repr=False)
    _open_readers: list[ocp.CheckpointManager] = dataclasses.field(default_factory=list, repr=False)
    # A declarative mapping (jaxinduct.checkpoints.mapping) for someone else's params tree: the spec comes
    # from it, the params from its Orbax item, restored as a plain tree; no meta item is read.
    mapping: Mapping | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, allow_empty: bool = False, mapping: str | os.PathLike | Mapping | None = None
    ) -> OrbaxSource:
        """Check that ``path`` is a checkpoint directory; ``allow_empty`` for a run yet to save;
        ``mapping`` (a YAML file, see `jaxinduct.checkpoints.mapping`) for a tree in someone else's layout."""
        directory = Path(path).expanduser().resolve()  # Orbax wants absolute paths
        if not directory.exists():
            raise SourceError(f"{directory} does not exist; give the directory a training run saves checkpoints to")
        if not directory.is_dir():
            raise SourceError(f"{directory} is a file, not a checkpoint directory")
        if mapping is not None and not isinstance(mapping, Mapping):
            mapping = load_mapping(mapping)
        source = cls(directory, str(directory), mapping=mapping)
        if not allow_empty and not source.steps():
            hint = (
                "its run has not committed a checkpoint yet (use `jaxinduct watch` to wait for them)"
                if (directory / RUN_FILE).exists()
                else "expected an Orbax CheckpointManager directory: subdirectories named by step "
                "number, each holding 'params' and 'meta' items"
            )
            raise SourceError(f"{directory} holds no committed checkpoint: {hint}")
        return source

    def steps(self) -> list[int]:
        # Orbax lists finalized steps only: saves in progress (tmp dirs) are not steps yet.
        with ocp.CheckpointManager(self.directory, options=reader_options()) as manager:
            return sorted(int(s) for s in manager.all_steps())

    def meta(self, step: int) -> dict[str, Any]:
        """The step's small JSON item (spec, layout, tokens_seen); no array is read."""
        if step not in self._meta_cache:
            try:
                manager = self._reader(step)
                meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
            except Exception as e:
                raise SourceError(
                    f"step {step} of {self.directory} has no readable '{META}' item ({type(e).__name__}: {e}); "
                    "jaxinduct reads trajectories whose steps hold 'params' and 'meta' (layout and spec) items"
                ) from e
            self._meta_cache[step] = meta
        return self._meta_cache[step]

    def layout(self, step: int) -> Layout:
        value = self.meta(step).get("layout")
        try:
            return Layout(value)
        except ValueError:
            known = ", ".join(layout.value for layout in Layout)
            raise SourceError(f"step {step} of {self.directory} has params layout {value!r}; known layouts: {known}") from None

    def spec(self, step: int | None = None) -> ModelSpec:
        if step is None:
            steps = self.steps()
            if not steps:
                raise SourceError(f"{self.directory} holds no committed checkpoint yet")
            step = steps[0]
        if self.mapping is not None:
            shapes = {k: tuple(v.shape) for k, v in flatten_tree(self._mapped_metadata(step)).items()}
            check_shapes(self.mapping, shapes, where=f"step {step} of {self.directory}")
            return self.mapping.spec
        meta = self.meta(step)
        if "spec" not in meta:
            raise SourceError(f"step {step} of {self.directory}: its meta item has no 'spec'")
        spec = ModelSpec.from_dict(meta["spec"])
        self._check_param_shapes(step, spec)
        return spec

    def _check_param_shapes(self, step: int, spec: ModelSpec) -> None:
        """Compare the params tree's metadata (shapes only, no arrays) with the spec."""
        layout = self.layout(step)
        stored = self._reader(step).item_metadata(step)[PARAMS]
        flat_expected = {k: tuple(v.shape) for k, v in flatten_tree(_abstract_target(layout, spec)).items()}
        flat_stored = {k: tuple(v.shape) for k, v in flatten_tree(stored).items()}
        missing = sorted(set(flat_expected) - set(flat_stored))
        if missing:
            raise SourceError(f"step {step} of {self.directory}: params lack {missing[:5]}, which its spec requires")
        for key, shape in flat_expected.items():
            if flat_stored[key] != shape:
                raise SourceError(
                    f"step {step} of {self.directory}: params tensor {key} has shape {flat_stored[key]}, "
                    f"but its spec says {shape}"
                )

    def load_with_meta(self, step: int) -> tuple[Weights, dict[str, Any]]:
        meta = self.meta(step)
        layout = self.layout(step)
        spec = ModelSpec.from_dict(meta["spec"])
        target = _restore_target(layout, spec)
        manager = self._reader(step)
        params = manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))[PARAMS]
        params = jax.tree_util.tree_map(np.asarray, params)  # host arrays: adapters stay in numpy
        return jax.tree_util.tree_map(np.asarray, _ADAPTERS[layout](spec, params)), meta

    def _reader(self, step: int) -> ocp.CheckpointManager:
        """This thread's reader of params and meta items (created once, reloaded for new steps)."""
        handlers = lambda: {PARAMS: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}  # noqa: E731
        return self._thread_reader("manager", step, lambda: dict(item_handlers=handlers()))

    def _thread_reader(self, key: str, step: int, items: Callable[[], dict[str, Any]]) -> ocp.CheckpointManager:
        """This thread's CheckpointManager under ``key``, created with ``items()`` on first use."""
        manager = getattr(self._readers, key, None)
        if manager is None:
            manager = ocp.CheckpointManager(self.directory, options=reader_options(), **items())
            setattr(self._readers, key, manager)
            self._open_readers.append(manager)  # list.append is atomic: safe from loader threads
        elif step not in manager.all_steps():
            manager.reload()  # a live run saved it after this reader listed the directory
        return manager

    def _mapped_reader(self, step: int) -> ocp.CheckpointManager:
        """This thread's reader of the mapping's item (any tree, restored with the standard handler)."""
        assert self.mapping is not None
        handlers = {self.mapping.item: ocp.StandardCheckpointHandler()}
        return self._thread_reader("mapped", step, lambda: dict(item_handlers=handlers))

    def _mapped_metadata(self, step: int) -> Any:
        """The mapping item's tree of array metadata (shapes, dtypes); no array is read."""
        assert self.mapping is not None
        item = self.mapping.item
        try:
            metadata = self._mapped_reader(step).item_metadata(step)[item]
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

    def _load_mapped(self, step: int) -> LoadedCheckpoint:
        assert self.mapping is not None
        item = self.mapping.item
        target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), self._mapped_metadata(step))
        tree = self._mapped_reader(step).restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
        weights = apply_mapping(self.mapping, tree, where=f"step {step} of {self.directory}")
        return LoadedCheckpoint(step=step, weights=jax.tree_util.tree_map(np.asarray, weights), tokens_seen=None)

    def close(self) -> None:
        """Close the readers the loader threads opened (the source stays usable)."""
        while self._open_readers:
            self._open_readers.pop().close()
        self._readers = threading.local()

    def load(self, step: int) -> LoadedCheckpoint:
        if self.mapping is not None:
            return self._load_mapped(step)
        weights, meta = self.load_with_meta(step)
        tokens = meta.get("tokens_seen")
        return LoadedCheckpoint(step=step, weights=weights, tokens_seen=None if tokens is None else int(tokens))


# --- Hugging Face model directories ------------------------------------------------------------

HF_CONFIG = "config.json"
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
        if (directory / HF_CONFIG).is_file():
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
        from jaxinduct.checkpoints.hf_weights import read_hf_config, spec_from_hf_config

        path = self._revision(min(self._revisions()) if step is None else step)
        return spec_from_hf_config(read_hf_config(path), source=path / HF_CONFIG)

    def load(self, step: int) -> LoadedCheckpoint:
        from jaxinduct.checkpoints.hf_weights import load_hf_weights

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
    return any(p.match(child.name) for p in _REVISION_NAMES) and (child / HF_CONFIG).is_file()


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
    return OrbaxSource.open(path, allow_empty=allow_empty, mapping=mapping)


# --- step selection --------------------------------------------------------------------------

_RANGE = re.compile(r"^(-?\d*):(-?\d*)(?::(\d+))?$")


def select_steps(expression: str, available: list[int]) -> list[int]:
    """The available steps an expression selects, ascending.

    Terms, joined by commas (the union is taken):
      all              every step (the default)
      latest           the last committed step
      N                step N (must exist)
      A:B              steps with A <= step <= B (either end may be left out)
      A:B:S            steps A, A+S, A+2S, ... up to B that exist
      every:N          every N-th available step, counting from the first (and the last)
    """
    available = sorted(set(available))
    if not expression or not expression.strip():
        raise StepSelectionError("--steps is empty; use e.g. 'all', 'latest', '0:5000:100', '100,200' or 'every:4'")
    chosen: set[int] = set()
    for term in (t.strip() for t in expression.split(",")):
        chosen |= _select_term(term, available)
    if not chosen:
        shown = _describe(available)
        raise StepSelectionError(f"--steps {expression!r} selects none of the committed steps ({shown})")
    return sorted(chosen)


def _select_term(term: str, available: list[int]) -> set[int]:
    if term == "all":
        return set(available)
    if term == "latest":
        return set(available[-1:])
    if term.startswith("every:"):
        n = term.removeprefix("every:")
        if not n.isdigit() or int(n) < 1:
            raise StepSelectionError(f"--steps term {term!r}: every:N needs a positive integer N")
        return set(available[:: int(n)]) | set(available[-1:])
    if re.fullmatch(r"\d+", term):
        step = int(term)
        if step not in available:
            raise StepSelectionError(f"--steps: step {step} is not a committed step ({_describe(available)})")
        return {step}
    match = _RANGE.match(term)
    if not match:
        raise StepSelectionError(
            f"--steps term {term!r} is not one of: all, latest, N, A:B, A:B:S, every:N (comma-separated)"
        )
    start = int(match[1]) if match[1] else (available[0] if available else 0)
    stop = int(match[2]) if match[2] else (available[-1] if available else 0)
    stride = int(match[3]) if match[3] else None
    if stride == 0:
        raise StepSelectionError(f"--steps term {term!r}: the stride must be positive")
    in_range = {s for s in available if start <= s <= stop}
    return in_range if stride is None else {s for s in in_range if (s - start) % stride == 0}


def _describe(steps: list[int]) -> str:
    if not steps:
        return "none yet"
    if len(steps) <= 8:
        return f"{len(steps)}: {steps}"
    return f"{len(steps)}: {steps[:4]} ... {steps[-3:]}"
