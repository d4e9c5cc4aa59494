"""Checkpoints/s of the scan engine vs. a one-at-a-time loop vs. a bare Orbax restore.

All three read the same checkpoints of the same trajectory in one run, side by side:

- bare restore: Orbax restores each checkpoint's params, one after another, and nothing
  else (the I/O floor a scan cannot beat without more reader threads);
- one at a time: restore a checkpoint, score it (the same compiled kernels, a batch of
  one), write it to a store, next;
- engine: `jaxinduct.engine.scan.scan` (restores overlapped with compute by a thread pool, K
  checkpoints per compiled batch, one store transaction per batch);
- kernels alone: the engine's compiled batches on checkpoints already in memory (the
  compute floor; the engine cannot beat max(bare restore, kernels alone)).

Compilation is excluded from every side (each is warmed up on a throwaway store first);
every timed scan writes a fresh store. Target: the engine within 1.5x of the bare restore.

Usage:
  python bench/scan_throughput.py                          # runs/quickstart/trajectory (trained if missing)
  python bench/scan_throughput.py --trajectory DIR [--batch K] [--repeats N] [--dataset-examples N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxinduct.scores.probes import ProbeConfig, make_probes  # noqa: E402
from jaxinduct.quickstart import ICL_EARLY, ICL_LATE, quickstart_dataset  # noqa: E402
from jaxinduct.engine.scan import ScanConfig, checkpoint_scores, scan  # noqa: E402
from jaxinduct.parallel import gather_results  # noqa: E402
from jaxinduct.scores.batched import score_all  # noqa: E402
from jaxinduct.checkpoints.orbax import OrbaxSource  # noqa: E402
from jaxinduct.results.store import ResultStore  # noqa: E402
from jaxinduct.train.trainer import get_preset, train  # noqa: E402
from jaxinduct.checkpoints.layout import params_target, reader_item_handlers, reader_manager, restore_tree  # noqa: E402
from jaxinduct.model.weights import stack_weights  # noqa: E402


def bare_restore(source: OrbaxSource, steps: list[int]) -> None:
    meta = source.meta(steps[0])
    target = params_target(meta.layout, meta.spec)
    with reader_manager(source.directory, reader_item_handlers(with_meta=False)) as manager:
        for step in steps:
            jax.block_until_ready(restore_tree(manager, step, target))


def one_at_a_time(source: OrbaxSource, steps: list[int], probe: ProbeConfig, dataset, store_path: Path) -> None:
    probes = make_probes(source.spec(), probe, dataset=dataset)
    with ResultStore.open(store_path) as store:
        store.ensure_run("loop", str(source.directory), "{}")
        store.record_probe_config("loop", "{}")
        for step in steps:
            loaded = source.load(step)
            results = gather_results(score_all(stack_weights([loaded.weights]), probes))
            record = checkpoint_scores(results, 0, step, loaded.tokens_seen, 0.0)
            store.write_batch("loop", "loop", [record])


def engine(trajectory: Path, probe: ProbeConfig, dataset_file: str | None, batch: int | None, per_pass,
           store_path: Path) -> None:  # fmt: skip
    scan(ScanConfig(source=str(trajectory), store=str(store_path), probe=probe, dataset=dataset_file, batch=batch,
                     per_pass=per_pass, progress=False))  # fmt: skip


def kernels_alone(batches, probes, per_pass) -> None:
    for stacked, valid in batches:
        jax.device_get(score_all(stacked, probes, checkpoints_per_pass=per_pass, valid=valid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectory", default="runs/quickstart/trajectory")
    parser.add_argument("--batch", type=int, help="engine checkpoints per batch (default: the engine's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (best is reported)")
    parser.add_argument("--dataset-examples", type=int, default=0,
                        help="also the dataset scores and ablation, on N quickstart sequences (default 0)")  # fmt: skip
    parser.add_argument("--per-pass", default="auto", help="engine checkpoints per pass: auto | all | N")
    args = parser.parse_args()
    per_pass = {"auto": "auto", "all": None}.get(args.per_pass) if args.per_pass in ("auto", "all") else int(args.per_pass)

    trajectory = Path(args.trajectory)
    if not trajectory.exists():
        print(f"training the quickstart model into {trajectory} first (about 3 minutes on 2 CPU cores)")
        train(get_preset("quickstart"), trajectory, progress=False)
    source = OrbaxSource.open(trajectory)
    steps = source.steps()
    probe = ProbeConfig(icl_late=ICL_LATE, icl_early=ICL_EARLY)
    work = Path(tempfile.mkdtemp(prefix="jaxinduct-bench-"))
    dataset, dataset_file = None, None
    if args.dataset_examples:
        dataset = quickstart_dataset()[: args.dataset_examples]
        dataset_file = str(work / "dataset.npy")
        np.save(dataset_file, dataset)

    from jaxinduct.engine.scan import resolve_batch, resolve_per_pass
    from jaxinduct.parallel import parse_mesh

    mesh = parse_mesh(None)
    k = resolve_batch(args.batch, mesh)
    loaded = [source.load(step).weights for step in steps]
    valid = np.arange(len(loaded) + (-len(loaded) % k)) < len(loaded)
    loaded += [loaded[-1]] * (-len(loaded) % k)  # padded to whole batches, as the engine does
    batches = [(stack_weights(loaded[i : i + k]), valid[i : i + k]) for i in range(0, len(loaded), k)]
    batch_probes = make_probes(source.spec(), probe, dataset=dataset)
    engine_per_pass = resolve_per_pass(per_pass, mesh)
    counter = iter(range(10**6))
    fresh = lambda: work / f"store-{next(counter)}.sqlite"  # noqa: E731
    sides = {
        "bare Orbax restore": lambda: bare_restore(source, steps),
        "one checkpoint at a time": lambda: one_at_a_time(source, steps, probe, dataset, fresh()),
        "engine (jaxinduct scan)": lambda: engine(trajectory, probe, dataset_file, args.batch, per_pass, fresh()),
        "kernels alone (in memory)": lambda: kernels_alone(batches, batch_probes, engine_per_pass),
    }
    for fn in sides.values():  # warm-up: compile, fill the page cache
        fn()
    best, cpu = {}, {}
    for name, fn in sides.items():
        runs = []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            runs.append((time.perf_counter() - start, time.process_time() - start_cpu))
        best[name], cpu[name] = min(runs)

    n = len(steps)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"{n} checkpoints of {trajectory} ({source.spec().n_layers} layers x {source.spec().n_heads} heads), "
          f"{args.dataset_examples} dataset sequences, {jax.device_count()} {jax.default_backend()} device(s), "
          f"{cores} CPU cores")  # fmt: skip
    floor = best["bare Orbax restore"]
    print(f"{'':28s}{'seconds':>9s}{'ckpts/s':>9s}{'time / bare restore':>21s}{'CPU seconds':>13s}")
    for name, seconds in best.items():
        print(f"{name:28s}{seconds:9.2f}{n / seconds:9.1f}{seconds / floor:20.2f}x{cpu[name]:13.2f}")
    ratio = best["engine (jaxinduct scan)"] / floor
    floor_of_engine = max(floor, best["kernels alone (in memory)"])
    print(f"engine / max(bare restore, kernels alone) = {best['engine (jaxinduct scan)'] / floor_of_engine:.2f}x")
    if jax.default_backend() == "cpu":
        # Here restoring and scoring share the same cores, so their CPU time bounds any engine.
        bound = (cpu["bare Orbax restore"] + cpu["kernels alone (in memory)"]) / cores
        print(f"CPU backend: restore and kernels need {bound * cores:.2f} CPU seconds on {cores} cores, so no engine "
              f"beats {max(bound, floor_of_engine):.2f} s here ({max(bound, floor_of_engine) / floor:.2f}x bare restore)")  # fmt: skip
    print(f"engine vs. one at a time: {best['one checkpoint at a time'] / best['engine (jaxinduct scan)']:.2f}x faster; "
          f"target engine <= 1.5x bare restore: {'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
