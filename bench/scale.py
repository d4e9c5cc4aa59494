"""Real model sizes on this machine: Pythia-410M and Pythia-1.4B shaped trajectories, scanned
with default flags, side by side in one run.

For each shape it writes a trajectory of N Hugging Face revisions (``step0``, ``step1000``,
...; float16 safetensors of random weights, written with numpy, as Pythia ships them) and
runs, each in its own process:

- ``jaxinduct scan`` of the weights-only scores (q/k/v_composition, ov_copying), and
- ``jaxinduct scan`` with default flags (every score),

printing seconds per checkpoint at steady state (the compile apart), the memory plan the
engine chose, peak resident memory, and the store's bytes per checkpoint; then the time
to write one checkpoint's scores (read back from the default scan's store) into a fresh
store, as the engine's writer thread does.

Issue 14's targets on this 2-core, 24 GB machine, default flags: the 410M shape at most
6 GB peak RSS, the 1.4B shape completes within 12 GB, at most 5 MB of store per checkpoint.

Usage: python bench/scale.py [--shapes pythia-410m pythia-1.4b] [--checkpoints 3] [--dir DIR (keep)]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_rss import run_jaxinduct  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from jaxinduct.engine.bench import pythia_config  # noqa: E402
from jaxinduct.results.store import CheckpointScores, ResultStore  # noqa: E402

WEIGHTS_ONLY = "q_composition,k_composition,v_composition,ov_copying"
TARGET_RSS_GB = {"pythia-410m": 6.0, "pythia-1.4b": 12.0}
TARGET_STORE_MB = 5.0


def neox_tensors(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every tensor of a GPTNeoXForCausalLM checkpoint, float16, by its saved name and shape."""
    D, M, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def normal(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, np.float32) * scale).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return (1 + normal(n, scale=0.1).astype(np.float32)).astype(np.float16)

    tensors = {"gpt_neox.embed_in.weight": normal(V, D), "embed_out.weight": normal(V, D),
               "gpt_neox.final_layer_norm.weight": ones(D), "gpt_neox.final_layer_norm.bias": normal(D)}  # fmt: skip
    for i in range(config["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        tensors |= {
            p + "attention.query_key_value.weight": normal(3 * D, D), p + "attention.query_key_value.bias": normal(3 * D),
            p + "attention.dense.weight": normal(D, D), p + "attention.dense.bias": normal(D),
            p + "input_layernorm.weight": ones(D), p + "input_layernorm.bias": normal(D),
            p + "post_attention_layernorm.weight": ones(D), p + "post_attention_layernorm.bias": normal(D),
            p + "mlp.dense_h_to_4h.weight": normal(M, D), p + "mlp.dense_h_to_4h.bias": normal(M),
            p + "mlp.dense_4h_to_h.weight": normal(D, M), p + "mlp.dense_4h_to_h.bias": normal(D),
        }  # fmt: skip
    return tensors


def write_trajectory(directory: Path, shape: str, n: int) -> float:
    """N float16 revisions of ``shape`` under ``directory``; GB on disk per revision."""
    config = {**pythia_config(shape), "torch_dtype": "float16"}
    sizes = []
    for i in range(n):
        revision = directory / f"step{1000 * i}"
        weights = revision / "model.safetensors"
        if not weights.is_file():
            revision.mkdir(parents=True, exist_ok=True)
            save_file(neox_tensors(config, np.random.default_rng(i)), str(weights), metadata={"format": "pt"})
            (revision / "config.json").write_text(json.dumps(config))
        sizes.append(weights.stat().st_size)
    return float(np.mean(sizes)) / 1e9


# "<total> s (compile <c> s[ from the compilation cache], then <rate> checkpoints/s)"
_SUMMARY = re.compile(r"([\d.]+) s \((?:compile ([\d.]+) s|compiled before)")
_COUNTS = re.compile(r"(\d+) scanned, (\d+) failed")


def scan(source: Path, store: Path, label: str, *extra: str) -> dict[str, float | str]:
    seconds, peak_mb, out = run_jaxinduct(["scan", str(source), "--store", str(store), "--no-progress", *extra], label)
    summary, counts = _SUMMARY.search(out), _COUNTS.search(out)
    memory = next((line.removeprefix("memory: ") for line in out.splitlines() if line.startswith("memory: ")), "-")
    total, compile_s = (float(summary[1]), float(summary[2] or 0)) if summary else (float("nan"), float("nan"))
    n = int(counts[1]) + int(counts[2]) if counts else 0
    return {
        "wall": seconds,
        "compile": compile_s,
        # The scan's own seconds (restores, compute and writes) with the compile taken out.
        "per_checkpoint": (total - compile_s) / n if n else float("nan"),
        "peak_gb": peak_mb / 1024,
        "memory": memory,
    }


def write_ms(store_path: Path) -> float:
    """Median ms to write one checkpoint's scores (read back from ``store_path``) into a fresh store."""
    with ResultStore.open(store_path, readonly=True) as store:
        run = store.runs()[0].name
        probe_hash = store.probe_hashes(run)[-1]
        probe_json = store.probe_config(probe_hash) or "{}"
        steps, grids = store.head_score_grids(run, probe_hash=probe_hash)
        _, model = store.model_score_series(run, probe_hash=probe_hash)
        kinds = sorted(set(store.pair_scores(run, probe_hash=probe_hash)["kind"].tolist()))
        layers, heads = next(iter(grids.values())).shape[1:]
        batches = []
        for i, step in enumerate(steps):
            pair = {}
            for kind in kinds:
                rows = store.pair_scores(run, kind, int(step), probe_hash=probe_hash)
                values = np.full((layers, heads, layers, heads), np.nan, np.float32)
                values[rows["src_layer"], rows["src_head"], rows["dst_layer"], rows["dst_head"]] = rows["value"]
                pair[kind] = values
            head = {name: grid[i].astype(np.float32) for name, grid in grids.items() if not np.isnan(grid[i]).all()}
            model_values = {name: float(v[i]) for name, v in model.items() if not np.isnan(v[i])}
            batches.append(CheckpointScores(step=int(step), head=head, pair=pair, model=model_values))
    times = []
    with tempfile.TemporaryDirectory() as tmp, ResultStore.open(Path(tmp) / "s.sqlite") as fresh:
        fresh.ensure_run(run, "bench", "{}")
        fresh.record_probe_config(probe_hash, probe_json)
        for scores in batches:
            start = time.perf_counter()
            fresh.write_batch(run, probe_hash, [scores])
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def measure(shape: str, n: int, work: Path) -> dict[str, object]:
    start = time.perf_counter()
    disk_gb = write_trajectory(work / shape, shape, n)
    written = time.perf_counter() - start
    weights_only = scan(work / shape, work / f"{shape}-weights.sqlite", f"{shape} weights-only scan", "--scores", WEIGHTS_ONLY)
    full = scan(work / shape, work / f"{shape}.sqlite", f"{shape} default scan")
    store_mb = (work / f"{shape}.sqlite").stat().st_size / 1e6 / n
    return {"disk_gb": disk_gb, "write_seconds": written, "weights_only": weights_only, "full": full,
            "store_mb": store_mb, "write_ms": write_ms(work / f"{shape}.sqlite")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["pythia-410m", "pythia-1.4b"], choices=list(TARGET_RSS_GB))
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="keep the revisions and stores here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for shape in args.shapes:
            results[shape] = measure(shape, args.checkpoints, work)
            print(f"{shape}: done ({json.dumps(results[shape], default=str)})", file=sys.stderr, flush=True)
    print(f"\n{args.checkpoints} float16 revisions per shape, default flags; seconds per checkpoint at steady state:")
    print(f"{'shape':<13}{'GB/rev':>7}{'weights-only s':>16}{'full s':>9}{'compile s':>10}{'peak RSS GB':>13}"
          f"{'target':>8}{'store MB/ckpt':>15}{'write ms':>10}")  # fmt: skip
    for shape, r in results.items():
        w, f = r["weights_only"], r["full"]
        print(f"{shape:<13}{r['disk_gb']:>7.2f}{w['per_checkpoint']:>16.1f}{f['per_checkpoint']:>9.1f}{f['compile']:>10.1f}"
              f"{f['peak_gb']:>13.2f}{TARGET_RSS_GB[shape]:>8.0f}{r['store_mb']:>15.2f}{r['write_ms']:>10.1f}")  # fmt: skip
        print(f"  weights-only peak RSS {w['peak_gb']:.2f} GB; memory plan of the default scan: {f['memory']}")
    print(f"targets: peak RSS as listed (GB), store at most {TARGET_STORE_MB:g} MB per checkpoint")


if __name__ == "__main__":
    main()
