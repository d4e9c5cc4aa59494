"""The run view every reader builds on, and the one definition of "formed" they share.

Stores built by hand; every expected value is read off the data written below.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxinduct.report.page import write_report
from jaxinduct.report.show import render_show
from jaxinduct.results.phase import formation_steps
from jaxinduct.results.run_view import HeadScoreSlice, load_run_view
from jaxinduct.results.store import CheckpointScores, ResultStore

NAN = float("nan")
REPO = Path(__file__).resolve().parents[1]
RUN, HASH, OLD_HASH = "toy", "h-new", "h-old"
STEPS = (0, 10, 20, 30, 40)

# prefix_matching of a 2 x 2 model per step (rows: STEPS; columns: L0H0, L0H1, L1H0, L1H1).
PREFIX = np.array([
    [0.10, 0.50, 0.00, 0.00],
    [0.10, 0.30, 0.45, NAN],
    [0.10, 0.50, 0.50, 0.70],
    [0.10, 0.70, 0.55, 0.80],
    [0.10, 0.90, 0.35, 0.80],
])  # fmt: skip


# --- the definition ---------------------------------------------------------------------------------


def test_formed_is_the_first_step_from_which_the_score_stays_above():
    grid = PREFIX.reshape(5, 2, 2)
    # L0H0 never passes; L0H1 passes at 0, dips at 10, stays from 20; L1H0 falls back at the last
    # step, so it has not formed; L1H1 is NaN at 10 (never above) and stays above from 20.
    np.testing.assert_array_equal(formation_steps(STEPS, grid, 0.4), [[-1, 20], [-1, 20]])
    # At 0.6: L0H1 from 30, L1H1 from 20, the others never.
    np.testing.assert_array_equal(formation_steps(STEPS, grid, 0.6), [[-1, 30], [-1, 20]])
    # Strictly above: a score equal to the threshold is not above it (L0H1 is 0.5 at 0 and 20).
    np.testing.assert_array_equal(formation_steps(STEPS, grid, 0.5), [[-1, 30], [-1, 20]])


def test_formed_at_the_edges():
    assert formation_steps([], np.zeros((0, 1, 2)), 0.4).tolist() == [[-1, -1]]
    one = np.array([[[0.9, 0.1]]])
    assert formation_steps([5], one, 0.4).tolist() == [[5, -1]]  # one checkpoint: formed there, or not
    all_nan = np.full((3, 1, 1), NAN)
    assert formation_steps([0, 1, 2], all_nan, 0.4).tolist() == [[-1]]


# --- a store read into a view -------------------------------------------------------------------------


def write_store(path: Path, thresholds: dict[str, float] | None = None) -> Path:
    probes = {} if thresholds is None else {"probes": {"thresholds": thresholds}}
    with ResultStore.open(path) as store:
        store.ensure_run(RUN, "/ckpts/toy", json.dumps({}))
        store.record_probe_config(OLD_HASH, json.dumps({}))
        store.record_probe_config(HASH, json.dumps(probes))
        store.write_batch(RUN, OLD_HASH, [CheckpointScores(step=0, head={"prefix_matching": np.ones((2, 2))})])
        batch = []
        for i, step in enumerate(STEPS):
            pair = np.full((2, 2, 2, 2), NAN)
            curve: dict[str, np.ndarray] = {}
            if step == 10:
                curve["per_token_loss"] = np.array([NAN, 2.0, 1.0])
            if step == 20:
                pair[0, 1, 1, 0] = 0.25  # k_composition L0H1 -> L1H0
            if step == 40:
                head_curve = np.full((2, 2, 3), NAN)
                head_curve[1, 1] = [0.0, 0.5, 1.0]
                curve["ablation_per_token_loss_delta"] = head_curve
            model = {"icl_score": -1.0 if step == 40 else (-0.5 if step == 0 else NAN)}
            batch.append(CheckpointScores(step=step, tokens_seen=100 * step, head={"prefix_matching": PREFIX[i].reshape(2, 2)},
                                          pair={"k_composition": pair}, model=model, curve=curve))  # fmt: skip
        store.write_batch(RUN, HASH, batch)
        store.mark_failed(RUN, HASH, 50, "OSError: gone")
    return path


def test_the_view_holds_the_run_at_its_latest_probe_hash(tmp_path):
    with ResultStore.open(write_store(tmp_path / "s.sqlite"), readonly=True) as store:
        view = load_run_view(store, RUN, "/ckpts/toy")
    assert (view.name, view.source, view.probe_hash, view.other_hashes) == (RUN, "/ckpts/toy", HASH, (OLD_HASH,))
    assert view.done_steps == list(STEPS) and [r.step for r in view.failed] == [50]
    assert view.record(20).tokens_seen == 2000 and view.record(99) is None
    assert view.thresholds.prefix_matching == 0.4  # the record has no thresholds: the default
    assert view.shape == (2, 2) and set(view.grids) == {"prefix_matching"}
    np.testing.assert_array_equal(view.grids["prefix_matching"], PREFIX.reshape(5, 2, 2))
    assert np.isnan(view.grid("copying")).all() and view.grid("copying").shape == (5, 2, 2)
    np.testing.assert_array_equal(view.model["icl_score"], [-0.5, NAN, NAN, NAN, -1.0])
    assert list(view.loss_curves) == [10]
    np.testing.assert_array_equal(view.loss_curves[10], [NAN, 2.0, 1.0])
    curves = view.head_curves["ablation_per_token_loss_delta"]
    assert curves.shape == (5, 2, 2, 3) and curves.dtype == np.float32
    np.testing.assert_array_equal(curves[4, 1, 1], [0.0, 0.5, 1.0])
    assert np.isnan(np.delete(curves.reshape(20, 3), 4 * 4 + 3, axis=0)).all()  # only (step 40, L1H1) stored
    # Five checkpoints are too few to judge a phase change: the key steps are first, middle, last.
    assert view.phase is None
    assert view.key_steps == (("first", 0), ("middle (no phase change)", 20), ("last", 40))
    pairs = view.pair_grids["k_composition"]
    assert pairs.shape == (3, 2, 2, 2, 2)
    assert pairs[1, 0, 1, 1, 0] == 0.25 and np.isnan(pairs).sum() == pairs.size - 1
    np.testing.assert_array_equal(view.formed, [[-1, 20], [-1, 20]])


def test_a_run_with_failures_only_is_viewed_at_its_latest_hash(tmp_path):
    with ResultStore.open(tmp_path / "s.sqlite") as store:
        store.ensure_run("failing", "/src", json.dumps({}))
        store.record_probe_config("h", json.dumps({}))
        store.mark_failed("failing", "h", [3, 4], "ValueError: bad")
        view = load_run_view(store, "failing", "/src")
    assert view.probe_hash == "h" and view.done_steps == [] and [r.step for r in view.failed] == [3, 4]
    assert view.shape == (0, 0) and view.phase is None and view.key_steps == ()


@pytest.mark.parametrize(("thresholds", "formed"), [(None, {"L0H1": "20", "L1H1": "20"}),
                                                    ({"prefix_matching": 0.6}, {"L0H1": "30", "L1H1": "20"})])  # fmt: skip
def test_show_and_report_say_the_same_formed_step(tmp_path, thresholds, formed):
    """Both read the run's own verdict threshold; heads that have not formed get "-" / no row."""
    path = write_store(tmp_path / "s.sqlite", thresholds)
    with ResultStore.open(path, readonly=True) as store:
        text = render_show(store, width=120)
        report = write_report(store, tmp_path / "out")
    rows = {line.split()[1]: line.split()[3] for line in text.splitlines() if line[:1].isdigit()}
    assert rows == {**formed, "L1H0": "-", "L0H0": "-"}
    threshold = 0.4 if thresholds is None else 0.6
    assert f"formed = first step from which prefix_matching stays > {threshold:g}." in text  # no other column
    page = report.index.read_text(encoding="utf-8")
    for head, step in formed.items():  # the highlighted heads: those that formed (no verdicts stored)
        assert re.search(rf"{head}</td><td[^>]*>{step}</td>", page)
    assert "L1H0</td>" not in page and "L0H0</td>" not in page


def test_the_readers_of_results_import_no_jax():
    modules = "jaxinduct.results.run_view, jaxinduct.results.identity, jaxinduct.results.export"
    code = f"import sys, {modules}; assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')]"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_show_imports_no_jax(tmp_path):
    # The registry names its scores' functions instead of importing them: starting JAX costs
    # `show` most of a second, and show reads only names and titles.
    with ResultStore.open(tmp_path / "s.sqlite") as store:
        store.ensure_run(RUN, "/src", json.dumps({}))
        store.record_probe_config(HASH, json.dumps({}))
        store.write_batch(RUN, HASH, [CheckpointScores(step=1, head={"prefix_matching": [[0.5, 0.1]]})])
    code = (
        "import sys; from jaxinduct.report.show import render_show; from jaxinduct.results.store import ResultStore\n"
        f"store = ResultStore.open({str(tmp_path / 's.sqlite')!r}, readonly=True)\n"
        "assert 'L0H0' in render_show(store)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_slice_of_the_head_scores_reads_some_metrics_at_every_step_and_the_rest_at_one(tmp_path):
    with ResultStore.open(tmp_path / "s.sqlite") as store:
        store.ensure_run(RUN, "/src", json.dumps({}))
        store.record_probe_config(HASH, json.dumps({}))
        store.write_batch(RUN, HASH, [
            CheckpointScores(step=1, head={"a": [[0.1, 0.2]], "b": [[0.3, 0.4]], "c": [[0.5, NAN], [NAN, 0.6]]}),
            CheckpointScores(step=3, head={"a": [[0.7, 0.8]], "b": [[0.9, 1.0]], "c": [[1.1, 1.2]]}),
        ])  # fmt: skip
        steps, grids = store.head_score_grids(RUN, steps=[3], whole=["a"])
        assert steps.tolist() == [1, 3] and list(grids) == ["a", "b", "c"]
        # The extents are those of the rows read: layer 1 exists only at step 1, in c.
        np.testing.assert_array_equal(grids["a"], [[[0.1, 0.2]], [[0.7, 0.8]]])
        np.testing.assert_array_equal(grids["b"], [[[NAN, NAN]], [[0.9, 1.0]]])
        np.testing.assert_array_equal(grids["c"], [[[NAN, NAN]], [[1.1, 1.2]]])
        _, wide = store.head_score_grids(RUN, ["c", "a"], steps=[3], whole=["c"])
        assert list(wide) == ["c", "a"]
        np.testing.assert_array_equal(wide["c"], [[[0.5, NAN], [NAN, 0.6]], [[1.1, 1.2], [NAN, NAN]]])
        np.testing.assert_array_equal(wide["a"], [[[NAN, NAN], [NAN, NAN]], [[0.7, 0.8], [NAN, NAN]]])
        # The view built from a slice: formation reads prefix_matching at every step, absent here.
        view = load_run_view(store, RUN, "/src", figure_data=False, head_slice=HeadScoreSlice(whole=("b",)))
        np.testing.assert_array_equal(view.grid("b")[:, 0, 0], [0.3, 0.9])
        np.testing.assert_array_equal(view.grid("a")[:, 0, 0], [NAN, 0.7])  # the last done step only


def test_every_head_score_grid_in_one_read(tmp_path):
    with ResultStore.open(tmp_path / "s.sqlite") as store:
        store.ensure_run(RUN, "/src", json.dumps({}))
        store.record_probe_config(HASH, json.dumps({}))
        store.write_batch(RUN, HASH, [
            CheckpointScores(step=1, head={"b": [[0.5, NAN]], "a": [[NAN, NAN], [NAN, 0.25]]}),
            CheckpointScores(step=3, head={"a": [[1.0]]}),
        ])  # fmt: skip
        steps, grids = store.head_score_grids(RUN)
        assert steps.tolist() == [1, 3] and list(grids) == ["a", "b"]  # every metric, by name
        np.testing.assert_array_equal(grids["a"], [[[NAN, NAN], [NAN, 0.25]], [[1.0, NAN], [NAN, NAN]]])
        np.testing.assert_array_equal(grids["b"], [[[0.5, NAN], [NAN, NAN]], [[NAN, NAN], [NAN, NAN]]])
        _, asked = store.head_score_grids(RUN, ["b", "absent"])
        assert list(asked) == ["b", "absent"] and asked["absent"].shape == (2, 2, 2) and np.isnan(asked["absent"]).all()
        steps, series = store.model_score_series(RUN, ["icl_score"])
        assert steps.tolist() == [1, 3] and np.isnan(series["icl_score"]).all()
