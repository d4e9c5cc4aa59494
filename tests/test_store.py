"""The results store: round trips, idempotence, atomicity, crash safety, refusal, export.

Expected values are written out by hand here, never computed by the store.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxinduct.results.store as store_module
from jaxinduct.errors import JaxInductError
from jaxinduct.results.export import export
from jaxinduct.results.store import SCHEMA_VERSION, CheckpointScores, ResultStore, StoreError

NAN = float("nan")
REPO = Path(__file__).resolve().parents[1]
RUN, HASH, OTHER_HASH = "toy", "probe-a", "probe-b"


def new_store(path: Path, runs: tuple[str, ...] = (RUN,), hashes: tuple[str, ...] = (HASH,)) -> ResultStore:
    store = ResultStore.open(path)
    for run in runs:
        store.ensure_run(run, f"/ckpts/{run}", json.dumps({"n_layers": 2, "n_heads": 2}))
    for h in hashes:
        store.record_probe_config(h, json.dumps({"n_examples": 4, "name": h}))
    return store


def toy_scores(step: int, scale: float = 1.0) -> CheckpointScores:
    """2 layers x 2 heads; NaN entries mark scores that are not defined."""
    return CheckpointScores(
        step=step,
        tokens_seen=step * 100,
        seconds=0.5,
        head={
            "prefix_matching": np.array([[0.5, NAN], [0.25, 1.0]], np.float32) * scale,
            "previous_token": np.array([[0.125, 0.0], [NAN, NAN]], np.float32) * scale,
        },
        pair={
            # [src_layer, src_head, dst_layer, dst_head]; only src_layer < dst_layer is defined
            "k_composition": np.where(
                np.arange(2)[:, None, None, None] < np.arange(2)[None, None, :, None],
                np.array([[[[0.0, 0.0], [0.75, 0.5]], [[0.0, 0.0], [0.25, 2.0]]], [[[0.0] * 2] * 2] * 2], np.float32),
                NAN,
            )
            * scale,
        },
        model={"icl_score": np.float32(-0.5) * scale, "induction_loss": NAN},
        curve={
            "per_token_loss": np.array([NAN, 3.0, 2.5, 1.5], np.float32) * scale,
            "ablation_loss_delta": np.array(
                [[[0.0, 1.0, 2.0], [NAN, NAN, NAN]], [[NAN, 0.5, 0.25], [4.0, 8.0, 16.0]]], np.float32
            )
            * scale,
        },
    )


def table_counts(path: Path) -> dict[str, int]:
    """Rows per table; for pair_scores, the defined (non-NaN) values of the packed pair arrays."""
    with sqlite3.connect(path) as conn:
        tables = ("checkpoints", "head_scores", "model_scores", "curves")
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
        counts["pair_scores"] = sum(pair_values_by_step(conn).values())
        return counts


def pair_values_by_step(conn: sqlite3.Connection) -> dict[int, int]:
    """Defined values of the packed pair arrays per step, read with plain sqlite3 and numpy."""
    counts: dict[int, int] = {}
    for step, dtype, packed in conn.execute("SELECT step, dtype, packed FROM pair_arrays"):
        counts[step] = counts.get(step, 0) + int(np.count_nonzero(~np.isnan(np.frombuffer(packed, dtype))))
    return counts


# Rows one toy checkpoint yields, counted by hand from toy_scores.
TOY_COUNTS = {"head_scores": 3 + 2, "pair_scores": 4, "model_scores": 1, "curves": 1 + 3}


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_every_table(tmp_path):
    path = tmp_path / "s.sqlite"
    with new_store(path) as store:
        store.write_batch(RUN, HASH, [toy_scores(10), toy_scores(20, scale=2.0)])

    with ResultStore.open(path, readonly=True) as store:
        (run,) = store.runs()
        assert (run.name, run.source, json.loads(run.spec)) == (RUN, "/ckpts/toy", {"n_layers": 2, "n_heads": 2})
        assert json.loads(store.probe_config(HASH)) == {"n_examples": 4, "name": HASH}
        assert store.latest_probe_hash(RUN) == HASH
        assert store.done_steps(RUN, HASH) == {10, 20}
        records = store.steps(RUN)
        assert [(r.step, r.status, r.error, r.tokens_seen, r.seconds, r.probe_hash) for r in records] == [
            (10, "done", None, 1000, 0.5, HASH),
            (20, "done", None, 2000, 0.5, HASH),
        ]

        heads = store.head_scores(RUN, step=10)
        assert heads.tolist() == [
            (10, "prefix_matching", 0, 0, 0.5),
            (10, "prefix_matching", 1, 0, 0.25),
            (10, "prefix_matching", 1, 1, 1.0),
            (10, "previous_token", 0, 0, 0.125),
            (10, "previous_token", 0, 1, 0.0),
        ]
        assert store.head_scores(RUN, "prefix_matching")["value"].tolist() == [0.5, 0.25, 1.0, 1.0, 0.5, 2.0]

        assert store.pair_scores(RUN, "k_composition", 10).tolist() == [
            (10, "k_composition", 0, 0, 1, 0, 0.75),
            (10, "k_composition", 0, 0, 1, 1, 0.5),
            (10, "k_composition", 0, 1, 1, 0, 0.25),
            (10, "k_composition", 0, 1, 1, 1, 2.0),
        ]
        assert store.model_scores(RUN).tolist() == [(10, "icl_score", -0.5), (20, "icl_score", -1.0)]

        curves = store.curves(RUN, step=20)
        assert [(c.step, c.metric, c.layer, c.head) for c in curves] == [
            (20, "ablation_loss_delta", 0, 0),
            (20, "ablation_loss_delta", 1, 0),  # (0, 1) was all NaN: not defined, not stored
            (20, "ablation_loss_delta", 1, 1),
            (20, "per_token_loss", -1, -1),
        ]
        assert all(c.values.dtype == np.float32 for c in curves)
        np.testing.assert_array_equal(curves[1].values, [NAN, 1.0, 0.5])
        np.testing.assert_array_equal(curves[3].values, [NAN, 6.0, 5.0, 3.0])

        steps, grid = store.head_score_grid(RUN, "previous_token")
        assert steps.tolist() == [10, 20]
        np.testing.assert_array_equal(grid, [[[0.125, 0.0], [NAN, NAN]], [[0.25, 0.0], [NAN, NAN]]])
    assert table_counts(path) == {"checkpoints": 2, **{t: 2 * n for t, n in TOY_COUNTS.items()}}


def test_accepts_any_array_like_and_checks_shapes(tmp_path):
    with new_store(tmp_path / "s.sqlite") as store:
        store.write_batch(RUN, HASH, [CheckpointScores(step=0, head={"copying": [[1, 2]]}, model={"icl_score": 3})])
        assert store.head_scores(RUN).tolist() == [(0, "copying", 0, 0, 1.0), (0, "copying", 0, 1, 2.0)]
        with pytest.raises(ValueError, match="head score 'copying'.*shape"):
            store.write_batch(RUN, HASH, [CheckpointScores(step=1, head={"copying": [1.0, 2.0]})])
        with pytest.raises(ValueError, match="same step twice"):
            store.write_batch(RUN, HASH, [toy_scores(5), toy_scores(5)])
        with pytest.raises(StoreError, match="unknown run"):
            store.write_batch("nope", HASH, [toy_scores(5)])
        with pytest.raises(StoreError, match="another source"):
            store.ensure_run(RUN, "/elsewhere", "{}")
        store.ensure_run(RUN, "/ckpts/toy", '{"n_heads": 2, "n_layers": 2}')  # same spec, other key order
        with pytest.raises(StoreError, match="no run 'nope'.*'toy'"):
            store.head_scores("nope")
        assert store.done_steps(RUN, HASH) == {0}


# --- idempotence and status ------------------------------------------------------------------


def test_rewriting_a_batch_replaces_rows(tmp_path):
    path = tmp_path / "s.sqlite"
    with new_store(path) as store:
        batch = [toy_scores(1), toy_scores(2)]
        store.write_batch(RUN, HASH, batch)
        first = table_counts(path)
        store.write_batch(RUN, HASH, batch)
        assert table_counts(path) == first == {"checkpoints": 2, **{t: 2 * n for t, n in TOY_COUNTS.items()}}

        # A rewrite with a score now undefined drops its row rather than keeping the stale one.
        store.write_batch(RUN, HASH, [CheckpointScores(step=1, head={"prefix_matching": [[NAN, 0.75]]})])
        assert store.head_scores(RUN, step=1).tolist() == [(1, "prefix_matching", 0, 1, 0.75)]
        assert store.curves(RUN, step=1) == []
        assert len(store.head_scores(RUN, step=2)) == TOY_COUNTS["head_scores"]


def test_failed_step_is_retried_then_done(tmp_path):
    with new_store(tmp_path / "s.sqlite") as store:
        store.write_batch(RUN, HASH, [toy_scores(0)])
        assert store.mark_failed(RUN, HASH, [100, 200], "RESOURCE_EXHAUSTED: out of memory", seconds=1.5) == [100, 200]
        assert store.done_steps(RUN, HASH) == {0}
        assert [(r.step, r.status, r.error) for r in store.steps(RUN, HASH)] == [
            (0, "done", None),
            (100, "failed", "RESOURCE_EXHAUSTED: out of memory"),
            (200, "failed", "RESOURCE_EXHAUSTED: out of memory"),
        ]

        store.write_batch(RUN, HASH, [toy_scores(100)])
        assert store.done_steps(RUN, HASH) == {0, 100}
        assert [(r.step, r.status, r.error) for r in store.steps(RUN, HASH)][1] == (100, "done", None)
        assert len(store.head_scores(RUN, step=100)) == TOY_COUNTS["head_scores"]

        # A failed recompute of a done step keeps its complete results.
        assert store.mark_failed(RUN, HASH, 0, "boom") == []
        assert store.done_steps(RUN, HASH) == {0, 100}
        assert len(store.head_scores(RUN, step=0)) == TOY_COUNTS["head_scores"]


def test_probe_hashes_are_kept_apart(tmp_path):
    with new_store(tmp_path / "s.sqlite", hashes=(HASH, OTHER_HASH)) as store:
        store.write_batch(RUN, HASH, [toy_scores(0), toy_scores(1)])
        store.write_batch(RUN, OTHER_HASH, [toy_scores(0, scale=4.0)])
        assert store.done_steps(RUN, HASH) == {0, 1}
        assert store.done_steps(RUN, OTHER_HASH) == {0}
        assert store.latest_probe_hash(RUN) == OTHER_HASH
        assert store.probe_hashes(RUN) == [HASH, OTHER_HASH]
        assert store.model_scores(RUN).tolist() == [(0, "icl_score", -2.0)]
        assert store.model_scores(RUN, probe_hash=HASH).tolist() == [(0, "icl_score", -0.5), (1, "icl_score", -0.5)]
        with pytest.raises(StoreError, match="no results for probe hash 'probe-c'"):
            store.model_scores(RUN, probe_hash="probe-c")


# --- atomicity -------------------------------------------------------------------------------


def test_a_batch_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    with new_store(path) as store:
        store.write_batch(RUN, HASH, [toy_scores(0)])
        store.mark_failed(RUN, HASH, 3, "earlier failure")
        before = table_counts(path)

        def curve_rows_then_crash(*args):
            yield from list(store_module._curve_rows(*args))[:1]
            raise RuntimeError("simulated crash after head, pair and model rows")

        curve_sql = store_module._INSERTS[3][0]
        monkeypatch.setattr(store_module, "_INSERTS", (*store_module._INSERTS[:3], (curve_sql, curve_rows_then_crash)))
        with pytest.raises(RuntimeError, match="simulated crash"):
            store.write_batch(RUN, HASH, [toy_scores(0, scale=2.0), toy_scores(3), toy_scores(4)])

        assert table_counts(path) == before
        assert store.done_steps(RUN, HASH) == {0}
        assert [(r.step, r.status, r.error) for r in store.steps(RUN)] == [(0, "done", None), (3, "failed", "earlier failure")]
        assert store.model_scores(RUN).tolist() == [(0, "icl_score", -0.5)]  # the old value, not -1.0

        # Bad input is refused before anything is written.
        monkeypatch.undo()
        with pytest.raises(ValueError, match="model score 'icl_score'"):
            store.write_batch(RUN, HASH, [toy_scores(5), CheckpointScores(step=6, model={"icl_score": "high"})])
        assert table_counts(path) == before


# --- crash safety: SIGKILL --------------------------------------------------------------------

# The writer: batches of 8 checkpoints, 12 x 12 heads, 15 metrics; every value of step s is s + 0.5
# except one NaN head per metric; a line on stdout after each commit. With "--hang" it stops
# inside its first batch after the head and pair rows and waits to be killed; its page cache is
# shrunk so that SQLite has already written changed pages into the store file by then.
WRITER = r"""
import sys, time
import numpy as np
import jaxinduct.results.store as S

path, first_step, hang = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["--hang"]

def scores(step):
    head = np.full((12, 12), step + 0.5)
    head[3, 4] = np.nan
    pair = np.full((2, 2, 2, 2), step + 0.5)
    pair[1] = np.nan  # src_layer >= dst_layer: not defined
    pair[0, :, 0] = np.nan
    return S.CheckpointScores(
        step=step, tokens_seen=step, seconds=0.0,
        head={f"m{i:02d}": head for i in range(15)},
        pair={"q_composition": pair},
        model={"icl_score": step + 0.5},
        curve={"per_token_loss": np.full(64, step + 0.5)},
    )

if hang:
    def stop_here(*args):
        print("inside", flush=True)
        time.sleep(60)
        yield from ()
    S._INSERTS = (*S._INSERTS[:2], (S._INSERTS[2][0], stop_here), S._INSERTS[3])

with S.ResultStore.open(path) as store:
    if hang:
        store._conn.execute("PRAGMA cache_size = 8")
    store.ensure_run("r", "src", "{}")
    store.record_probe_config("h", "{}")
    step = first_step
    while True:
        store.write_batch("r", "h", [scores(s) for s in range(step, step + 8)])
        print(step + 7, flush=True)
        step += 8
"""
# Rows per done checkpoint, by hand: 15 metrics x (144 - 1) heads; pairs only for src_layer 0 ->
# dst_layer 1 (2 x 2 heads); one model score; one curve.
WRITER_ROWS = {"head_scores": 15 * 143, "pair_scores": 4, "model_scores": 1, "curves": 1}


def start_writer(path: Path, first_step: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(first_step), *extra], stdout=subprocess.PIPE, text=True, env=env
    )


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()


def check_complete(path: Path) -> set[int]:
    """Integrity, and every done checkpoint has all of its rows with the right values; returns its done steps."""
    with ResultStore.open(path) as store:  # a writable open rolls a killed batch back
        done = store.done_steps("r", "h")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for table, n in WRITER_ROWS.items():
            if table == "pair_scores":
                counts = pair_values_by_step(conn)
            else:
                counts = dict(conn.execute(f"SELECT step, count(*) FROM {table} GROUP BY step"))
            assert counts == dict.fromkeys(done, n), table
        values = conn.execute("SELECT DISTINCT value - step FROM head_scores UNION SELECT value - step FROM model_scores")
        assert values.fetchall() == [(0.5,)]
    return done


def test_sigkill_mid_transaction_leaves_previous_batches(tmp_path):
    path = tmp_path / "s.sqlite"
    proc = start_writer(path, 0)
    assert proc.stdout.readline().strip() == "7"  # one batch committed
    kill(proc)
    committed = check_complete(path)

    before = path.read_bytes()
    proc = start_writer(path, 1000, "--hang")
    assert proc.stdout.readline().strip() == "inside"
    kill(proc)
    assert path.read_bytes() != before  # half a batch reached the file...
    assert Path(f"{path}-journal").exists()  # ...and its rollback journal holds the original pages
    with pytest.raises(StoreError, match="unfinished batch.*open it once for writing"):
        ResultStore.open(path, readonly=True)
    assert check_complete(path) == committed
    assert not Path(f"{path}-journal").exists()


def test_sigkill_at_random_instants(tmp_path):
    path = tmp_path / "s.sqlite"
    done: set[int] = set()
    for i, delay in enumerate((0.0, 0.05, 0.13, 0.31)):
        proc = start_writer(path, 10_000 * i)
        int(proc.stdout.readline())  # the first commit of this writer
        time.sleep(delay)
        kill(proc)
        now = check_complete(path)
        assert done < now  # earlier writers' checkpoints all survived, and this one added some
        done = now


# --- refusing files, read-only mode -----------------------------------------------------------


def assert_refused_untouched(path: Path, match: str) -> None:
    before = path.read_bytes()
    siblings = sorted(os.listdir(path.parent))
    for kwargs in ({}, {"readonly": True}, {"create": False}):
        with pytest.raises(StoreError, match=match) as info:
            ResultStore.open(path, **kwargs)
        assert isinstance(info.value, JaxInductError)
        assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == siblings  # no journal or other file left beside it


def test_other_schema_version_is_refused_untouched(tmp_path):
    path = tmp_path / "s.sqlite"
    with new_store(path) as store:
        store.write_batch(RUN, HASH, [toy_scores(0)])
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    assert_refused_untouched(path, rf"schema version {SCHEMA_VERSION + 1}.*reads version {SCHEMA_VERSION}.*--store NEW_PATH")


def test_non_sqlite_and_foreign_sqlite_files_are_refused_untouched(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("step,value\n1,0.5\n" * 20)
    assert_refused_untouched(text, "not a jaxinduct results store.*not an SQLite file")

    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE runs (name TEXT)")
    conn.close()
    assert_refused_untouched(foreign, "not a jaxinduct results store.*application_id 0x0")


def test_missing_store_is_created_only_when_asked(tmp_path):
    with pytest.raises(StoreError, match="no results store there"):
        ResultStore.open(tmp_path / "a.sqlite", readonly=True)
    with pytest.raises(StoreError, match="no results store there"):
        ResultStore.open(tmp_path / "a.sqlite", create=False)
    assert not (tmp_path / "a.sqlite").exists()
    with ResultStore.open(tmp_path / "deep" / "b.sqlite") as store:
        assert store.runs() == []
    with ResultStore.open(tmp_path / "deep" / "b.sqlite", create=False) as store:  # reopens as a store
        assert store.runs() == []


def test_readonly_open_never_writes(tmp_path):
    path = tmp_path / "s.sqlite"
    with new_store(path) as store:
        store.write_batch(RUN, HASH, [toy_scores(0)])
    before, siblings = path.read_bytes(), sorted(os.listdir(tmp_path))
    with ResultStore.open(path, readonly=True) as store:
        assert store.done_steps(RUN, HASH) == {0}
        for write in (
            lambda: store.write_batch(RUN, HASH, [toy_scores(1)]),
            lambda: store.mark_failed(RUN, HASH, 1, "x"),
            lambda: store.ensure_run("new", "src", "{}"),
        ):
            with pytest.raises(StoreError, match="read-only"):
                write()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == siblings


# --- export ------------------------------------------------------------------------------------


@pytest.fixture
def two_run_store(tmp_path):
    path = tmp_path / "s.sqlite"
    with new_store(path, runs=("a", "b"), hashes=(HASH, OTHER_HASH)) as store:
        store.write_batch("a", HASH, [toy_scores(1)])
        store.write_batch("a", OTHER_HASH, [toy_scores(2, scale=2.0)])  # a's latest probe hash
        store.write_batch("b", HASH, [CheckpointScores(step=7, head={"copying": [[0.5]]}, model={"icl_score": 0.25})])
    with ResultStore.open(path, readonly=True) as store:
        yield store


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_export_csv_columns_and_values(two_run_store, tmp_path):
    out = tmp_path / "out" / "model.csv"
    assert export(two_run_store, "model", "csv", out) == 2
    assert read_csv(out) == [
        ["run", "step", "metric", "value"],
        ["a", "2", "icl_score", "-1"],  # shortest round-trip form
        ["b", "7", "icl_score", "0.25"],
    ]

    assert export(two_run_store, "heads", "csv", out.with_name("heads.csv"), run="a", probe_hash=HASH) == 5
    assert read_csv(out.with_name("heads.csv")) == [
        ["run", "step", "layer", "head", "metric", "value"],
        ["a", "1", "0", "0", "prefix_matching", "0.5"],
        ["a", "1", "1", "0", "prefix_matching", "0.25"],
        ["a", "1", "1", "1", "prefix_matching", "1"],
        ["a", "1", "0", "0", "previous_token", "0.125"],
        ["a", "1", "0", "1", "previous_token", "0"],
    ]

    assert export(two_run_store, "pairs", "csv", out.with_name("pairs.csv"), run="b") == 0
    pairs_header = ["run", "step", "kind", "src_layer", "src_head", "dst_layer", "dst_head", "value"]
    assert read_csv(out.with_name("pairs.csv")) == [pairs_header]
    assert sorted(os.listdir(out.parent)) == ["heads.csv", "model.csv", "pairs.csv"]  # no temporary files left


def test_csv_pairs_read_back_exactly_with_any_run_name(tmp_path):
    values = np.full((2, 2, 2, 2), np.nan, np.float32)
    values[0, :, 1, :] = [[1e-5, 1 / 3], [-2.5e20, 0.1]]  # float32: 1/3 and 0.1 are not short in decimal
    name = 'run, "quoted"'
    with ResultStore.open(tmp_path / "s.sqlite") as store:
        store.ensure_run(name, "/src", json.dumps({}))
        store.record_probe_config(HASH, json.dumps({}))
        store.write_batch(name, HASH, [CheckpointScores(step=3, pair={"k_composition": values})])
        assert export(store, "pairs", "csv", tmp_path / "p.csv") == 4
    header, *rows = read_csv(tmp_path / "p.csv")
    assert header == ["run", "step", "kind", "src_layer", "src_head", "dst_layer", "dst_head", "value"]
    assert [r[:7] for r in rows] == [[name, "3", "k_composition", "0", str(h), "1", str(d)] for h in (0, 1) for d in (0, 1)]
    # Every stored float32 value comes back exactly (read as a double, narrowed).
    assert [np.float32(float(r[7])) for r in rows] == [np.float32(v) for v in (1e-5, 1 / 3, -2.5e20, 0.1)]


def test_export_a_parquet_dataset_partitioned_by_run_and_step(tmp_path):
    ds = pytest.importorskip("pyarrow.dataset")
    path = tmp_path / "s.sqlite"
    runs = ("a", "b/odd name")  # a run name that is not a plain path segment
    with new_store(path, runs=runs, hashes=(HASH,)) as store:
        for run in runs:
            store.write_batch(run, HASH, [toy_scores(1), toy_scores(3, scale=2.0)])
    out = tmp_path / "pairs"
    with ResultStore.open(path, readonly=True) as store:
        flat = [tuple(row) for chunk in store.score_rows("pair_scores", ["step", "kind", "src_layer", "src_head",
                                                                         "dst_layer", "dst_head", "value"], "a", HASH)
                for row in chunk]  # fmt: skip
        assert export(store, "pairs", "parquet", out, partition=True) == 4 * TOY_COUNTS["pair_scores"]
        assert export(store, "pairs", "parquet", out, partition=True) == 4 * TOY_COUNTS["pair_scores"]  # replaces it
        with pytest.raises(StoreError, match="--format parquet"):
            export(store, "pairs", "csv", tmp_path / "x", partition=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == [
        "run=a/step=1/part-0.parquet", "run=a/step=3/part-0.parquet",
        "run=b%2Fodd%20name/step=1/part-0.parquet", "run=b%2Fodd%20name/step=3/part-0.parquet",
    ]  # fmt: skip
    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    rows = dataset.to_table().to_pylist()
    assert len(rows) == 4 * TOY_COUNTS["pair_scores"]
    mine = sorted((r["step"], r["kind"], r["src_layer"], r["src_head"], r["dst_layer"], r["dst_head"], r["value"])
                  for r in rows if r["run"] == "a")  # fmt: skip
    assert mine == sorted(flat)
    assert {r["run"] for r in rows} == set(runs)  # the readers decode the percent-encoded names
    assert sorted(os.listdir(tmp_path)) == ["pairs", "s.sqlite"]  # no temporary directories left


def test_export_parquet_columns_types_and_values(two_run_store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "pairs.parquet"
    assert export(two_run_store, "pairs", "parquet", out, run="a") == 4
    table = pq.read_table(out)
    assert table.column_names == ["run", "step", "kind", "src_layer", "src_head", "dst_layer", "dst_head", "value"]
    assert [str(t) for t in table.schema.types] == ["string", "int64", "string", "int64", "int64", "int64", "int64", "double"]
    assert table.to_pylist()[0] == {
        "run": "a",
        "step": 2,
        "kind": "k_composition",
        "src_layer": 0,
        "src_head": 0,
        "dst_layer": 1,
        "dst_head": 0,
        "value": 1.5,
    }
    assert [row["value"] for row in table.to_pylist()] == [1.5, 1.0, 0.5, 4.0]

    export(two_run_store, "heads", "parquet", tmp_path / "heads.parquet", probe_hash=HASH)
    heads = pq.read_table(tmp_path / "heads.parquet")
    assert heads.column_names == ["run", "step", "layer", "head", "metric", "value"]
    assert heads.to_pylist()[-1] == {"run": "b", "step": 7, "layer": 0, "head": 0, "metric": "copying", "value": 0.5}
    assert heads.num_rows == 5 + 1

    export(two_run_store, "model", "parquet", tmp_path / "model.parquet")
    assert pq.read_table(tmp_path / "model.parquet").to_pydict() == {
        "run": ["a", "b"], "step": [2, 7], "metric": ["icl_score", "icl_score"], "value": [-1.0, 0.25],
    }


def test_export_refuses_unknown_choices(two_run_store, tmp_path):
    with pytest.raises(StoreError, match="unknown export table 'head'"):
        export(two_run_store, "head", "csv", tmp_path / "x.csv")
    with pytest.raises(StoreError, match="unknown export format 'xlsx'"):
        export(two_run_store, "heads", "xlsx", tmp_path / "x.xlsx")
    with pytest.raises(StoreError, match="no run 'c'"):
        export(two_run_store, "heads", "csv", tmp_path / "x.csv", run="c")
    assert not (tmp_path / "x.csv").exists()


# --- size (speed is measured by bench/, never timed in a test) -----------------------------------


def test_a_large_batch_is_written_whole(tmp_path):
    """64 checkpoints x 144 heads x 15 metrics (138,240 rows) per transaction, written twice."""
    rng = np.random.default_rng(0)
    batch = [
        CheckpointScores(step=s, head={f"metric_{m}": rng.random((12, 12), dtype=np.float32) for m in range(15)})
        for s in range(64)
    ]
    with new_store(tmp_path / "s.sqlite") as store:
        for _ in range(2):
            store.write_batch(RUN, HASH, batch)
        assert len(store.head_scores(RUN, "metric_3")) == 64 * 144
        assert len(store.head_scores(RUN)) == 64 * 144 * 15


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_without_pyarrow_is_a_clear_error(two_run_store, tmp_path, monkeypatch, fmt):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    with pytest.raises(StoreError, match="export needs pyarrow.*pip install pyarrow"):
        export(two_run_store, "heads", fmt, tmp_path / f"x.{fmt}")
    assert os.listdir(tmp_path) == ["s.sqlite"]


def test_the_store_does_not_import_jax():
    code = "import sys, jaxinduct.results.store; assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')]"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


# --- packed pair scores and the migration from schema version 1 ---------------------------------

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "store_schema_v1.sqlite"


def test_packed_pair_scores_read_back_equal_to_what_was_written(tmp_path):
    rng = np.random.default_rng(1)
    forward = np.broadcast_to(np.arange(4)[:, None, None, None] < np.arange(4)[None, None, :, None], (4, 3, 4, 3))
    written = {
        "q_composition": np.where(forward, rng.random((4, 3, 4, 3)).astype(np.float32), np.nan),
        "k_composition": np.where(forward, rng.random((4, 3, 4, 3)), np.nan),  # float64 values: kept exactly
    }
    with ResultStore.open(tmp_path / "s.sqlite") as store:
        store.ensure_run(RUN, "src", "{}")
        store.record_probe_config(HASH, "{}")
        store.write_batch(RUN, HASH, [CheckpointScores(step=5, pair=written)])
        rows = store.pair_scores(RUN)
        streamed = [r for chunk in store.score_rows("pair_scores", ["step", "kind", "src_layer", "src_head",
                                                                   "dst_layer", "dst_head", "value"], RUN, HASH)
                    for r in chunk]  # fmt: skip
    for kind, array in written.items():
        mine = rows[rows["kind"] == kind]
        expected = np.argwhere(forward)  # C order: the key order readers promise
        np.testing.assert_array_equal(np.stack([mine[a] for a in ("src_layer", "src_head", "dst_layer", "dst_head")], 1), expected)
        np.testing.assert_array_equal(mine["value"], np.asarray(array, np.float64)[forward])
        assert (mine["step"] == 5).all()
    assert streamed == [tuple(r) for r in rows.tolist()]
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        assert dict(conn.execute("SELECT kind, dtype FROM pair_arrays")) == {"q_composition": "<f4", "k_composition": "<f8"}


def v1_rows(path: Path) -> dict[str, list[tuple]]:
    """Every score row of a schema-1 store, read with plain sqlite3 (pairs one row per value)."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        return {
            "pairs": sorted(conn.execute("SELECT probe_hash, step, kind, src_layer, src_head, dst_layer, dst_head, value "
                                         "FROM pair_scores")),  # fmt: skip
            "heads": sorted(conn.execute("SELECT * FROM head_scores")),
            "models": sorted(conn.execute("SELECT * FROM model_scores")),
            "curves": sorted(conn.execute("SELECT * FROM curves")),
            "checkpoints": sorted(conn.execute("SELECT run, step, probe_hash, status, error, tokens_seen FROM checkpoints")),
        }


@pytest.mark.parametrize("readonly", [False, True])
def test_a_schema_1_store_migrates_in_place_value_for_value(tmp_path, readonly):
    path = tmp_path / "old.sqlite"
    shutil.copy(FIXTURE_V1, path)
    before = v1_rows(path)
    assert len(before["pairs"]) > 0 and any(r[-1] == 0.1 for r in before["pairs"])  # a float64-only value too
    with ResultStore.open(path, readonly=readonly) as store:
        migrated = [
            (probe_hash, *row) for probe_hash in sorted(store.probe_hashes("toy"))
            for row in store.pair_scores("toy", probe_hash=probe_hash).tolist()
        ]  # fmt: skip
    assert sorted(migrated) == before["pairs"]  # every value, bit for bit
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'pair_scores'").fetchone()[0] == 0
        assert sorted(conn.execute("SELECT * FROM head_scores")) == before["heads"]
        assert sorted(conn.execute("SELECT * FROM model_scores")) == before["models"]
        assert sorted(conn.execute("SELECT * FROM curves")) == before["curves"]
        assert sorted(conn.execute("SELECT run, step, probe_hash, status, error, tokens_seen FROM checkpoints")) == before["checkpoints"]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    with ResultStore.open(path) as store:  # opening again changes nothing
        assert store.done_steps("toy", "a" * 16) == {0, 100, 200}


def test_a_schema_1_store_that_cannot_be_written_is_refused_unchanged(tmp_path):
    path = tmp_path / "old.sqlite"
    shutil.copy(FIXTURE_V1, path)
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as a user who can write read-only files (root)")
        with pytest.raises(StoreError, match="migrated once where it can be written|cannot migrate"):
            ResultStore.open(path, readonly=True)
        assert v1_rows(path)["pairs"]
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)
