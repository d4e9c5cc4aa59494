"""`jaxinduct report`: figures and an offline HTML page from a results store.

The hand-built store has a phase change placed by construction (L1H1 and L1H2 jump at step
400), so the page's numbers can be checked against what was written. The figures
themselves are looked at by a person (see the issue); tests check that every one is drawn
from the data it needs, is a real PNG, and that the page references exactly those files.
"""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex

from jaxinduct.cli import main as cli_main
from jaxinduct.report import figures
from jaxinduct.report.page import write_report
from jaxinduct.results.run_view import load_run_view
from jaxinduct.results.store import CheckpointScores, ResultStore, StoreError

RUN, HASH = "toy", "h1"
STEPS = [0, 1, 2, 4, 8, 16, *range(20, 801, 20), 1000]
N_LAYERS, N_HEADS, SEQ = 2, 3, 24
PNG = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = {"phase_change", "head_maps", "copying_vs_prefix", "composition", "per_token_loss", "ablation", "verdicts"}


def formed(step: int) -> bool:
    return step >= 400


def checkpoint(step: int) -> CheckpointScores:
    on = formed(step)
    prefix = np.full((N_LAYERS, N_HEADS), 0.03)
    prefix[1, 1:] = 0.8 if on else 0.03
    copying = np.full((N_LAYERS, N_HEADS), 0.05)
    copying[1, 1:] = 0.6 if on else 0.05
    behaviour = np.zeros((N_LAYERS, N_HEADS))
    behaviour[1, 1:] = float(on)
    mechanism = np.zeros((N_LAYERS, N_HEADS))
    mechanism[1, 2] = float(on)  # L1H1: behaviour only, so the verdicts disagree there
    qk = np.full((N_LAYERS, N_HEADS), np.nan)  # not defined in layer 0
    qk[1] = 0.9 if on else 0.0
    ablation = np.zeros((N_LAYERS, N_HEADS))
    ablation[1, 1:] = 0.5 if on else 0.0
    pair = np.full((N_LAYERS, N_HEADS, N_LAYERS, N_HEADS), np.nan)
    pair[0, :, 1, :] = 0.3 if on else 0.1
    loss = np.full(SEQ, 3.0)
    loss[SEQ // 2 :] = 1.0 if on else 3.0
    head_loss = np.zeros((N_LAYERS, N_HEADS, SEQ))
    head_loss[1, 1:, SEQ // 2 :] = 2.0 if on else 0.0  # ablating a formed head gives the gain back
    return CheckpointScores(
        step=step,
        tokens_seen=step * 4096,
        head={
            "prefix_matching": prefix, "copying": copying, "ov_copying": copying, "induction_qk_positivity": qk,
            "induction_behaviour": behaviour, "induction_mechanism": mechanism, "ablation_icl_delta": ablation,
            "ablation_icl_delta_pattern_preserving": ablation / 2,
        },
        pair={"k_composition": pair},
        model={"icl_score": -2.0 if on else -0.1, "induction_loss": 0.5 if on else 4.0},
        curve={"per_token_loss": loss, "ablation_per_token_loss_delta": head_loss},
    )  # fmt: skip


def make_store(path: Path, steps=STEPS, run=RUN) -> Path:
    with ResultStore.open(path) as store:
        store.ensure_run(run, f"/ckpts/{run}", json.dumps({"n_layers": N_LAYERS, "n_heads": N_HEADS}))
        store.record_probe_config(HASH, json.dumps({"probes": {"thresholds": {"prefix_matching": 0.4, "copying": 0.3}}}))
        store.write_batch(run, HASH, [checkpoint(s) for s in steps])
    return path


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.remote: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        for name in ("src", "href"):
            if attrs.get(name) and re.match(r"^[a-z]+://|^//", attrs[name]):
                self.remote.append(attrs[name])
        if tag in ("script", "link", "iframe"):
            self.remote.append(tag)


def parse(index: Path) -> _Images:
    parser = _Images()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_report_draws_every_figure_and_the_page_references_exactly_them(tmp_path):
    store_path = make_store(tmp_path / "s.sqlite")
    before = digest(store_path)
    with ResultStore.open(store_path, readonly=True) as store:
        report = write_report(store, tmp_path / "out")
    assert set(report.figures[RUN]) == ALL_FIGURES
    page = parse(report.index)
    assert not page.remote, "the page must open with no network"
    referenced = {(report.index.parent / src).resolve() for src in page.sources}
    assert referenced == {p.resolve() for p in report.figures[RUN].values()}
    for path in referenced:
        assert path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, path
    assert digest(store_path) == before, "report only reads the store"

    text = report.index.read_text(encoding="utf-8")
    # The phase change written into the data: L1H1 and L1H2 jump between steps 380 and 400.
    assert "steps 380-400" in text
    # The highlighted heads and their last-step scores, as written above.
    # formed: the first step from which prefix_matching stays above 0.4 (0.8 from step 400 on).
    assert re.search(r"L1H1</td><td[^>]*>400</td><td[^>]*>0\.800</td><td[^>]*>0\.600</td>", text)
    assert re.search(r"L1H2</td><td[^>]*>400</td>", text)
    assert "L0H0</td>" not in text
    assert "-0.100 at step 0 -&gt; -2.000 at step 1000" in text  # icl_score


def test_a_run_with_few_scores_gets_the_figures_its_data_allow(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore.open(path) as store:
        store.ensure_run("lean", "/src", json.dumps({}))
        store.record_probe_config(HASH, json.dumps({}))
        rng = np.random.default_rng(0)
        batch = [CheckpointScores(step=s, head={"prefix_matching": 0.03 + 0.01 * rng.random((2, 2))}) for s in range(0, 100, 10)]
        store.write_batch("lean", HASH, batch)
        store.ensure_run("empty", "/src2", json.dumps({}))
        store.mark_failed("empty", HASH, 5, "OSError: unreadable")
    with ResultStore.open(path, readonly=True) as store:
        report = write_report(store, tmp_path / "out")
    assert set(report.figures) == {"lean"} and report.skipped == ["empty"]
    # Scores never computed: no composition, loss, ablation or verdict figure, and no crash.
    assert set(report.figures["lean"]) == {"phase_change", "head_maps", "copying_vs_prefix"}
    text = report.index.read_text(encoding="utf-8")
    assert "none found" in text and "No head became an induction head" in text
    assert "has no done checkpoint yet" in report.describe()


def test_a_figure_the_data_no_longer_support_does_not_linger(tmp_path):
    full = make_store(tmp_path / "full.sqlite")
    with ResultStore.open(full, readonly=True) as store:
        write_report(store, tmp_path / "out")
    lean = tmp_path / "lean.sqlite"
    with ResultStore.open(lean) as store:
        store.ensure_run(RUN, "/src", json.dumps({}))
        store.record_probe_config(HASH, json.dumps({}))
        store.write_batch(RUN, HASH, [CheckpointScores(step=s, head={"prefix_matching": np.full((2, 3), 0.03)}) for s in STEPS])
    with ResultStore.open(lean, readonly=True) as store:
        report = write_report(store, tmp_path / "out")
    assert not (tmp_path / "out" / RUN / "composition.png").exists()
    assert set(report.figures[RUN]) == {"phase_change", "head_maps", "copying_vs_prefix"}


def test_several_runs_each_get_a_folder_even_when_names_clash_after_cleaning(tmp_path):
    path = make_store(tmp_path / "s.sqlite", run="a/b")
    make_store(path, steps=STEPS[:10], run="a b")
    with ResultStore.open(path, readonly=True) as store:
        report = write_report(store, tmp_path / "out")
    folders = {p.parent for figures in report.figures.values() for p in figures.values()}
    assert len(folders) == 2
    page = parse(report.index)
    assert all((report.index.parent / src).is_file() for src in page.sources)


def test_cli_report_and_its_errors(tmp_path, capsys):
    store_path = make_store(tmp_path / "s.sqlite")
    assert cli_main(["report", "--store", str(store_path), "--run", RUN, "--out", str(tmp_path / "r")]) == 0
    assert "7 figures" in capsys.readouterr().out
    assert (tmp_path / "r" / "index.html").is_file()

    before = digest(store_path)
    assert cli_main(["report", "--store", str(store_path), "--run", "nope", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "no run 'nope'" in err and "'toy'" in err and "Fix" in err
    assert digest(store_path) == before

    assert cli_main(["report", "--store", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "r3")]) == 2
    assert "no results store there" in capsys.readouterr().err
    assert not (tmp_path / "missing.sqlite").exists()

    empty = tmp_path / "empty.sqlite"
    ResultStore.open(empty).close()
    with ResultStore.open(empty, readonly=True) as store, pytest.raises(StoreError, match="empty"):
        write_report(store, tmp_path / "r4")


@pytest.mark.parametrize("step", [0, 5])
def test_a_run_with_one_checkpoint_is_reported(tmp_path, step):
    path = tmp_path / "s.sqlite"
    with ResultStore.open(path) as store:
        store.ensure_run("live", "/src", json.dumps({}))
        store.record_probe_config(HASH, json.dumps({}))
        store.write_batch("live", HASH, [checkpoint(step)])
    with ResultStore.open(path, readonly=True) as store:
        report = write_report(store, tmp_path / "out")
    assert "phase_change" in report.figures["live"] and "head_maps" in report.figures["live"]
    text = report.index.read_text(encoding="utf-8")
    assert "none found" in text and f"steps {step}..{step}" in text


# --- large models: few heads named, the rest one grey aggregate -----------------------------------

BIG_LAYERS, BIG_HEADS, BIG_SEQ = 24, 16, 16  # Pythia-1.4B's 384 heads
BIG_STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
# Twelve induction heads, strongest first: final prefix_matching 0.90, 0.87, ..., 0.57.
BIG_INDUCTION = [(8, h) for h in range(8)] + [(12, h) for h in range(4)]
BIG_SOURCE = (2, 3)  # a previous-token head, not an induction head, with the largest ablation effect
# Full ablation's change of ICL score once formed: the source 0.5, the two weakest induction heads
# 0.4 and 0.3, every other induction head 0.05, every other head 0. The top three by ablation are
# then the source, L12H3 and L12H2; with them, the six strongest induction heads fill the nine
# named places, and L8H6, L8H7, L12H0 and L12H1 are drawn unnamed.
BIG_ABLATION = {BIG_SOURCE: 0.5, (12, 3): 0.4, (12, 2): 0.3}
BIG_NAMED = {"L8H0", "L8H1", "L8H2", "L8H3", "L8H4", "L8H5", "L12H2", "L12H3", "L2H3 (ablation)"}
BIG_OTHERS = BIG_LAYERS * BIG_HEADS - len(BIG_INDUCTION) - 1  # 371: neither induction head nor the source
# Heads flagged by the behaviour verdict at steps 1 and 2 only (never induction heads): 45 of them, so
# that the verdict figure has 57 flagged heads to choose 40 rows from.
BIG_TRANSIENT = [(l, h) for l in (20, 21, 22) for h in range(BIG_HEADS)][:45]


def big_checkpoint(step: int) -> CheckpointScores:
    on = step >= 256
    rng = np.random.default_rng(step)
    shape = (BIG_LAYERS, BIG_HEADS)
    prefix = 0.03 + 0.02 * rng.random(shape)
    copying = 0.05 * rng.random(shape)
    ablation = np.zeros(shape)
    behaviour = np.zeros(shape)
    for k, head in enumerate(BIG_INDUCTION):
        if on:
            prefix[head] = 0.9 - 0.03 * k
            copying[head] = 0.7
            ablation[head] = BIG_ABLATION.get(head, 0.05)
            behaviour[head] = 1.0
    if on:
        ablation[BIG_SOURCE] = BIG_ABLATION[BIG_SOURCE]
    if step in (1, 2):
        for head in BIG_TRANSIENT:
            behaviour[head] = 1.0
    pair = np.full((*shape, *shape), np.nan)
    for src_layer in range(BIG_LAYERS):
        pair[src_layer, :, src_layer + 1 :, :] = 0.1
    if on:
        pair[BIG_SOURCE][8, 0] = 0.9  # L2H3 -> L8H0: the strongest pair
    loss = np.full(BIG_SEQ, 3.0)
    loss[BIG_SEQ // 2 :] = 1.0 if on else 3.0
    head_loss = np.zeros((*shape, BIG_SEQ))
    head_loss[..., BIG_SEQ // 2 :] = ablation[..., None]
    return CheckpointScores(
        step=step, tokens_seen=step * 4096,
        head={"prefix_matching": prefix, "copying": copying, "ov_copying": copying, "induction_behaviour": behaviour,
              "induction_mechanism": behaviour, "ablation_icl_delta": ablation,
              "ablation_icl_delta_pattern_preserving": ablation / 2},
        pair={"k_composition": pair},
        model={"icl_score": -2.0 if on else -0.1, "induction_loss": 0.5 if on else 4.0},
        curve={"per_token_loss": loss, "ablation_per_token_loss_delta": head_loss},
    )  # fmt: skip


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "s.sqlite"
    with ResultStore.open(path) as store:
        store.ensure_run("big", "/ckpts/big", json.dumps({"n_layers": BIG_LAYERS, "n_heads": BIG_HEADS}))
        store.record_probe_config(HASH, json.dumps({}))
        store.write_batch("big", HASH, [big_checkpoint(s) for s in BIG_STEPS])
    return path


def big_view(path: Path):
    with ResultStore.open(path, readonly=True) as store:
        return load_run_view(store, "big", "/ckpts/big")


def head_labels(ax) -> set[str]:
    """The legend entries of ``ax`` that name a head."""
    return {t.get_text() for t in ax.get_legend().get_texts() if re.match(r"L\d+H\d+", t.get_text())}


def test_at_384_heads_a_line_figure_names_nine_heads_and_draws_the_others_as_one_band(big_store):
    view = big_view(big_store)
    fig = figures.phase_change_figure(view)
    ax = next(a for a in fig.axes if a.get_ylabel().startswith("prefix matching"))
    assert head_labels(ax) == BIG_NAMED
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "4 more induction heads" in labels
    bands = [c for c in ax.collections if c.get_label().startswith(f"other {BIG_OTHERS} heads")]
    assert len(bands) == 1, "the heads not highlighted are one band"
    # 9 named + 4 unnamed induction heads + median, min, max + the threshold: far from one line per head.
    assert len(ax.get_lines()) <= 20

    ablation = figures.ablation_figure(view)
    first = ablation.axes[0]
    assert head_labels(first) == BIG_NAMED  # the same heads as in the phase-change figure
    assert any(c.get_label().startswith(f"other {BIG_OTHERS} heads") for c in first.collections)


def test_at_384_heads_composition_is_drawn_by_layer_with_the_strongest_pairs_named(big_store):
    view = big_view(big_store)
    fig = figures.composition_figure(view)
    last = fig.axes[len(view.key_steps) - 1]
    layer_map = last.images[0].get_array()
    assert layer_map.shape == (BIG_LAYERS, BIG_LAYERS)
    assert layer_map[2, 8] == pytest.approx(0.9) and layer_map[2, 9] == pytest.approx(0.1)
    assert np.ma.is_masked(layer_map[8, 2])  # no pair reads an earlier layer
    texts = "\n".join(t.get_text() for t in last.texts)
    assert re.search(r"L2H3 -> L8H0\s+0\.90", texts)


def test_at_384_heads_the_verdict_figure_keeps_the_heads_flagged_most(big_store):
    view = big_view(big_store)
    fig = figures.verdicts_figure(view)
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == figures.MAX_VERDICT_ROWS == 40
    # The 12 induction heads are flagged at 3 steps, the transient heads at 2: all 12 stay.
    assert {f"L{l}H{h}" for l, h in BIG_INDUCTION} <= set(rows)
    assert "17 flagged at fewer steps left out" in ax.get_title()


def test_a_report_at_384_heads_keeps_every_figure_small(big_store, tmp_path):
    with ResultStore.open(big_store, readonly=True) as store:
        report = write_report(store, tmp_path / "out")
    assert set(report.figures["big"]) == ALL_FIGURES
    for path in report.figures["big"].values():
        assert path.stat().st_size < 2_000_000, path
    text = report.index.read_text(encoding="utf-8")
    assert "L2H3 (0.500)" in text  # the head coloured for its ablation alone is named on the page


def test_a_small_model_keeps_one_line_per_head(tmp_path):
    view_path = make_store(tmp_path / "s.sqlite")
    with ResultStore.open(view_path, readonly=True) as store:
        view = load_run_view(store, RUN, f"/ckpts/{RUN}")
    fig = figures.phase_change_figure(view)
    ax = next(a for a in fig.axes if a.get_ylabel().startswith("prefix matching"))
    assert head_labels(ax) == {"L1H1", "L1H2"}
    grey = [line for line in ax.get_lines() if to_hex(line.get_color()) == to_hex("0.6")]
    assert len(grey) == N_LAYERS * N_HEADS - 2  # the four other heads, one line each
    assert not [c for c in ax.collections if c.get_label().startswith("other")]


def test_ablation_heads_are_highlighted_only_when_they_stand_out(tmp_path):
    path = tmp_path / "s.sqlite"
    flat = np.full((2, 3), 0.02)
    standout = flat.copy()
    standout[0, 2] = 0.3
    with ResultStore.open(path) as store:
        for run, ablation in (("flat", flat), ("standout", standout)):
            store.ensure_run(run, f"/{run}", json.dumps({}))
            store.record_probe_config(HASH, json.dumps({}))
            batch = [CheckpointScores(step=s, head={"prefix_matching": np.full((2, 3), 0.03), "ablation_icl_delta": ablation})
                     for s in (0, 10, 20)]  # fmt: skip
            store.write_batch(run, HASH, batch)
    with ResultStore.open(path, readonly=True) as store:
        flat_view, standout_view = (load_run_view(store, run, f"/{run}") for run in ("flat", "standout"))
    assert figures.top_ablation_heads(flat_view) == []  # every head alike: nothing stands out
    assert figures.top_ablation_heads(standout_view) == [(0, 2)]
    assert figures.highlighted_heads(standout_view).named == ((0, 2),)
