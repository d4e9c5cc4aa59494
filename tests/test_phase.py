"""Phase-change detection on synthetic series whose change points are known by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxinduct.results.phase import (
    PHASE_METRICS,
    Signal,
    detect_phase_change,
    fit_change,
    head_formations,
    update_phase_change,
)
from jaxinduct.results.store import CheckpointScores, ResultStore

# The quickstart's save schedule: dense early, every 20 steps to 800, then every 100.
STEPS = np.array([0, 1, 2, 4, 8, 16, *range(20, 801, 20), 900, 1000, 1100, 1200])
PREFIX = Signal("max_prefix_matching", +1.0, 0.1, reaches_verdict=True)  # default verdict threshold 0.4


def step_series(at: int, before: float, after: float, steps: np.ndarray = STEPS) -> np.ndarray:
    return np.where(steps >= at, after, before).astype(float)


def sigmoid_series(steps: np.ndarray, mid: float, width: float, low: float, high: float) -> np.ndarray:
    """low -> high along a logistic in log(1 + step), centred on step ``mid``."""
    x = np.log1p(steps.astype(float))
    return low + (high - low) / (1.0 + np.exp(-(x - math.log1p(mid)) / width))


def step_where(share: float, mid: float, width: float) -> float:
    """The step at which that logistic has covered ``share`` of its rise (its inverse)."""
    return math.expm1(math.log1p(mid) + width * math.log(share / (1.0 - share)))


# --- one signal ------------------------------------------------------------------------------


def test_a_clean_step_is_located_between_the_two_checkpoints_around_it():
    change = fit_change(STEPS, step_series(420, 0.03, 0.75), PREFIX)
    assert change is not None
    # The only exact fit: flat to 400 (the last low checkpoint), flat from 420 (the first high).
    assert (change.start, change.end) == (400, 420)
    assert change.before == pytest.approx(0.03, abs=1e-9) and change.after == pytest.approx(0.75, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_sigmoid_is_located_around_its_rise(seed):
    rng = np.random.default_rng(seed)
    mid, width = 450.0, 0.12
    values = sigmoid_series(STEPS, mid, width, 0.03, 0.75) + rng.normal(0, 0.03, len(STEPS))
    change = fit_change(STEPS, values, PREFIX)
    assert change is not None
    crossing = step_where((0.5 - 0.03) / 0.72, mid, width)  # where the clean curve passes 0.5
    assert change.start <= crossing <= change.end
    # Not a vague answer either: inside the band where the curve does 2% to 98% of its rise
    # (widened to the neighbouring checkpoints, since both ends are checkpoint steps).
    low, high = step_where(0.02, mid, width), step_where(0.98, mid, width)
    assert change.start >= STEPS[STEPS <= low][-1] and change.end <= STEPS[STEPS >= high][0]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(np.full(len(STEPS), 0.03), id="constant"),
        pytest.param(0.03 + np.random.default_rng(0).normal(0, 0.01, len(STEPS)), id="noise"),
        pytest.param(0.03 + np.random.default_rng(1).normal(0, 0.05, len(STEPS)), id="loud-noise"),
        pytest.param(np.linspace(0.03, 0.09, len(STEPS)), id="slow-drift"),  # below the minimum jump
        pytest.param(step_series(420, 0.75, 0.03), id="falling"),  # heads un-forming is no formation
        pytest.param(step_series(420, 0.03, 0.30), id="below-verdict"),  # rises, but never to 0.4
        pytest.param(np.r_[np.full(len(STEPS) - 1, 0.03), 0.9], id="last-point-outlier"),
    ],
)
def test_series_without_a_phase_change_report_none(values):
    assert fit_change(STEPS, values, PREFIX) is None


def test_too_few_checkpoints_are_not_judged():
    steps = np.array([0, 100, 200, 300, 400])
    assert fit_change(steps, np.array([0.03, 0.03, 0.8, 0.8, 0.8]), PREFIX) is None


def test_nan_points_are_skipped():
    values = step_series(420, 0.03, 0.75)
    values[[3, 10, 30]] = np.nan
    change = fit_change(STEPS, values, PREFIX)
    assert change is not None and (change.start, change.end) == (400, 420)


def test_losses_are_read_falling():
    loss = step_series(420, 4.0, 1.0)
    change = fit_change(STEPS, loss, Signal("induction_loss", -1.0, 0.05))
    assert change is not None and (change.start, change.end) == (400, 420)
    assert change.before == pytest.approx(4.0) and change.after == pytest.approx(1.0)
    assert fit_change(STEPS, step_series(420, 1.0, 4.0), Signal("induction_loss", -1.0, 0.05)) is None


# --- several heads, several signals ----------------------------------------------------------------


def two_heads_grid(seed: int = 0) -> np.ndarray:
    """[step, layer, head] of a 2 x 2 model: L1H0 forms around step 150, L1H1 around 700."""
    rng = np.random.default_rng(seed)
    grid = 0.03 + rng.normal(0, 0.01, (len(STEPS), 2, 2))
    grid[:, 1, 0] = sigmoid_series(STEPS, 150, 0.08, 0.03, 0.70) + rng.normal(0, 0.01, len(STEPS))
    grid[:, 1, 1] = sigmoid_series(STEPS, 700, 0.04, 0.03, 0.85) + rng.normal(0, 0.01, len(STEPS))
    return grid


def test_two_heads_forming_at_different_times_each_get_their_own_interval():
    found = head_formations(STEPS, two_heads_grid())
    assert set(found) == {(1, 0), (1, 1)}
    first, second = found[(1, 0)], found[(1, 1)]
    assert first.start <= 150 <= first.end and second.start <= 700 <= second.end
    assert first.end < second.start


def test_two_heads_forming_at_different_times_the_run_interval_is_the_big_jump():
    # Max over heads: 0.03 -> 0.70 around 150 (the large change), then 0.70 -> 0.85 around 700.
    grid = two_heads_grid()
    best = grid.reshape(len(STEPS), -1).max(1)
    found = detect_phase_change(STEPS, {"max_prefix_matching": best})
    assert found is not None
    assert found.start <= 150 <= found.end < 600


def test_signals_that_agree_widen_the_interval_and_one_at_another_time_does_not():
    series = {
        "max_prefix_matching": step_series(420, 0.03, 0.75),
        "icl_score": step_series(440, -0.1, -2.0),  # overlaps: joins
        "induction_loss": step_series(40, 4.5, 4.1),  # an early unigram drop: not the phase change
    }
    found = detect_phase_change(STEPS, series)
    assert found is not None
    assert (found.start, found.end, found.anchor) == (400, 440, "max_prefix_matching")
    assert {c.signal for c in found.changes} == {"max_prefix_matching", "icl_score", "induction_loss"}
    assert found.describe() == "steps 400-440 (from max_prefix_matching, icl_score)"


def test_without_prefix_matching_the_icl_score_locates_it():
    found = detect_phase_change(STEPS, {"icl_score": step_series(440, -0.1, -2.0)})
    assert found is not None and (found.start, found.end, found.anchor) == (420, 440, "icl_score")


def test_flat_signals_give_no_phase_change():
    rng = np.random.default_rng(3)
    series = {
        "max_prefix_matching": 0.03 + rng.normal(0, 0.005, len(STEPS)),
        "icl_score": -0.1 + rng.normal(0, 0.02, len(STEPS)),
        "induction_loss": 4.1 + rng.normal(0, 0.02, len(STEPS)),
    }
    assert detect_phase_change(STEPS, series) is None


# --- recorded in the store -------------------------------------------------------------------------


def store_with(tmp_path, prefix_by_step: dict[int, float]) -> ResultStore:
    store = ResultStore.open(tmp_path / "s.sqlite")
    store.ensure_run("r", "/src", json.dumps({}))
    store.record_probe_config("h", json.dumps({}))
    batch = [
        CheckpointScores(step=s, head={"prefix_matching": np.array([[0.02, v]])}, model={"icl_score": -v})
        for s, v in prefix_by_step.items()
    ]
    store.write_batch("r", "h", batch)
    return store


def test_update_records_the_interval_at_the_last_step_and_clears_it_when_gone(tmp_path):
    rising = {int(s): (0.75 if s >= 420 else 0.03) for s in STEPS}
    with store_with(tmp_path, rising) as store:
        for _ in range(2):  # idempotent: a second detection replaces, never duplicates
            found = update_phase_change(store, "r")
            assert found is not None and (found.start, found.end) == (400, 420)
            rows = store.model_scores("r", step=1200)
            assert {(str(m), float(v)) for m, v in zip(rows["metric"], rows["value"]) if m in PHASE_METRICS} == {
                ("phase_change_start", 400.0),
                ("phase_change_end", 420.0),
            }
        # Rescanned with other numbers (the head never forms): the stale interval goes.
        store.write_batch("r", "h", [CheckpointScores(step=int(s), head={"prefix_matching": np.array([[0.02, 0.03]])},
                                                      model={"icl_score": -0.03}) for s in STEPS])  # fmt: skip
        assert update_phase_change(store, "r") is None
        for metric in PHASE_METRICS:
            assert len(store.model_scores("r", metric)) == 0
