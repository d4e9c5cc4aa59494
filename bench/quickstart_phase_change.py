"""Does `jaxinduct train --preset quickstart` produce a real induction-head phase change, fast?

Runs the CLI exactly as a user would (a subprocess, timed by the wall clock), then
reads the trajectory back with plain orbax-checkpoint and measures prefix_matching
(SCORES.md: [BOS] + R R R R, R = 25 distinct random tokens) for every head of every
committed step, on probes that the trainer never saw. Prints the curve and checks:

  - training finishes within 6 minutes (on the 2-core CPU the project targets);
  - at least 40 committed Orbax steps;
  - some head in layer >= 1 goes from prefix_matching < 0.15 at the first step to
    > 0.6 at the last;
  - phase-change detection (jaxinduct.results.phase) on this curve's max over heads finds an
    interval that holds the first step where a head exceeds 0.5.

Usage: python bench/quickstart_phase_change.py [--preset quickstart] [--out DIR] [--examples 32]
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from jaxinduct.results.phase import detect_phase_change  # noqa: E402
from jaxinduct.scores.probes import default_token_pool, repeated_random_tokens  # noqa: E402
from jaxinduct.scores.batched import head_prefix_matching  # noqa: E402
from jaxinduct.checkpoints.orbax import OrbaxSource, restore_weights  # noqa: E402

TIME_LIMIT_S = 360
MIN_STEPS = 40
START_BELOW, END_ABOVE = 0.15, 0.6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--out", help="keep the trajectory here (default: a temporary directory)")
    parser.add_argument("--examples", type=int, default=32, help="probe sequences per checkpoint")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        if out.exists() and any(out.iterdir()):
            print(f"{out} is not empty; give a new --out so that training is timed from scratch", file=sys.stderr)
            return 2
        command = [sys.executable, "-m", "jaxinduct", "train", "--preset", args.preset, "--out", str(out), "--no-progress"]
        print("$", " ".join(command[2:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        train_seconds = time.perf_counter() - started
        return report(out, train_seconds, args.examples)


def report(out: Path, train_seconds: float, n_examples: int) -> int:
    steps = ocp.CheckpointManager(out).all_steps()  # plain Orbax, no jaxinduct involved
    first_weights, _ = restore_weights(out, steps[0])
    spec = first_weights.spec
    tokens = jnp.asarray(
        repeated_random_tokens(default_token_pool(spec), n_examples=n_examples, bos_token_id=spec.bos_token_id, seed=0)
    )
    rows = []
    source = OrbaxSource.open(out)
    for step in steps:
        weights, meta = source.load_with_meta(step)
        rows.append((step, meta.tokens_seen, meta.loss, np.asarray(head_prefix_matching(weights, tokens))))
    source.close()

    print(f"\nprefix_matching per head ({n_examples} probe sequences of length {tokens.shape[1]}), {len(steps)} steps")
    header = "   step   tokens    loss  " + "  ".join(f"L{layer}max" for layer in range(spec.n_layers - 1))
    header += "  " + " ".join(f"L{spec.n_layers - 1}H{h}" for h in range(spec.n_heads))
    print(header)
    for step, tokens_seen, loss, pm in rows:
        loss_text = f"{loss:7.3f}" if loss is not None else "      -"
        earlier = "  ".join(f"{pm[layer].max():5.2f}" for layer in range(spec.n_layers - 1))
        last = " ".join(f"{v:5.2f}" for v in pm[-1])
        print(f"{step:7d} {tokens_seen:8d} {loss_text}  {earlier}  {last}")

    # A head that learned a fixed offset (attend 24 back) would also score on R = 25; an
    # induction head matches tokens, so it must score as well when the block length changes.
    last_weights, _ = restore_weights(out, steps[-1])
    other_period = jnp.asarray(
        repeated_random_tokens(
            default_token_pool(spec), n_examples=n_examples, block_len=17, bos_token_id=spec.bos_token_id, seed=1
        )
    )
    last_other = np.asarray(head_prefix_matching(last_weights, other_period))

    first, last = rows[0][3], rows[-1][3]
    formed = [
        (layer, head, first[layer, head], last[layer, head])
        for layer in range(1, spec.n_layers)
        for head in range(spec.n_heads)
        if first[layer, head] < START_BELOW and last[layer, head] > END_ABOVE
    ]
    offset_free = [(layer, head) for layer, head, _, _ in formed if last_other[layer, head] > END_ABOVE]
    strongest = max(range(spec.n_heads), key=lambda h: last[-1, h])
    crossing = next((step for step, _, _, pm in rows if pm[1:].max() > 0.5), None)
    found = detect_phase_change(np.array(steps), {"max_prefix_matching": np.array([pm.max() for _, _, _, pm in rows])})

    checks = [
        (f"training wall time {train_seconds:.0f} s <= {TIME_LIMIT_S} s", train_seconds <= TIME_LIMIT_S),
        (f"{len(steps)} committed Orbax steps >= {MIN_STEPS}", len(steps) >= MIN_STEPS),
        (
            f"{len(formed)} head(s) in layer >= 1 go from < {START_BELOW} to > {END_ABOVE}: "
            + ", ".join(f"L{layer}H{head} {a:.2f} -> {b:.2f}" for layer, head, a, b in formed),
            bool(formed),
        ),
        (
            f"{len(offset_free)} of them also score > {END_ABOVE} with block length 17 instead of 25 (no fixed offset): "
            + ", ".join(f"L{layer}H{head} {last_other[layer, head]:.2f}" for layer, head in offset_free),
            bool(offset_free),
        ),
        (
            f"detected phase change {'none' if found is None else f'{found.start}-{found.end}'} holds step {crossing}",
            found is not None and crossing is not None and found.start <= crossing <= found.end,
        ),
    ]
    print(f"\nfirst step where a layer >= 1 head exceeds 0.5: {crossing}; strongest last-step head L{spec.n_layers - 1}H{strongest}")
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
