"""Phase-change detection: the step interval in which a run's induction heads form.

Olsson et al. see the phase change as one abrupt step, visible at the same moment in the
best head's prefix-matching score, in the in-context-learning score and in the loss on
repeated tokens. jaxinduct locates it per signal with a *ramp change-point* model and then
joins the signals that agree:

1. Each signal is a series over the done steps, oriented so that forming induction heads
   makes it go up (max prefix_matching over heads; minus icl_score; minus induction_loss).
2. The ramp model says: level ``a`` up to step ``s1``, level ``b`` from step ``s2`` on,
   linear in log(1 + step) between them (training schedules and Olsson's figures are
   log-scaled). ``s1`` and ``s2`` range over the checkpoint steps, and for each pair the
   levels have a closed-form least-squares fit, so the search is exhaustive (O(n^2) small
   fits, a fraction of a second for a few hundred checkpoints), with no starting point to
   tune and no local optimum to fall into.
3. A change is reported only when the data demand it: the ramp must beat a constant by
   at least ``min_bic_gain`` in the Bayesian information criterion (10 is "very strong"
   evidence on Kass and Raftery's scale; BIC charges for the three extra parameters, so
   noise alone rarely pays for a ramp), it must rise (a fall is not a formation), by at
   least the signal's ``min_jump`` and ``noise_multiple`` times its noise (the robust
   standard deviation of successive differences, which a single step barely moves), with
   at least two checkpoints on each side, nearly all of them nearer their own side's
   level than the other's (one outlier at the end is not a new level). For
   prefix matching the new level must also reach the head verdict threshold, so that a
   drift among heads that never become induction heads is not a phase change.
4. The run's interval is that of its anchor signal (max prefix_matching when it has a
   change, else icl_score, else induction_loss), widened to cover the other signals'
   intervals that overlap it. Signals that change at another time (the loss falls early
   while unigram statistics are learned) do not move it.

When a single head has formed is simpler than when the run's phase change happened:
``formation_steps`` (docs/scores.md, "Formation"), the first step from which the head's
prefix_matching stays above the verdict threshold.

Pure numpy; ``update_phase_change`` reads a run from the store and writes the result as
model-level rows ``phase_change_start`` / ``phase_change_end`` (absent when none is found).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from jaxtyping import Float

from jaxinduct.results.identity import VerdictThresholds
from jaxinduct.results.store import ResultStore

PHASE_METRICS = ("phase_change_start", "phase_change_end")
FORMATION_METRIC = "prefix_matching"  # the score whose series says when a head formed


@dataclass(frozen=True)
class Signal:
    """How one series is read: its orientation and the smallest change that counts."""

    name: str
    direction: float  # +1: formation raises the series; -1: it lowers it
    min_jump: float  # in the series' own units
    reaches_verdict: bool = False  # the new level must reach DetectionConfig.formed_prefix


# Orientation and minimum jumps: prefix matching is a share of attention (0.1 is ~3x the
# random-model baseline of ~0.03); the losses are in nats (0.05 nats is well above their
# checkpoint-to-checkpoint noise on the probe sets used here).
SIGNALS: tuple[Signal, ...] = (
    Signal("max_prefix_matching", +1.0, 0.1, reaches_verdict=True),
    Signal("icl_score", -1.0, 0.05),
    Signal("induction_loss", -1.0, 0.05),
)


@dataclass(frozen=True)
class DetectionConfig:
    min_bic_gain: float = 10.0
    noise_multiple: float = 4.0
    min_points: int = 6  # fewer checkpoints than this: no detection attempted
    formed_prefix: float = VerdictThresholds.prefix_matching  # max prefix_matching must reach the verdict's threshold
    stray_share: float = 0.1  # at most this share of a flat side's checkpoints may sit nearer the other level


@dataclass(frozen=True)
class Change:
    """One signal's fitted ramp: level ``before`` until ``start``, ``after`` from ``end`` on."""

    signal: str
    start: int
    end: int
    before: float  # in the series' own units
    after: float
    bic_gain: float


@dataclass(frozen=True)
class PhaseChange:
    start: int
    end: int
    anchor: str  # the signal that located it
    changes: tuple[Change, ...]  # every signal with a change, the anchor first

    def describe(self) -> str:
        joined = [c.signal for c in self.changes if c.start <= self.end and c.end >= self.start]
        return f"steps {self.start}-{self.end} (from {', '.join(joined)})"


def _log_steps(steps: np.ndarray) -> np.ndarray:
    return np.log1p(np.asarray(steps, dtype=np.float64))


def _robust_noise(y: np.ndarray) -> float:
    """Noise sd from successive differences (MAD, scaled for a Gaussian): a step moves one difference."""
    d = np.diff(y)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0)) if len(d) else 0.0


def fit_ramp(x: np.ndarray, y: np.ndarray) -> tuple[int, int, float, float, float]:
    """Least-squares flat-ramp-flat fit over every pair of breakpoints (i < j) among ``x``.

    Returns (i, j, a, b, sse). Breakpoints leave at least two points on each flat side.
    """
    n = len(x)
    best = (0, 0, math.nan, math.nan, math.inf)
    sum_y2 = float(y @ y)
    for i in range(1, n - 2):
        js = np.arange(i + 1, n - 1)
        # w[j, k]: the ramp's weight of the "after" level at point k for breakpoints (i, j).
        w = np.clip((x[None, :] - x[i]) / (x[js, None] - x[i]), 0.0, 1.0)
        u = 1.0 - w
        s00, s01, s11 = (u * u).sum(1), (u * w).sum(1), (w * w).sum(1)
        sy0, sy1 = u @ y, w @ y
        det = s00 * s11 - s01 * s01  # > 0: points 0..i have w = 0, points j.. have w = 1
        a = (s11 * sy0 - s01 * sy1) / det
        b = (s00 * sy1 - s01 * sy0) / det
        sse = sum_y2 - (a * sy0 + b * sy1)
        k = int(np.argmin(sse))
        if sse[k] < best[4]:
            best = (i, int(js[k]), float(a[k]), float(b[k]), float(sse[k]))
    return best


def fit_change(
    steps: Sequence[int] | np.ndarray,
    values: Float[np.ndarray, " n"],
    signal: Signal,
    config: DetectionConfig = DetectionConfig(),
) -> Change | None:
    """The ramp change of one series, or None when the data do not show one (module doc, 2-3)."""
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    steps, y = steps[keep], values[keep] * signal.direction
    n = len(y)
    if n < max(config.min_points, 5):
        return None
    order = np.argsort(steps)
    steps, y = steps[order], y[order]
    x = _log_steps(steps)
    i, j, a, b, sse_ramp = fit_ramp(x, y)
    sse_flat = float(((y - y.mean()) ** 2).sum())
    # Variance floor: a noiseless series (synthetic, or a head that never moves) has SSE 0.
    floor = max(1e-12, (1e-6 * float(np.abs(y).max())) ** 2)
    gain = n * math.log(sse_flat / n + floor) + 1 * math.log(n) - (n * math.log(max(sse_ramp, 0.0) / n + floor) + 4 * math.log(n))
    jump = b - a
    if gain < config.min_bic_gain or jump < signal.min_jump or jump < config.noise_multiple * _robust_noise(y):
        return None
    if signal.reaches_verdict and b < config.formed_prefix:
        return None
    # Each side must sit at its own level: a checkpoint nearer the other side's level is an
    # outlier; a few are tolerated, but a "level" made of one stray point is not a level.
    strays = np.r_[np.abs(y[: i + 1] - a) >= np.abs(y[: i + 1] - b), np.abs(y[j:] - b) >= np.abs(y[j:] - a)]
    if strays[: i + 1].sum() > config.stray_share * (i + 1) or strays[i + 1 :].sum() > config.stray_share * (n - j):
        return None
    d = signal.direction
    return Change(signal.name, int(steps[i]), int(steps[j]), a * d, b * d, gain)


def detect_phase_change(
    steps: Sequence[int] | np.ndarray,
    series: Mapping[str, Float[np.ndarray, " n"]],
    config: DetectionConfig = DetectionConfig(),
    signals: Sequence[Signal] = SIGNALS,
) -> PhaseChange | None:
    """The run's phase change from its signals (module doc, 4); None when none shows one.

    ``series`` maps signal names (``SIGNALS``) to values at ``steps`` (NaN where not
    computed); names it lacks are skipped.
    """
    changes = []
    for signal in signals:
        if signal.name in series:
            change = fit_change(steps, series[signal.name], signal, config)
            if change is not None:
                changes.append(change)
    if not changes:
        return None
    anchor = changes[0]
    start, end = anchor.start, anchor.end
    for other in changes[1:]:
        if other.start <= anchor.end and other.end >= anchor.start:
            start, end = min(start, other.start), max(end, other.end)
    return PhaseChange(start, end, anchor.signal, tuple(changes))


def head_formations(
    steps: Sequence[int] | np.ndarray,
    prefix_matching: Float[np.ndarray, "n layer head"],
    config: DetectionConfig = DetectionConfig(),
) -> dict[tuple[int, int], Change]:
    """Each head's own fitted ramp: a rise of its prefix_matching to the verdict threshold.

    An analysis of how abruptly each head formed; what the readers call "formed" is
    `formation_steps`.
    """
    signal = replace(SIGNALS[0], name="prefix_matching")  # one head's, not the maximum
    # A head that never reaches the threshold cannot have formed: skip its (costlier) fit.
    reached = np.nan_to_num(prefix_matching, nan=-np.inf).max(axis=0, initial=-np.inf) > config.formed_prefix
    found = {}
    for layer, head in zip(*np.nonzero(reached)):
        layer, head = int(layer), int(head)
        change = fit_change(steps, prefix_matching[:, layer, head], signal, config)
        if change is not None:
            found[(layer, head)] = change
    return found


# --- formation: when a head has formed -----------------------------------------------------------


def formation_steps(
    steps: Sequence[int] | np.ndarray, prefix_matching: Float[np.ndarray, "n layer head"], threshold: float
) -> np.ndarray:
    """[layer, head]: the step each head formed at, -1 where it has not (docs/scores.md, "Formation").

    A head has formed at step S when S is the first done step from which its prefix_matching
    stays above ``threshold`` (strict >; NaN never counts as above) at every later done step.
    A head that is not above it at the last step has not formed. Unlike `head_formations`
    (a fitted ramp, which needs a clear rise), this is a plain reading of the series, the one
    every reader shows.
    """
    steps = np.asarray(steps, dtype=np.int64)
    if len(steps) == 0:
        return np.full(prefix_matching.shape[1:], -1, dtype=np.int64)
    above = np.greater(prefix_matching, threshold)  # NaN compares False: never above
    # stays[i]: above at step i and at every later step (a cumulative AND from the end).
    stays = np.flip(np.logical_and.accumulate(np.flip(above, axis=0), axis=0), axis=0)
    return np.where(stays[-1], steps[np.argmax(stays, axis=0)], -1)


# --- reading a run from the store, and recording the result -------------------------------------


@dataclass(frozen=True)
class RunSeries:
    steps: np.ndarray  # done steps, ascending
    prefix_matching: np.ndarray  # [n, layer, head], NaN where not stored
    series: dict[str, np.ndarray]  # SIGNALS names -> [n], NaN where not stored


MODEL_SIGNALS = tuple(s.name for s in SIGNALS[1:])  # the model-level scores among SIGNALS (after max prefix_matching)


def signal_series(prefix_matching: np.ndarray, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The detection signals (``SIGNALS`` names -> [n]) of a run's prefix_matching grid
    [n, layer, head] and model-score series (name -> [n]); those without any value are left out."""
    series: dict[str, np.ndarray] = {}
    if prefix_matching.size and not np.isnan(prefix_matching).all():
        flat = prefix_matching.reshape(len(prefix_matching), -1)
        defined = ~np.isnan(flat).all(axis=1)
        best = np.full(len(flat), np.nan)
        best[defined] = np.nanmax(flat[defined], axis=1)
        series["max_prefix_matching"] = best
    for metric in MODEL_SIGNALS:
        values = model.get(metric)
        if values is not None and not np.isnan(values).all():
            series[metric] = values
    return series


def run_series(store: ResultStore, run: str, probe_hash: str | None = None) -> RunSeries:
    """The detection signals of ``run`` at ``probe_hash`` (its latest by default), read from the store."""
    steps, grid = store.head_score_grid(run, FORMATION_METRIC, probe_hash=probe_hash)
    _, model = store.model_score_series(run, MODEL_SIGNALS, probe_hash=probe_hash)
    return RunSeries(steps, grid, signal_series(grid, model))


def update_phase_change(
    store: ResultStore, run: str, probe_hash: str | None = None, config: DetectionConfig = DetectionConfig()
) -> PhaseChange | None:
    """Detect ``run``'s phase change and record it at the run's last done step (or clear it)."""
    probe_hash = store.resolve_probe_hash(run, probe_hash)
    if probe_hash is None:
        return None
    data = run_series(store, run, probe_hash)
    found = detect_phase_change(data.steps, data.series, config) if len(data.steps) else None
    values = {} if found is None else {PHASE_METRICS[0]: float(found.start), PHASE_METRICS[1]: float(found.end)}
    last = int(data.steps[-1]) if len(data.steps) else 0
    store.replace_run_results(run, probe_hash, last, PHASE_METRICS, values)
    return found
