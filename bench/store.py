"""The results store at real model shapes: bytes, write and read time per checkpoint.

Writes K synthetic checkpoints of every registered score, shaped as a scan of a Pythia
shape produces them (head scores [layer, head], pair scores defined where the source
layer comes first, model scores; with --curve-length L also the dataset's curves:
per_token_loss [L] and the two ablation curves [layer, head, L]), one checkpoint per
write_batch as the engine commits them, into a fresh store. Then reads back every head
score and every pair score of the run. Values are random; NaN where a scan leaves them
undefined, so the row counts are a scan's.

Usage: python bench/store.py [--shapes pythia-70m pythia-410m pythia-1.4b] [--checkpoints 3]
       [--curve-length 0]
Issue 14 asks for at most 5 MB and 100 ms per Pythia-1.4B-shaped checkpoint; this script
measures today's schema (one SQLite row per value) so a new one can be compared with it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinduct.engine.bench import SHAPES  # noqa: E402
from jaxinduct.results.store import CheckpointScores, ResultStore  # noqa: E402
from jaxinduct.scores import registry  # noqa: E402
from jaxinduct.scores.registry import Kind  # noqa: E402


def synthetic_scores(layers: int, heads: int, step: int, curve_length: int, rng: np.random.Generator) -> CheckpointScores:
    """Every registered score of one checkpoint of a layers x heads model, as a scan leaves it."""
    forward = np.arange(layers)[:, None, None, None] < np.arange(layers)[None, None, :, None]
    forward = np.broadcast_to(forward, (layers, heads, layers, heads))
    head = {s.name: rng.random((layers, heads)) for s in registry.scores(Kind.HEAD)}
    pair = {s.name: np.where(forward, rng.random(forward.shape), np.nan) for s in registry.scores(Kind.PAIR)}
    model = {s.name: float(rng.random()) for s in registry.scores(Kind.MODEL)}
    curve = {}
    if curve_length:
        curve = {s.name: rng.random(curve_length).astype(np.float32) for s in registry.scores(Kind.CURVE)}
        curve |= {s.name: rng.random((layers, heads, curve_length)).astype(np.float32) for s in registry.scores(Kind.HEAD_CURVE)}
    else:  # without a dataset there is no icl_score (nor ablation scores)
        model = {name: value for name, value in model.items() if name != "icl_score"}
        head = {name: value for name, value in head.items() if not name.startswith("ablation_")}
    return CheckpointScores(step=step, tokens_seen=step * 2048, seconds=1.0, head=head, pair=pair, model=model, curve=curve)


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
    return {
        "heads": layers * heads, "rows": (len(heads_read) + len(pairs_read)) / n, "bytes": size / n,
        "write_ms": 1000 * float(np.median(writes)), "read_ms": 1000 * read / n,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["pythia-70m", "pythia-410m", "pythia-1.4b"])
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--curve-length", type=int, default=0, help="dataset sequence length (0: no dataset scores)")
    args = parser.parse_args()
    print(f"today's schema (one row per value), {args.checkpoints} checkpoints per shape, curves of "
          f"{args.curve_length or 'no'} positions; per checkpoint:")  # fmt: skip
    print(f"{'shape':14s} {'heads':>6s} {'score rows':>11s} {'MB':>8s} {'write ms':>9s} {'read ms':>8s}")
    for shape in args.shapes:
        m = measure(shape, args.checkpoints, args.curve_length)
        print(f"{shape:14s} {m['heads']:6d} {m['rows']:11.0f} {m['bytes'] / 1e6:8.2f} {m['write_ms']:9.0f} {m['read_ms']:8.0f}")
    print("issue 14 targets for a Pythia-1.4B-shaped checkpoint: at most 5 MB and 100 ms to write")


if __name__ == "__main__":
    main()
