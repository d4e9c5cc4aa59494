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

from jaxinduct.cli import main as cli_main
from jaxinduct.report.page import write_report
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
