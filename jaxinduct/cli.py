"""The `jaxinduct` command: parses options and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from jaxinduct.errors import JaxInductError


def _train(args: argparse.Namespace) -> int:
    from jaxinduct.train import PRESETS, get_preset, train

    if args.list_presets:
        for name, preset in PRESETS.items():
            m = preset.model
            shape = f"{m.n_layers}L {m.n_heads}H d_model={m.d_model} ctx={m.n_ctx}"
            kind = "attn-only" if m.attn_only else "MLP"
            print(f"{name:16s} {shape}, {kind}, {m.positional.value} positions, {preset.data.kind} data, {preset.steps} steps")
        return 0
    if args.out is None:
        raise JaxInductError("train needs --out DIR (where the Orbax trajectory is written)")
    config = get_preset(args.preset)
    overrides = {
        "steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.corpus is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, kind="bytes", corpus=args.corpus))
    result = train(config, args.out, progress=not args.no_progress)
    print(f"trajectory: {result.out}")
    if result.resumed_from == config.steps:
        print("the run was already complete; nothing was trained")
    elif result.resumed_from is not None:
        print(f"resumed after committed step {result.resumed_from}")
    print(f"{len(result.steps_saved)} committed checkpoints, steps {result.steps_saved[0]}..{result.steps_saved[-1]}")
    if result.final_loss is not None:
        print(f"final training loss {result.final_loss:.3f}  ({result.seconds:.0f} s)")
    if result.prefix_matching is not None:
        print("prefix_matching at the last step (layer x head; an induction head scores near 1):")
        for layer, row in enumerate(result.prefix_matching):
            print(f"  layer {layer}: " + "  ".join(f"{v:5.2f}" for v in row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinduct", description="Find induction heads across training runs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train a reference model and save an Orbax trajectory",
        description="Train a small reference model on built-in data (or a text corpus) and save "
        "checkpoints dense early and sparse late. Re-running with the same options resumes.",
    )
    train.add_argument("--preset", default="quickstart", help="model + data preset (default: quickstart; see --list-presets)")
    train.add_argument("--out", help="trajectory directory (new, empty, or a run of the same config to resume)")
    train.add_argument("--corpus", help="train byte-level on this text file or folder instead of generated data")
    train.add_argument("--steps", type=int, help="optimizer steps (overrides the preset)")
    train.add_argument("--seed", type=int, help="seed for init and data")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--list-presets", action="store_true", help="list presets and exit")
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxInductError as e:
        print(f"jaxinduct {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"jaxinduct {args.command}: interrupted; committed checkpoints are kept, "
            "and the same command resumes after the last one",
            file=sys.stderr,
        )
        return 130


def entry_point() -> None:
    # Orbax and absl log at INFO by default; a CLI user wants our output, not theirs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
