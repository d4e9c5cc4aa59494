"""The scan engine, end to end: trajectories made in tmp_path, scanned into stores.

Expected values come from `score_all` called directly on the same weights (the kernels'
own tests establish those), never from the store or the engine under test.
"""

import csv
import dataclasses
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxinduct.cli import main as cli_main
from jaxinduct.scores.probes import ProbeConfig, make_probes
from jaxinduct.engine.loader import RestoreGate, prefetched, resolve_load_workers, restores_needed
from jaxinduct.engine.scan import ScanConfig as ScanOptions, resolve_per_pass, scan
from jaxinduct.engine.watch import watch
from jaxinduct.parallel import parse_mesh
from jaxinduct.scores import batched
from jaxinduct.scores.batched import HEAD_SCORE_NAMES, PUBLIC_SCORE_NAMES, score_all
from jaxinduct.checkpoints import LoadedCheckpoint, OrbaxSource, select_steps
from jaxinduct.results.store import ResultStore
from jaxinduct.checkpoints.layout import META, PARAMS, save_canonical_step, writer_options
from jaxinduct.model.weights import ModelSpec, init_random_weights, stack_weights

REPO = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(d_vocab=40, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=40, bos_token_id=0)
PROBE = ProbeConfig(n_examples=2, block_len=9, n_repeats=4)  # 37 tokens: fits n_ctx 40
PROBE_ARGS = ["--examples", "2", "--block-len", "9", "--repeats", "4"]
STEPS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def checkpoint_weights(step):
    return init_random_weights(SPEC, step)


def write_trajectory(directory, steps):
    with ocp.CheckpointManager(directory, options=writer_options(), item_names=(PARAMS, META)) as manager:
        for step in steps:
            save_canonical_step(manager, step, checkpoint_weights(step), {"tokens_seen": step * 1000})
        manager.wait_until_finished()
    return directory


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    return write_trajectory(tmp_path_factory.mktemp("traj") / "run-a", STEPS)


def expected_scores(steps, config=PROBE):
    probes = make_probes(SPEC, config)
    return score_all(stack_weights([checkpoint_weights(s) for s in steps]), probes)


def store_head_values(path, metric, run="run-a"):
    with ResultStore.open(path, create=False, readonly=True) as store:
        steps, grid = store.head_score_grid(run, metric)
    return steps, grid


def table_rows(path):
    """Every row of every score table, sorted: a canonical dump to compare stores."""
    with sqlite3.connect(path) as conn:
        dump = {}
        for table in ("head_scores", "model_scores"):
            dump[table] = sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
        # Pair scores are packed one array per (checkpoint, kind): one row per defined value here.
        dump["pair_scores"] = sorted(
            (run, step, probe_hash, kind, *map(int, index), float(values[index]))
            for run, step, probe_hash, kind, layers, heads, dtype, packed in conn.execute(
                "SELECT run, step, probe_hash, kind, layers, heads, dtype, packed FROM pair_arrays"
            )
            for values in [np.frombuffer(packed, dtype).reshape(layers, heads, layers, heads)]
            for index in zip(*np.nonzero(~np.isnan(values)))
        )
        dump["curves"] = sorted(conn.execute("SELECT run, step, probe_hash, metric, layer, head, values_f32 FROM curves"))
        dump["checkpoints"] = sorted(conn.execute("SELECT run, step, probe_hash, status FROM checkpoints"))
    return dump


def assert_same_stores(a, b, tol=1e-6):
    x, y = table_rows(a), table_rows(b)
    assert x["checkpoints"] == y["checkpoints"]
    for table in ("head_scores", "pair_scores", "model_scores"):
        assert len(x[table]) == len(y[table]), table
        keys_x = [r[:-1] for r in x[table]]
        assert keys_x == [r[:-1] for r in y[table]], table
        np.testing.assert_allclose([r[-1] for r in x[table]], [r[-1] for r in y[table]], rtol=tol, atol=tol, err_msg=table)
    assert [r[:-1] for r in x["curves"]] == [r[:-1] for r in y["curves"]]
    for rx, ry in zip(x["curves"], y["curves"]):
        np.testing.assert_allclose(np.frombuffer(rx[-1], "<f4"), np.frombuffer(ry[-1], "<f4"), rtol=tol, atol=tol)


# --- end to end ----------------------------------------------------------------------------------


def test_scan_show_export_give_the_kernel_scores_for_every_step(trajectory, tmp_path, capsys):
    store = tmp_path / "results.sqlite"
    assert cli_main(["scan", str(trajectory), "--store", str(store), "--batch", "8", "--no-progress", *PROBE_ARGS]) == 0
    expected = expected_scores(STEPS)
    for metric in ("prefix_matching", "ov_copying", "copying", "induction_behaviour"):
        steps, grid = store_head_values(store, metric)
        assert list(steps) == STEPS
        np.testing.assert_allclose(grid, np.asarray(expected.head[metric]), rtol=1e-6, atol=1e-6, err_msg=metric)
    with ResultStore.open(store, readonly=True) as results:
        model = results.model_scores("run-a", "induction_loss")
        np.testing.assert_allclose(model["value"], np.asarray(expected.model["induction_loss"]), rtol=1e-6)
        pairs = results.pair_scores("run-a", "k_composition", step=30)
        assert len(pairs) == 2 * 2  # layer 0 -> layer 1 pairs only
        for row in pairs:
            want = expected.pair["k_composition"][3, row["src_layer"], row["src_head"], row["dst_layer"], row["dst_head"]]
            assert row["value"] == pytest.approx(float(want), rel=1e-6, abs=1e-6)
        records = {r.step: r for r in results.steps("run-a")}
        assert records[30].tokens_seen == 30_000 and records[30].status == "done"

    capsys.readouterr()
    assert cli_main(["show", "--store", str(store), "--metric", "prefix_matching"]) == 0
    shown = capsys.readouterr().out
    assert "run-a" in shown and "L1H" in shown

    out_csv, out_parquet = tmp_path / "heads.csv", tmp_path / "heads.parquet"
    assert cli_main(["export", "--store", str(store), "--table", "heads", "--format", "csv", "--out", str(out_csv)]) == 0
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "step", "layer", "head", "metric", "value"]
    row = next(r for r in rows if r["step"] == "40" and r["metric"] == "ov_copying" and r["layer"] == "1" and r["head"] == "0")
    assert float(row["value"]) == pytest.approx(float(expected.head["ov_copying"][4, 1, 0]), rel=1e-6)
    assert cli_main(["export", "--store", str(store), "--table", "pairs", "--format", "parquet", "--out", str(out_parquet)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out_parquet)
    assert table.column_names == ["run", "step", "kind", "src_layer", "src_head", "dst_layer", "dst_head", "value"]
    assert cli_main(["export", "--store", str(store), "--table", "model", "--format", "csv", "--out", str(tmp_path / "m.csv")]) == 0
    with open(tmp_path / "m.csv") as f:
        assert next(csv.reader(f)) == ["run", "step", "metric", "value"]


def test_rescan_is_idempotent_and_a_new_step_is_the_only_work(trajectory, tmp_path):
    store = tmp_path / "s.sqlite"
    options = ScanOptions(source=str(trajectory), store=str(store), probe=PROBE, steps="0:50", batch=4, mesh="ckpt=4,head=2", progress=False)
    first = scan(options)
    assert (first.scanned, first.already_done) == (6, 0)
    before = table_rows(store)
    again = scan(options)
    assert (again.scanned, again.already_done) == (0, 6)
    assert table_rows(store) == before
    more = scan(ScanOptions(**{**options.__dict__, "steps": "0:60"}))
    assert (more.scanned, more.already_done) == (1, 6)


def test_dataset_scores_and_score_selection(trajectory, tmp_path):
    dataset = np.random.default_rng(0).integers(1, SPEC.d_vocab, size=(2, 30))
    np.save(tmp_path / "d.npy", dataset)
    config = ProbeConfig(n_examples=2, block_len=9, n_repeats=4, icl_late=20, icl_early=5)
    store = tmp_path / "s.sqlite"
    scan(ScanOptions(source=str(trajectory), store=str(store), probe=config, steps="20,30", dataset=str(tmp_path / "d.npy"), progress=False))
    expected = score_all(stack_weights([checkpoint_weights(20), checkpoint_weights(30)]), make_probes(SPEC, config, dataset=dataset))
    with ResultStore.open(store, readonly=True) as results:
        icl = results.model_scores("run-a", "icl_score")
        np.testing.assert_allclose(icl["value"], np.asarray(expected.model["icl_score"]), rtol=1e-5)
        curves = {(c.step, c.metric, c.layer, c.head): c.values for c in results.curves("run-a")}
        np.testing.assert_allclose(curves[(30, "per_token_loss", -1, -1)], expected.curve["per_token_loss"][1], rtol=1e-6)
        np.testing.assert_allclose(
            curves[(20, "ablation_per_token_loss_delta", 1, 0)], expected.head_curve["ablation_per_token_loss_delta"][0, 1, 0],
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
    # Keeping two scores: only those are stored, under another probe hash (the results differ).
    only = tmp_path / "only.sqlite"
    scan(ScanOptions(source=str(trajectory), store=str(only), probe=PROBE, steps="20", scores=("prefix_matching", "k_composition"), progress=False))
    with ResultStore.open(only, readonly=True) as results:
        assert set(results.head_scores("run-a")["metric"]) == {"prefix_matching"}
        assert set(results.pair_scores("run-a")["kind"]) == {"k_composition"}
        assert len(results.model_scores("run-a")) == 0


def test_public_names_are_what_score_all_returns():
    dataset = np.random.default_rng(0).integers(1, SPEC.d_vocab, size=(2, 30))
    config = ProbeConfig(n_examples=2, block_len=9, n_repeats=4, icl_late=20, icl_early=5)
    results = score_all(stack_weights([checkpoint_weights(0)]), make_probes(SPEC, config, dataset=dataset))
    assert set(results.head) == HEAD_SCORE_NAMES
    returned = set(results.head) | set(results.pair) | set(results.model) | set(results.curve) | set(results.head_curve)
    assert returned == PUBLIC_SCORE_NAMES


def test_nnx_layout_from_the_trainer(tmp_path):
    from jaxinduct.train.trainer import get_preset, train

    out = tmp_path / "tiny"
    train(get_preset("tiny"), out, progress=False)  # ctx 32, vocab 16
    config = ProbeConfig(n_examples=2, block_len=7, n_repeats=4)
    store = tmp_path / "s.sqlite"
    summary = scan(ScanOptions(source=str(out), store=str(store), probe=config, progress=False))
    source = OrbaxSource.open(out)
    assert summary.scanned == len(source.steps()) and summary.failed == 0
    last = source.steps()[-1]
    expected = score_all(stack_weights([source.load(last).weights]), make_probes(source.spec(), config))
    with ResultStore.open(store, readonly=True) as results:
        steps, grid = results.head_score_grid("tiny", "prefix_matching")
    np.testing.assert_allclose(grid[-1], expected.head["prefix_matching"][0], rtol=1e-6, atol=1e-6)


# Orbax's failed restore leaves a tensorstore callback that fires after its event loop
# closed ("Event loop is closed"): noise from inside Orbax, not a jaxinduct error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_unreadable_checkpoint_is_recorded_as_failed_and_the_scan_goes_on(tmp_path):
    directory = write_trajectory(tmp_path / "run-a", [0, 10, 20])
    for array_file in (directory / "10" / PARAMS).rglob("*"):
        if array_file.is_file() and array_file.stat().st_size > 0 and "ocdbt" in str(array_file) and "manifest" not in array_file.name:
            array_file.write_bytes(b"\0" * 7)  # corrupt the array data, keep the metadata
    store = tmp_path / "s.sqlite"
    summary = scan(ScanOptions(source=str(directory), store=str(store), probe=PROBE, progress=False))
    assert summary.scanned == 2 and summary.failed == 1 and summary.failures[0][0] == 10
    with ResultStore.open(store, readonly=True) as results:
        status = {r.step: (r.status, r.error) for r in results.steps("run-a")}
    assert status[0][0] == status[20][0] == "done" and status[10][0] == "failed" and status[10][1]


# --- compile once ----------------------------------------------------------------------------


class MemorySource:
    """A CheckpointSource of weights held in memory (no I/O): isolates the batcher."""

    description = "memory"

    def __init__(self, steps):
        self._steps = steps

    def steps(self):
        return self._steps

    def spec(self, step=None):
        return SPEC

    def close(self):
        pass

    def load(self, step):
        return LoadedCheckpoint(step=step, weights=jax.tree_util.tree_map(np.asarray, init_random_weights(SPEC, step % 3)), tokens_seen=None)


def test_a_scan_of_200_checkpoints_compiles_once(tmp_path, monkeypatch):
    import jaxinduct.engine.scan as engine

    source = MemorySource(list(range(200)))
    monkeypatch.setattr(engine, "open_source", lambda path, **options: source)
    compiles = []
    real_compile = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: compiles.append(1) or real_compile(self, *a, **k))
    monkeypatch.setattr(batched, "_PROGRAMS", {})  # nothing compiled by an earlier test
    options = ScanOptions(source="memory", store=str(tmp_path / "s.sqlite"), run="mem", probe=PROBE, batch=16, progress=False)
    summary = scan(options)
    assert summary.scanned == 200  # 12 full batches and a padded one of 8
    assert len(compiles) == 1 and summary.compile_seconds > 0
    # A second scan of the same shape in this process (a watch poll) compiles nothing.
    again = scan(dataclasses.replace(options, store=str(tmp_path / "t.sqlite")))
    assert again.scanned == 200 and len(compiles) == 1 and again.compile_seconds == 0


def test_batches_are_written_on_the_writer_thread_and_a_write_error_stops_the_scan(tmp_path, monkeypatch):
    import jaxinduct.engine.scan as engine
    from jaxinduct.results.store import ResultStore, StoreError

    monkeypatch.setattr(engine, "open_source", lambda path, **options: MemorySource(list(range(24))))
    real_write = ResultStore.write_batch
    writes = []

    def write_batch(self, run, probe_hash, batch):
        writes.append(threading.current_thread().name)
        if len(writes) == 2:
            raise StoreError("disk full (simulated)")
        return real_write(self, run, probe_hash, batch)

    monkeypatch.setattr(ResultStore, "write_batch", write_batch)
    stored = []
    options = ScanOptions(source="memory", store=str(tmp_path / "s.sqlite"), run="mem", probe=PROBE, batch=8, progress=False)
    with pytest.raises(StoreError, match="simulated"):
        scan(options, on_batch=stored.append)
    assert writes and all(name.startswith("store-writer") for name in writes)
    assert stored == [list(range(8))]  # on_batch only for what was stored, in the caller's thread
    with ResultStore.open(tmp_path / "s.sqlite", readonly=True) as store:
        assert store.done_steps("mem", store.latest_probe_hash("mem")) == set(range(8))


# --- crash safety ----------------------------------------------------------------------------


def _scan_command(trajectory, store, *extra):
    return [sys.executable, "-m", "jaxinduct", "scan", str(trajectory), "--store", str(store), "--batch", "2",
            "--no-progress", *PROBE_ARGS, *extra]  # fmt: skip


def _done_count(store):
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=0.1) as conn:
            return conn.execute("SELECT count(*) FROM checkpoints WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_scan_killed_at_any_point_resumes_to_the_uninterrupted_result(trajectory, tmp_path):
    clean = tmp_path / "clean.sqlite"
    subprocess.run(_scan_command(trajectory, clean), check=True, capture_output=True, cwd=REPO)
    killed = tmp_path / "killed.sqlite"
    # Kill points: while starting up or compiling, after 1 batch, after 3 batches (all mid-run).
    for kill_after_done in (0, 2, 6):
        process = subprocess.Popen(_scan_command(trajectory, killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _done_count(killed) < kill_after_done and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if kill_after_done == 0:
            time.sleep(2.0)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert _done_count(killed) < len(STEPS), "the scan finished before it could be killed"
    subprocess.run(_scan_command(trajectory, killed), check=True, capture_output=True, cwd=REPO)
    with sqlite3.connect(killed) as conn:
        steps = [r[0] for r in conn.execute("SELECT step FROM checkpoints ORDER BY step")]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert steps == STEPS  # every step exactly once
    assert_same_stores(killed, clean, tol=0.0)  # bit-identical values


# --- watch -----------------------------------------------------------------------------------


def test_watch_scans_checkpoints_written_while_it_runs(tmp_path):
    directory = tmp_path / "live"
    store = tmp_path / "s.sqlite"
    written = [0, 5, 10, 15]

    def trainer():
        with ocp.CheckpointManager(directory, options=writer_options(), item_names=(PARAMS, META)) as manager:
            for step in written:
                time.sleep(0.5)
                save_canonical_step(manager, step, checkpoint_weights(step), {"tokens_seen": step})
                manager.wait_until_finished()

    thread = threading.Thread(target=trainer)
    directory.mkdir()
    thread.start()
    try:
        options = ScanOptions(source=str(directory), store=str(store), probe=PROBE, progress=False)
        summary = watch(options, poll_seconds=0.2, until_step=15, idle_timeout=60, log=lambda line: None)
    finally:
        thread.join()
    assert summary.scanned == len(written)
    with ResultStore.open(store, readonly=True) as results:
        assert [r.step for r in results.steps("live")] == written
    assert cli_main(["watch", str(directory), "--store", str(store), "--idle-timeout", "0", "--poll", "0.1", "--no-progress", *PROBE_ARGS]) == 0


def test_watch_reports_a_broken_checkpoint_once_and_still_ends(tmp_path):
    # A committed checkpoint that cannot be read stays unreadable: watch records it as
    # failed once, instead of retrying it every poll (which kept its idle timer from ever
    # running out), and --until-step on that very step ends with the failure.
    directory = write_trajectory(tmp_path / "run-b", [0, 10, 20])
    for array_file in (directory / "10" / PARAMS).rglob("*"):
        if array_file.is_file() and array_file.stat().st_size > 0 and "ocdbt" in str(array_file) and "manifest" not in array_file.name:
            array_file.write_bytes(b"\0" * 7)
    options = ScanOptions(source=str(directory), store=str(tmp_path / "s.sqlite"), probe=PROBE, progress=False)
    for until_step, idle_timeout in ((None, 1.0), (10, None)):
        lines: list[str] = []
        ended: list = []
        thread = threading.Thread(
            target=lambda: ended.append(watch(options, poll_seconds=0.1, until_step=until_step, idle_timeout=idle_timeout, log=lines.append)),
            daemon=True,
        )
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), f"watch did not end: {lines[-3:]}"
        summary = ended[0]
        assert summary.failed == 1 and summary.failures[0][0] == 10, lines
        assert sum("step 10" in line and "failed" in line for line in lines) == 1, lines


# --- devices and processes -------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_device_eight_devices_and_two_processes_give_equal_stores(trajectory, tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (conftest sets 8 CPU devices)")
    worker = [sys.executable, str(REPO / "tests" / "scan_worker.py")]
    scan_args = lambda store: [str(trajectory), "--store", str(store), "--batch", "8", "--no-progress", *PROBE_ARGS]  # noqa: E731
    one = tmp_path / "one.sqlite"
    subprocess.run([*worker, "1", "--", *scan_args(one)], check=True, capture_output=True, cwd=REPO)
    eight = tmp_path / "eight.sqlite"
    assert cli_main(["scan", *scan_args(eight), "--mesh", "ckpt=4,head=2"]) == 0
    two = tmp_path / "two.sqlite"
    port = _free_port()
    processes = [
        subprocess.Popen(
            [*worker, "4", "--process", str(i), "--processes", "2", "--port", str(port), "--", *scan_args(two)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert_same_stores(eight, one)
    assert_same_stores(two, one)


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_and_leaves_the_store_untouched(trajectory, tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    assert cli_main(["scan", str(trajectory), "--store", str(store), "--steps", "0", "--no-progress", *PROBE_ARGS]) == 0
    original = store.read_bytes()

    def fails(args, *phrases):
        capsys.readouterr()
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        for phrase in phrases:
            assert phrase in err, err
        assert store.read_bytes() == original

    not_a_trajectory = tmp_path / "empty"
    not_a_trajectory.mkdir()
    fails(["scan", str(not_a_trajectory), "--store", str(store)], "holds no committed checkpoint", "Orbax CheckpointManager")
    fails(["scan", str(tmp_path / "missing"), "--store", str(store)], "does not exist")
    fails(["scan", str(trajectory), "--store", str(store), "--steps", "5000:6000", *PROBE_ARGS], "selects none of the committed steps")
    fails(["scan", str(trajectory), "--store", str(store), "--steps", "7", *PROBE_ARGS], "step 7 is not a committed step")
    fails(["scan", str(trajectory), "--store", str(store), "--mesh", "ckpt=3", *PROBE_ARGS], "--mesh", "8 are present")
    fails(["scan", str(trajectory), "--store", str(store), "--batch", "6", *PROBE_ARGS], "multiple of the mesh's ckpt axis")
    fails(["scan", str(trajectory), "--store", str(store), "--scores", "prefix_matchin", *PROBE_ARGS], "unknown score names")
    fails(["scan", str(trajectory), "--store", str(store), "--load-workers", "0", *PROBE_ARGS], "--load-workers must be a positive integer")
    fails(["scan", str(trajectory), "--store", str(store)], "probe has 101 tokens but the model's context is 40")

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("PRAGMA application_id = 1246645828")  # a jaxinduct store ...
        conn.execute("PRAGMA user_version = 99")  # ... of a future schema
        conn.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    capsys.readouterr()
    assert cli_main(["scan", str(trajectory), "--store", str(other), "--no-progress", *PROBE_ARGS]) == 2
    assert "version" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_cpu_and_accelerator_defaults_for_restore_threads_and_checkpoints_per_pass(monkeypatch):
    # On the CPU backend the same cores restore and score: half of them restore (at most 4).
    cpu = parse_mesh(None)
    for cores, expected in ((1, 1), (2, 1), (6, 3), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert resolve_load_workers(None, cpu) == expected
    assert resolve_load_workers(7, cpu) == 7
    assert resolve_per_pass("auto", cpu) == 1

    class Accelerator:  # only the platform is read
        platform = "gpu"

    gpu = types.SimpleNamespace(devices=np.array([Accelerator()], dtype=object))
    assert resolve_load_workers(None, gpu) == 4
    assert resolve_per_pass("auto", gpu) is None


def test_concurrent_restores_follow_the_measured_times():
    # A batch of 8 rows must be restored within one batch's compute.
    assert restores_needed(8, restore_seconds=1.0, compute_seconds=2.0, cap=4) == 4
    assert restores_needed(8, restore_seconds=0.5, compute_seconds=2.0, cap=4) == 2
    assert restores_needed(8, restore_seconds=0.1, compute_seconds=2.0, cap=4) == 1
    assert restores_needed(8, restore_seconds=0.0, compute_seconds=2.0, cap=4) == 4  # nothing measured yet

    class SlowSource:
        running = peak = 0
        lock = threading.Lock()

        def load(self, step):
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            time.sleep(0.02)
            with self.lock:
                self.running -= 1
            return step

    source = SlowSource()
    gate = RestoreGate(4)
    got = []
    for index, (steps, restored) in enumerate(prefetched(source, [[0, 1, 2, 3]] * 4, range(4), 4, gate)):
        got += [restored[r].checkpoint for r in range(4)]
        gate.set_limit(1)  # one at a time from here (the next batch may already have started)
        if index == 1:  # batches 2 and 3 were submitted under the limit of 1
            source.peak = 0
    assert got == [0, 1, 2, 3] * 4
    assert source.peak == 1


def test_restores_of_the_next_batch_start_ahead_or_only_when_asked():
    class RecordingSource:
        def __init__(self):
            self.started, self.lock = [], threading.Lock()

        def load(self, step):
            with self.lock:
                self.started.append(step)
            return step

    def started_by_first_yield(ahead):
        source = RecordingSource()
        batches_of_steps = [[0, 1], [10, 11], [20, 21]]
        iterator = prefetched(source, batches_of_steps, range(2), 2, ahead=ahead)
        steps, restored = next(iterator)
        assert steps == [0, 1] and [restored[r].checkpoint for r in (0, 1)] == [0, 1]
        time.sleep(0.2)  # room for restores submitted ahead to start
        with source.lock:
            seen = sorted(source.started)
        assert [[restored[r].checkpoint for r in (0, 1)] for _, restored in iterator] == [[10, 11], [20, 21]]
        return seen

    assert started_by_first_yield(ahead=True) == [0, 1, 10, 11]  # the next batch overlaps this one
    assert started_by_first_yield(ahead=False) == [0, 1]  # one batch of checkpoints in memory at a time


def test_step_selection():
    available = [0, 20, 40, 60, 100, 200, 300]
    assert select_steps("all", available) == available
    assert select_steps("0:100:40", available) == [0, 40]
    assert select_steps("latest,20", available) == [20, 300]
    assert select_steps("every:3", available) == [0, 60, 300]
    assert select_steps(":60", available) == [0, 20, 40, 60]
    assert select_steps("150:", available) == [200, 300]
    for bad in ("", "x", "1:2:0", "every:0", "10"):
        with pytest.raises(Exception):
            select_steps(bad, available)


def test_a_second_scan_process_loads_the_program_from_the_persistent_cache(tmp_path):
    # Two `jaxinduct scan` processes (one CPU device each, as a user's) of the same shape:
    # the first compiles and writes JAX's cache, the second loads the program from it.
    trajectory = tmp_path / "traj"
    write_trajectory(trajectory, steps=(0, 10))
    env = {**os.environ, "JAXINDUCT_COMPILATION_CACHE": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    outputs = []
    for store in ("a.sqlite", "b.sqlite"):
        command = [sys.executable, "-m", "jaxinduct", "scan", str(trajectory), "--store", str(tmp_path / store),
                   "--no-progress", *PROBE_ARGS]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    assert "from the compilation cache" not in outputs[0]
    assert "from the compilation cache" in outputs[1]
    assert any((tmp_path / "cache").iterdir())
    assert table_rows(tmp_path / "a.sqlite") == table_rows(tmp_path / "b.sqlite")  # the same program: bitwise
