"""One run of a results store as every reader sees it.

``load_run_view`` reads a run once, at the probe hash every reader uses (that of its most
recently written done checkpoint, ``ResultStore.resolve_probe_hash``; a run with failed
checkpoints only is read at its most recent hash, so that its failures can be shown), and
returns a ``RunView`` holding everything `show` and the report present: the checkpoint
records, every head score as a [step, layer, head] grid, every model score as a series,
the curves and pair scores the report's figures draw, the run's phase change (detected
afresh from the stored scores, so it is current for a store scanned by any version), and
when each head formed. What the readers print and draw is then a pure function of the
view: nothing reads the store while drawing, and `show` and the report cannot disagree.

Pure Python and numpy, no JAX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxinduct.results.identity import ProbeIdentity, VerdictThresholds, parse_identity
from jaxinduct.results.phase import (
    FORMATION_METRIC,
    DetectionConfig,
    PhaseChange,
    detect_phase_change,
    formation_steps,
    signal_series,
)
from jaxinduct.results.store import CheckpointRecord, CurveRecord, ResultStore, RunRecord, StoreError

LOSS_CURVE = "per_token_loss"  # the model-level curve the report draws
HEAD_CURVES = ("ablation_per_token_loss_delta",)  # per-head curves the report projects on the phase change
PAIR_KINDS = ("k_composition",)  # pair scores the report draws at the key steps


@dataclass(frozen=True)
class RunView:
    """A run at one probe hash, read once (module doc). Arrays are indexed by ``steps``."""

    name: str
    source: str
    store_path: Path  # the store it was read from, for messages
    probe_hash: str | None  # the hash read; None: nothing scanned yet
    other_hashes: tuple[str, ...]  # the run's other probe hashes, least recently written first; not read
    identity: ProbeIdentity  # the probe record at probe_hash (defaults where the store lacks one)
    records: tuple[CheckpointRecord, ...]  # every checkpoint at probe_hash, done and failed, by step
    steps: np.ndarray  # done steps, ascending [n]
    grids: Mapping[str, np.ndarray]  # every stored head score -> [n, layer, head], NaN where not stored (or not read: HeadScoreSlice)
    model: Mapping[str, np.ndarray]  # every stored model score -> [n], NaN where not stored
    loss_curves: Mapping[int, np.ndarray]  # step -> per_token_loss by context index (model-level)
    head_curves: Mapping[str, np.ndarray]  # HEAD_CURVES name -> float32 [n, layer, head, seq], NaN where not stored
    phase: PhaseChange | None  # the run's phase change, detected afresh; None when none shows
    key_steps: tuple[tuple[str, int], ...]  # (label, step): first, phase change (or middle), last
    pair_grids: Mapping[str, np.ndarray]  # PAIR_KINDS kind -> [key step, src_layer, src_head, dst_layer, dst_head]
    formed: np.ndarray  # [layer, head] step each head formed at (`formation_steps`), -1 where it has not

    @property
    def done_steps(self) -> list[int]:
        return [int(step) for step in self.steps]

    @property
    def failed(self) -> list[CheckpointRecord]:
        return [r for r in self.records if r.status == "failed"]

    def record(self, step: int) -> CheckpointRecord | None:
        return next((r for r in self.records if r.step == step), None)

    @property
    def thresholds(self) -> VerdictThresholds:
        return self.identity.thresholds

    @property
    def shape(self) -> tuple[int, int]:
        """(layers, heads): the extents of the run's head scores; (0, 0) without any."""
        return self.formed.shape  # type: ignore[return-value]

    def index(self, step: int) -> int:
        """Position of a done step in ``steps``."""
        return int(np.searchsorted(self.steps, step))

    def grid(self, metric: str) -> np.ndarray:
        """[n, layer, head] of a head score, all NaN when the run has none of it."""
        found = self.grids.get(metric)
        return found if found is not None else np.full((len(self.steps), *self.shape), np.nan)

    def tokens_by_step(self) -> dict[int, int]:
        return {r.step: r.tokens_seen for r in self.records if r.status == "done" and r.tokens_seen is not None}


def key_steps(steps: np.ndarray, phase: PhaseChange | None) -> tuple[tuple[str, int], ...]:
    """(label, step): the first step, the phase change (or the middle of the run), the last; each once."""
    if len(steps) == 0:
        return ()
    if phase is not None:
        # The done step nearest the interval's middle in log(1 + step), the figures' scale.
        middle = math.expm1((math.log1p(phase.start) + math.log1p(phase.end)) / 2)
        inside = steps[(steps >= phase.start) & (steps <= phase.end)]
        distance = np.abs(inside - middle)
        # On a tie (a two-checkpoint interval) the later step: the heads as they have formed.
        mid_step, mid_label = int(inside[np.flatnonzero(distance == distance.min())[-1]]), "phase change"
    else:
        mid_step, mid_label = int(steps[len(steps) // 2]), "middle (no phase change)"
    chosen = [("first", int(steps[0])), (mid_label, mid_step), ("last", int(steps[-1]))]
    unique: list[tuple[str, int]] = []
    for label, step in chosen:
        if step not in [s for _, s in unique]:
            unique.append((label, step))
    return tuple(unique)


def _head_curve_grid(curves: Sequence[CurveRecord], steps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    per_head = [c for c in curves if c.layer >= 0]
    length = max((len(c.values) for c in per_head), default=0)
    grid = np.full((len(steps), *shape, length), np.nan, np.float32)
    for c in per_head:
        if c.layer < shape[0] and c.head < shape[1]:  # the view's heads are those with head scores
            grid[np.searchsorted(steps, c.step), c.layer, c.head, : len(c.values)] = c.values
    return grid


@dataclass(frozen=True)
class HeadScoreSlice:
    """The head scores a reader needs when it needs not all: ``whole`` at every done step
    (FORMATION_METRIC is always among them: formation and the phase change read it), every
    other head score at ``step`` alone (None: the last done step). A run of 154
    Pythia-1.4B-shaped checkpoints has 887k head score rows; `show` reads 125k of them."""

    whole: tuple[str, ...] = ()
    step: int | None = None


def load_run_view(
    store: ResultStore, run: str, source: str, *, figure_data: bool = True, head_slice: HeadScoreSlice | None = None
) -> RunView:
    """``run`` of ``store`` (``source``: its recorded source), read once (module doc).

    figure_data: also read the per-head curves and pair scores only the report's figures
    draw (at a large model's size, by far the biggest part of a run); without it they are
    empty, as `show` needs.
    head_slice: read only these head scores (the others NaN in ``grids``); None: every one.
    """
    hashes = store.probe_hashes(run)
    probe_hash = store.resolve_probe_hash(run) or (hashes[-1] if hashes else None)
    identity = parse_identity(None if probe_hash is None else store.probe_config(probe_hash))
    others = tuple(h for h in hashes if h != probe_hash)
    # probe_hash None: the run has no checkpoint at all, and every read below finds nothing.
    if head_slice is None or probe_hash is None:
        steps, grids = store.head_score_grids(run, probe_hash=probe_hash)
    else:
        done = store.done_steps(run, probe_hash)
        at = head_slice.step if head_slice.step is not None else (max(done) if done else None)
        whole = tuple(dict.fromkeys((FORMATION_METRIC, *head_slice.whole)))
        steps, grids = store.head_score_grids(run, probe_hash=probe_hash, steps=[] if at is None else [at], whole=whole)
    shape = next(iter(grids.values())).shape[1:] if grids else (0, 0)
    _, model = store.model_score_series(run, probe_hash=probe_hash)
    loss = store.curves(run, LOSS_CURVE, probe_hash=probe_hash)
    head_curves = {
        m: _head_curve_grid(store.curves(run, m, probe_hash=probe_hash), steps, shape)
        for m in (HEAD_CURVES if figure_data else ())
    }
    prefix = grids.get(FORMATION_METRIC, np.full((len(steps), *shape), np.nan))
    threshold = identity.thresholds.prefix_matching
    phase = detect_phase_change(steps, signal_series(prefix, model), DetectionConfig(formed_prefix=threshold))
    keys = key_steps(steps, phase)
    pair_grids = {}
    for kind in PAIR_KINDS if figure_data else ():
        grid = np.full((len(keys), *shape, *shape), np.nan)
        for i, (_, step) in enumerate(keys):
            rows = store.pair_scores(run, kind, step, probe_hash=probe_hash)
            grid[i, rows["src_layer"], rows["src_head"], rows["dst_layer"], rows["dst_head"]] = rows["value"]
        pair_grids[kind] = grid
    return RunView(
        name=run,
        source=source,
        store_path=store.path,
        probe_hash=probe_hash,
        other_hashes=others,
        identity=identity,
        records=tuple(store.steps(run, probe_hash)),
        steps=steps,
        grids=grids,
        model=model,
        loss_curves={c.step: c.values for c in loss if c.layer == -1},
        head_curves=head_curves,
        phase=phase,
        key_steps=keys,
        pair_grids=pair_grids,
        formed=formation_steps(steps, prefix, threshold),
    )


def select_runs(store: ResultStore, run: str | None, command: str) -> list[RunRecord]:
    """``run``'s record, or every run's if None; StoreError naming the fix for an empty store or
    an unknown run (``command``: the verb the messages use, "show" or "report")."""
    runs = store.runs()
    if not runs:
        raise StoreError(
            f"{store.path}: the results store is empty (no runs yet). "
            f"Fix: fill it with `jaxinduct scan SOURCE --store {store.path}`, then {command} it."
        )
    if run is None:
        return runs
    for r in runs:
        if r.name == run:
            return [r]
    known = ", ".join(repr(r.name) for r in runs)
    raise StoreError(
        f"{store.path}: no run {run!r} in the results store; it has: {known}. "
        f"Fix: pass one of them with --run, or leave --run out to {command} every run."
    )
