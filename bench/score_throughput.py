"""Head-scores per second: the batched entry point vs. a per-checkpoint loop of the same kernels.

Both sides compute every score `score_all` computes, on the same 64 checkpoints of the
quickstart model and the same probes, measured side by side in one run after a
warm-up call each (compile time is reported separately). The loop jit-compiles the
single-checkpoint function once and calls it per checkpoint, as a user without
jaxinduct's batching would.

Usage:
  python bench/score_throughput.py                      # 64 random checkpoints of the quickstart spec
  python bench/score_throughput.py --trajectory runs/quickstart   # its steps, cycled to 64
Options: --checkpoints N (default 64), --examples N (probe sequences, default 32), --repeats N,
--per-pass K [K ...] (score_all's checkpoints_per_pass values to time besides all-at-once),
--dataset-examples N (also the dataset scores: icl_score, per_token_loss and every head's
ablation, on N sequences of the quickstart corpus; icl indices 100 and 10).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxinduct.scores.probes import ProbeConfig, make_probes  # noqa: E402
from jaxinduct.train.data import TiledBlocks  # noqa: E402
from jaxinduct.scores.batched import ProbeArrays, _checkpoint_scores, score_all  # noqa: E402
from jaxinduct.train.trainer import get_preset  # noqa: E402
from jaxinduct.checkpoints.layout import committed_steps  # noqa: E402
from jaxinduct.checkpoints.orbax import restore_weights  # noqa: E402
from jaxinduct.model.weights import init_random_weights, stack_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectory", help="a jaxinduct trajectory directory (default: random weights)")
    parser.add_argument("--checkpoints", type=int, default=64)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (best is reported)")
    parser.add_argument("--per-pass", type=int, nargs="*", default=[8, 2, 1], help="checkpoints_per_pass values to time")
    parser.add_argument("--dataset-examples", type=int, default=0, help="add the dataset scores (0: probes only)")
    args = parser.parse_args()

    if args.trajectory:
        steps = committed_steps(args.trajectory)
        picked = [steps[i % len(steps)] for i in range(args.checkpoints)]
        checkpoints = [restore_weights(args.trajectory, s)[0] for s in picked]
        source = f"{args.trajectory} ({len(steps)} steps, cycled)"
    else:
        spec = get_preset("quickstart").model
        checkpoints = [init_random_weights(spec, seed) for seed in range(args.checkpoints)]
        source = "random weights of the quickstart spec"
    spec = checkpoints[0].spec
    dataset = None
    if args.dataset_examples:
        corpus = TiledBlocks(
            d_vocab=spec.d_vocab, seq_len=spec.n_ctx, batch_size=args.dataset_examples,
            min_block=spec.n_ctx // 8, max_block=spec.n_ctx // 2, seed=1234, bos_token_id=spec.bos_token_id or 0,
        )  # fmt: skip
        dataset = np.asarray(corpus.batch(0))
    config = ProbeConfig(n_examples=args.examples, icl_late=100, icl_early=10)
    probes = make_probes(spec, config, dataset=dataset)
    stacked = stack_weights(checkpoints)
    arrays = ProbeArrays.from_probes(probes)
    one = jax.jit(functools.partial(_checkpoint_scores, config=probes.config))

    sides = {
        f"score_all, all {args.checkpoints} at once": lambda: score_all(stacked, probes),
        **{
            f"score_all, {k} per pass": (lambda k=k: score_all(stacked, probes, checkpoints_per_pass=k))
            for k in args.per_pass
        },
        "per-checkpoint loop": lambda: [one(w, arrays) for w in checkpoints],
    }
    first = {name: _timed(fn) for name, fn in sides.items()}  # compile + run
    best = {name: min(_timed(fn) for _ in range(args.repeats)) for name, fn in sides.items()}

    results = score_all(stacked, probes)
    n_head_metrics = len(results.head)
    head_scores = args.checkpoints * spec.n_layers * spec.n_heads * n_head_metrics
    print(f"{args.checkpoints} checkpoints of {source}: {spec.n_layers} layers x {spec.n_heads} heads, "
          f"{n_head_metrics} head metrics + {len(results.pair)} pair metrics, "
          f"{args.examples} probe sequences, {args.dataset_examples} dataset sequences, "
          f"{jax.device_count()} {jax.default_backend()} device(s)")  # fmt: skip
    print(f"{'':30s}{'seconds':>9s}{'head-scores/s':>15s}{'ckpts/s':>9s}{'vs loop':>9s}{'first call (s)':>16s}")
    loop_seconds = best["per-checkpoint loop"]
    for name, seconds in best.items():
        print(f"{name:30s}{seconds:9.3f}{head_scores / seconds:15.0f}{args.checkpoints / seconds:9.1f}"
              f"{loop_seconds / seconds:8.2f}x{first[name]:16.1f}")  # fmt: skip


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
