"""``jaxinduct show`` rendering: stores built by hand, the expected text written out by hand."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jaxinduct.report import show as show_module
from jaxinduct.report.format import format_value, format_verdict
from jaxinduct.report.show import render_show
from jaxinduct.results.store import CheckpointScores, ResultStore, StoreError

NAN = float("nan")
RUN, HASH = "toy", "probe-a"
STEPS = (0, 100, 200, 300)

# prefix_matching per step, [layer, head] of a 2 x 3 model. L1H1 passes 0.4 (the default verdict
# threshold) at step 100 and stays above, L1H0 at 200, L0H1 at the last step 300, nothing else
# ever does; L1H2 is undefined throughout.
PREFIX = {
    0: [[0.01, 0.02, 0.03], [0.02, 0.04, 0.01]],
    100: [[0.05, 0.10, 0.02], [0.30, 0.55, NAN]],
    200: [[0.06, 0.20, 0.03], [0.60, 0.70, NAN]],
    300: [[0.07, 0.45, 0.04], [0.65, 0.80, NAN]],
}
# The other head scores are the same at every step.
OTHERS = {
    "copying": [[0.10, 0.20, 0.30], [0.70, 0.90, NAN]],
    "ov_copying": [[0.0, 0.10, -0.20], [0.60, 0.75, 0.10]],
    "previous_token": [[0.90, 0.20, 0.10], [0.05, 0.03, 0.02]],
    "induction_qk_positivity": [[NAN, NAN, NAN], [0.55, 0.80, 0.10]],  # NaN in layer 0, as scored
    "induction_behaviour": [[0, 0, 0], [1, 1, 0]],
    "induction_mechanism": [[0, 0, 0], [1, 1, 0]],
}


def checkpoint(step: int) -> CheckpointScores:
    head = {"prefix_matching": np.array(PREFIX[step]), **{k: np.array(v, float) for k, v in OTHERS.items()}}
    model = {"icl_score": -step / 1000, "induction_loss": 3.0 - step / 200}
    if step == 300:  # the phase change is recorded once, at the step where it was analysed
        model |= {"phase_change_start": 100.0, "phase_change_end": 200.0}
    return CheckpointScores(step=step, tokens_seen=step * 1000, head=head, model=model)


def open_store(path: Path, runs: tuple[str, ...] = (RUN,)) -> ResultStore:
    store = ResultStore.open(path)
    for run in runs:
        store.ensure_run(run, f"/ckpts/{run}", json.dumps({"n_layers": 2, "n_heads": 3}))
    store.record_probe_config(HASH, json.dumps({"n_examples": 4}))
    return store


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[ResultStore]:
    """Four done steps and one failed (150) of one run."""
    store = open_store(tmp_path / "s.sqlite")
    store.write_batch(RUN, HASH, [checkpoint(s) for s in STEPS])
    store.mark_failed(RUN, HASH, 150, "RuntimeError: out of memory\nTraceback (most recent call last): ...")
    yield store
    store.close()


def table_rows(text: str) -> list[list[str]]:
    """The cells of the head table's rows (after its title row), split on whitespace."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#  head"))
    rows = []
    for line in lines[start + 1 :]:
        if not line[:1].isdigit():
            break
        rows.append(line.split())
    return rows


# --- one run --------------------------------------------------------------------------------------


def test_header_table_model_scores_and_failures(toy):
    text = render_show(toy, width=120)
    assert text.splitlines()[:5] == [
        "run: toy",
        "source: /ckpts/toy",
        "probe hash: probe-a",
        "checkpoints: 4 done, 1 failed; done steps 0 to 300",
        "step: 300 (last done step; tokens seen 300,000)",
    ]
    assert "top 5 heads by prefix_matching at step 300:" in text
    title = next(line for line in text.splitlines() if line.startswith("#  head"))
    assert title.split() == [
        "#", "head", "prefix_matching", "formed", "copy", "ov_copy", "prev", "qk_pos", "behav", "mech"
    ]  # fmt: skip
    # L1H2 (prefix_matching NaN) is left out; formed = first step from which prefix_matching stays > 0.4;
    # qk_pos NaN in layer 0 is "-".
    assert table_rows(text) == [
        ["1", "L1H1", "0.800", "100", "0.900", "0.750", "0.030", "0.800", "yes", "yes"],
        ["2", "L1H0", "0.650", "200", "0.700", "0.600", "0.050", "0.550", "yes", "yes"],
        ["3", "L0H1", "0.450", "300", "0.200", "0.100", "0.200", "-", "no", "no"],
        ["4", "L0H0", "0.070", "-", "0.100", "0.000", "0.900", "-", "no", "no"],
        ["5", "L0H2", "0.040", "-", "0.300", "-0.200", "0.100", "-", "no", "no"],
    ]
    assert "formed = first step from which prefix_matching stays > 0.4; copy = copying;" in text
    assert (
        "model scores at step 300: icl_score -0.300, induction_loss 1.500, "
        "phase_change_start step 100, phase_change_end step 200"
    ) in text
    assert "max prefix_matching over heads: 0.040 at step 0 (L1H1) -> 0.800 at step 300 (L1H1)" in text
    assert "failed checkpoints (1; a rescan retries them):\n  step 150: RuntimeError: out of memory\n" in text
    assert "Traceback" not in text  # only the error's first line


def test_top_metric_and_step_options(toy):
    text = render_show(toy, metric="copying", step=100, top=2, width=120)
    assert "step: 100 (tokens seen 100,000)" in text
    assert "top 2 heads by copying at step 100:" in text
    title = next(line for line in text.splitlines() if line.startswith("#  head"))
    assert title.split()[:5] == ["#", "head", "copying", "formed", "prefix"]  # the shown metric is not repeated
    # formed is about prefix_matching whatever ranks (L1H1 from 100, L1H0 from 200, over the whole
    # run); prefix_matching is step 100's.
    assert [row[:5] for row in table_rows(text)] == [
        ["1", "L1H1", "0.900", "100", "0.550"],
        ["2", "L1H0", "0.700", "200", "0.300"],
    ]
    # phase-change rows live at step 300 only: shown with where they come from.
    assert "icl_score -0.100, induction_loss 2.500, phase_change_start step 100 (recorded at step 300)" in text
    assert "max copying over heads: 0.900 at step 0 (L1H1) -> 0.900 at step 100 (L1H1)" in text


def test_narrow_width_drops_columns_from_the_right(toy):
    text = render_show(toy, width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    title = next(line for line in text.splitlines() if line.startswith("#  head")).split()
    assert title[:4] == ["#", "head", "prefix_matching", "formed"]  # required columns stay
    assert "mech" not in title and "behav" not in title
    assert table_rows(text)[0][:4] == ["1", "L1H1", "0.800", "100"]
    assert "left out to fit the width:" in text.replace("\n  ", " ")
    assert "induction_mechanism" in text.replace("\n  ", " ")
    # Free text is wrapped, not cut: nothing of the trajectory line is lost.
    assert "0.040 at step 0 (L1H1) -> 0.800 at step 300 (L1H1)" in text.replace("\n  ", " ")


def test_default_width_is_the_terminal_but_at_least_80(toy, monkeypatch):
    monkeypatch.setattr(show_module.shutil, "get_terminal_size", lambda: os.terminal_size((40, 24)))
    assert render_show(toy) == render_show(toy, width=80)
    monkeypatch.setattr(show_module.shutil, "get_terminal_size", lambda: os.terminal_size((200, 24)))
    assert render_show(toy) == render_show(toy, width=200)


def test_formatting():
    assert [format_value(v) for v in (0.12345, -1.0, NAN, None, -0.0001, 12.0)] == [
        "0.123", "-1.000", "-", "-", "0.000", "12.000"
    ]  # fmt: skip
    assert [format_verdict(v) for v in (1.0, 0.0, NAN)] == ["yes", "no", "-"]


def test_nan_model_scores_and_undefined_step_values(tmp_path):
    with open_store(tmp_path / "s.sqlite") as store:
        # No icl_score (no dataset); the metric undefined for every head at step 5.
        store.write_batch(RUN, HASH, [
            CheckpointScores(step=0, head={"copying": [[0.25, NAN, NAN]]}, model={"induction_loss": NAN}),
            CheckpointScores(step=5, head={"copying": [[NAN, NAN, NAN]], "previous_token": [[0.5, 0.5, 0.5]]}),
        ])  # fmt: skip
        text = render_show(store, metric="copying")
        assert "no head has a defined copying at step 5." in text
        assert "model scores at step 5: icl_score -, induction_loss -" in text
        assert "max copying over heads: 0.250 at step 0 (L0H0) -> - at step 5" in text
        text = render_show(store, metric="copying", step=0)
        assert table_rows(text) == [["1", "L0H0", "0.250", "-"]]  # no context score at step 0: no column


def test_more_than_five_failures_and_a_run_with_failures_only(tmp_path):
    with open_store(tmp_path / "s.sqlite") as store:
        store.mark_failed(RUN, HASH, range(0, 70, 10), "ValueError: bad checkpoint")
        text = render_show(store)
        assert "checkpoints: 0 done, 7 failed" in text
        assert "no done checkpoints yet: nothing to show." in text
        assert "  step 40: ValueError: bad checkpoint\n  ... and 2 more" in text
        assert "step 50:" not in text


def test_latest_probe_hash_is_shown_and_older_ones_named(tmp_path):
    with open_store(tmp_path / "s.sqlite") as store:
        store.record_probe_config("probe-b", json.dumps({"n_examples": 8}))
        store.write_batch(RUN, HASH, [checkpoint(0)])
        store.write_batch(RUN, "probe-b", [checkpoint(100)])
        text = render_show(store, width=120)
        assert "probe hash: probe-b (older probe hashes, not shown: probe-a)" in text
        assert "checkpoints: 1 done, 0 failed; done steps 100 to 100" in text


# --- several runs -------------------------------------------------------------------------------


def test_every_run_in_turn(tmp_path):
    with open_store(tmp_path / "s.sqlite", runs=("alpha", "beta")) as store:
        store.write_batch("alpha", HASH, [checkpoint(s) for s in STEPS])
        store.write_batch("beta", HASH, [checkpoint(s) for s in (0, 100)])
        text = render_show(store, width=120)
        assert text.startswith(f"2 runs in {store.path}:\n")
        assert text.index("run: alpha") < text.index("run: beta")
        assert "top 5 heads by prefix_matching at step 300:" in text
        assert "top 5 heads by prefix_matching at step 100:" in text  # beta at its own last step

        # A step only one run has: the other gets a note, not an error.
        text = render_show(store, step=300, width=120)
        beta = text[text.index("run: beta") :]
        assert beta.startswith("run: beta\nnot shown: ") and "no done checkpoint at step 300" in beta.replace("\n  ", " ")
        assert "top 5 heads by prefix_matching at step 300:" in text

        # ... but when no run has it, the error is raised.
        with pytest.raises(StoreError, match="no done checkpoint at step 999"):
            render_show(store, step=999)

        only = render_show(store, run="beta", width=120)
        assert only.startswith("run: beta\n") and "run: alpha" not in only


# --- errors --------------------------------------------------------------------------------------


def test_empty_store(tmp_path):
    with ResultStore.open(tmp_path / "s.sqlite") as store:
        with pytest.raises(StoreError, match=r"empty.*jaxinduct scan SOURCE --store .*s\.sqlite"):
            render_show(store)


def test_unknown_run(toy):
    with pytest.raises(StoreError, match=r"no run 'nope'.*it has: 'toy'"):
        render_show(toy, run="nope")


def test_unknown_metric_lists_the_runs_metrics(toy):
    with pytest.raises(StoreError) as info:
        render_show(toy, metric="prefix_mathcing")
    message = str(info.value)
    assert "'prefix_mathcing'" in message
    assert (
        "it has: copying, induction_behaviour, induction_mechanism, induction_qk_positivity, ov_copying, "
        "prefix_matching, previous_token."
    ) in message


def test_unknown_step_lists_first_and_last_steps(tmp_path):
    with open_store(tmp_path / "s.sqlite") as store:
        store.write_batch(RUN, HASH, [CheckpointScores(step=s, head={"copying": [[0.1]]}) for s in range(0, 1000, 100)])
        store.mark_failed(RUN, HASH, 50, "OSError: truncated file\nmore")
        listed = r"done steps \(10\): 0, 100, 200, \.\.\., 700, 800, 900\."
        with pytest.raises(StoreError, match=r"no done checkpoint at step 7; " + listed):
            render_show(store, metric="copying", step=7)
        with pytest.raises(StoreError, match=r"step 50 failed \(OSError: truncated file\)"):
            render_show(store, metric="copying", step=50)


def test_top_must_be_positive(toy):
    with pytest.raises(StoreError, match="--top must be at least 1"):
        render_show(toy, top=0)
