"""The results store at real model shapes: bytes, write and read time per checkpoint.

Writes K synthetic checkpoints of every registered score, shaped as a scan of a Pythia
shape produces them (head scores [layer, head], pair scores defined where the source
layer comes first, model scores; with --curve-length L also the dataset's curves:
per_token_loss [L] and the two ablation curves [layer, head, L]), one checkpoint per
write_batch as the engine commits them, into a fresh store. Then reads back every head
score and every pair score of the run. Values are random; NaN where a scan leaves them
undefined, so the row counts are a scan's.

Side by side, the pair scores as schema 1 stored them (one SQLite row per value, in a
WITHOUT ROWID table keyed as it was), written to a scratch file the same way, one
transaction per checkpoint.

With --trajectory N (default 154, as Pythia publishes; 0 skips it), it also writes a
store of N Pythia-1.4B-shaped checkpoints and times what readers do with it, each in its
own process (wall seconds and peak RSS): `jaxinduct show`, `jaxinduct export --table pairs`
(Parquet) and `jaxinduct report`.

Usage: python bench/store.py [--shapes pythia-70m pythia-410m pythia-1.4b] [--checkpoints 3]
       [--curve-length 0] [--trajectory 154]
Issue 14 asks for at most 5 MB and 100 ms per Pythia-1.4B-shaped checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_rss import run_jaxinduct  # noqa: E402

from jaxinduct.engine.bench import SHAPES  # noqa: E402
from jaxinduct.results.store import CheckpointScores, ResultStore  # noqa: E402
from jaxinduct.scores import registry  # noqa: E402
from jaxinduct.scores.registry import Kind  # noqa: E402


def synthetic_scores(layers: int, heads: int, step: int, curve_length: int, rng: np.random.Generator) -> CheckpointScores:
    """Every registered score of one checkpoint of a layers x heads model, as a scan leaves it."""
    forward = np.arange(layers)[:, None, None, None] < np.arange(layers)[None, None, :, None]
    forward = np.broadcast_to(forward, (layers, heads, layers, heads))
    # float32 values, as the scan program computes them
    head = {s.name: rng.random((layers, heads), np.float32) for s in registry.scores(Kind.HEAD)}
    pair = {s.name: np.where(forward, rng.random(forward.shape, np.float32), np.float32(np.nan))
            for s in registry.scores(Kind.PAIR)}  # fmt: skip
    model = {s.name: float(rng.random(dtype=np.float32)) for s in registry.scores(Kind.MODEL)}
    curve = {}
    if curve_length:
        curve = {s.name: rng.random(curve_length).astype(np.float32) for s in registry.scores(Kind.CURVE)}
        curve |= {s.name: rng.random((layers, heads, curve_length)).astype(np.float32) for s in registry.scores(Kind.HEAD_CURVE)}
    else:  # without a dataset there is no icl_score (nor ablation scores)
        model = {name: value for name, value in model.items() if name != "icl_score"}
        head = {name: value for name, value in head.items() if not name.startswith("ablation_")}
    return CheckpointScores(step=step, tokens_seen=step * 2048, seconds=1.0, head=head, pair=pair, model=model, curve=curve)


_V1_PAIRS = """CREATE TABLE pair_scores (
    run TEXT NOT NULL, step INTEGER NOT NULL, probe_hash TEXT NOT NULL, kind TEXT NOT NULL,
    src_layer INTEGER NOT NULL, src_head INTEGER NOT NULL, dst_layer INTEGER NOT NULL, dst_head INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run, probe_hash, step, kind, src_layer, src_head, dst_layer, dst_head)
) WITHOUT ROWID"""


def measure_v1_pairs(batches: list[CheckpointScores], path: Path) -> dict[str, float]:
    """Schema 1's pair rows: bytes and write time per checkpoint (the other tables are unchanged)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(_V1_PAIRS)
    writes = []
    for scores in batches:
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        for kind, array in scores.pair.items():
            index = np.nonzero(~np.isnan(array))
            rows = zip(*(np.broadcast_to(v, len(index[0])).tolist() for v in ("bench", "p" * 16, scores.step, kind)),
                       *(axis.tolist() for axis in index), array[index].tolist())  # fmt: skip
            conn.executemany("INSERT INTO pair_scores (run, probe_hash, step, kind, src_layer, src_head, dst_layer, "
                             "dst_head, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)  # fmt: skip
        conn.execute("COMMIT")
        writes.append(time.perf_counter() - start)
    conn.close()
    return {"bytes": path.stat().st_size / len(batches), "write_ms": 1000 * float(np.median(writes))}


def measure(shape: str, n: int, curve_length: int) -> dict[str, float]:
    layers, heads, _ = SHAPES[shape]
    rng = np.random.default_rng(0)
    batches = [synthetic_scores(layers, heads, 1000 * i, curve_length, rng) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite"
        writes = []
        with ResultStore.open(path) as store:
            store.ensure_run("bench", "synthetic", "{}")
            store.record_probe_config("p" * 16, "{}")
            for scores in batches:
                start = time.perf_counter()
                store.write_batch("bench", "p" * 16, [scores])
                writes.append(time.perf_counter() - start)
        size = path.stat().st_size
        with ResultStore.open(path, readonly=True) as store:
            start = time.perf_counter()
            heads_read = store.head_scores("bench")
            pairs_read = store.pair_scores("bench")
            read = time.perf_counter() - start
        v1 = measure_v1_pairs(batches, Path(tmp) / "v1_pairs.sqlite")
    return {
        "heads": layers * heads, "rows": (len(heads_read) + len(pairs_read)) / n, "bytes": size / n,
        "write_ms": 1000 * float(np.median(writes)), "read_ms": 1000 * read / n,
        "v1_pair_bytes": v1["bytes"], "v1_pair_write_ms": v1["write_ms"],
    }  # fmt: skip


def time_readers(n: int, work: Path) -> list[tuple[str, float, float]]:
    """(command, wall seconds, peak RSS MB) of show, export and report on a store of n checkpoints."""
    layers, heads, _ = SHAPES["pythia-1.4b"]
    store_path = work / "trajectory.sqlite"
    rng = np.random.default_rng(0)
    with ResultStore.open(store_path) as store:
        store.ensure_run("pythia-1.4b", "synthetic", json.dumps({"n_layers": layers, "n_heads": heads}))
        store.record_probe_config("p" * 16, "{}")
        for i in range(n):
            store.write_batch("pythia-1.4b", "p" * 16, [synthetic_scores(layers, heads, 1000 * i, 0, rng)])
    commands = {
        "show": ["show", "--store", str(store_path)],
        "export --table pairs (parquet)": ["export", "--store", str(store_path), "--table", "pairs", "--format", "parquet",
                                           "--out", str(work / "pairs.parquet")],
        "report": ["report", "--store", str(store_path), "--out", str(work / "report")],
    }  # fmt: skip
    timings = []
    for label, args in commands.items():
        seconds, peak, _ = run_jaxinduct(args, label)
        timings.append((label, seconds, peak))
    timings.append((f"(store: {store_path.stat().st_size / 1e6:.0f} MB)", 0.0, 0.0))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["pythia-70m", "pythia-410m", "pythia-1.4b"])
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--curve-length", type=int, default=0, help="dataset sequence length (0: no dataset scores)")
    parser.add_argument("--trajectory", type=int, default=154, help="checkpoints of the reader timings (0: skip)")
    args = parser.parse_args()
    print(f"{args.checkpoints} checkpoints per shape, every score, curves of {args.curve_length or 'no'} positions; "
          "per checkpoint:")  # fmt: skip
    print(f"{'':14s} {'':>6s} {'':>11s} {'store (pairs packed)':>28s} {'schema 1 pair rows alone':>26s}")
    print(f"{'shape':14s} {'heads':>6s} {'score values':>12s} {'MB':>8s} {'write ms':>9s} {'read ms':>8s} "
          f"{'MB':>10s} {'write ms':>12s}")  # fmt: skip
    for shape in args.shapes:
        m = measure(shape, args.checkpoints, args.curve_length)
        print(f"{shape:14s} {m['heads']:6d} {m['rows']:12.0f} {m['bytes'] / 1e6:8.2f} {m['write_ms']:9.0f} "
              f"{m['read_ms']:8.0f} {m['v1_pair_bytes'] / 1e6:10.2f} {m['v1_pair_write_ms']:12.0f}")  # fmt: skip
    print("issue 14 targets for a Pythia-1.4B-shaped checkpoint: at most 5 MB and 100 ms to write")
    if args.trajectory:
        with tempfile.TemporaryDirectory() as work:
            timings = time_readers(args.trajectory, Path(work))
        print(f"\nreaders of a store of {args.trajectory} Pythia-1.4B-shaped checkpoints "
              "(targets: show < 2 s, export < 60 s in bounded memory, report < 60 s):")  # fmt: skip
        for label, seconds, peak in timings:
            print(f"  {label:32s} {seconds:6.1f} s  peak RSS {peak:6.0f} MB" if seconds else f"  {label}")


if __name__ == "__main__":
    main()
