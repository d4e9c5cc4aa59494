"""The `jaxinduct` command: parses options and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jaxinduct.errors import JaxInductError

if TYPE_CHECKING:
    from jaxinduct.engine.scan import ScanOptions


def _train(args: argparse.Namespace) -> int:
    from jaxinduct.train.trainer import PRESETS, get_preset, train

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


def _scan_options(args: argparse.Namespace, **extra) -> "ScanOptions":
    from jaxinduct.scores.probes import ProbeConfig
    from jaxinduct.engine.scan import ScanOptions

    probe = ProbeConfig()
    overrides = {
        "n_examples": args.examples,
        "block_len": args.block_len,
        "n_repeats": args.repeats,
        "icl_late": args.icl_late,
        "icl_early": args.icl_early,
    }
    probe = dataclasses.replace(probe, **{k: v for k, v in overrides.items() if v is not None})
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip()) if args.scores else None
    return ScanOptions(
        source=args.source, store=args.store, run=args.run, steps=args.steps, scores=scores,
        dataset=args.dataset, batch=args.batch, mesh=args.mesh, probe=probe,
        load_workers=args.load_workers, progress=not args.no_progress, mapping=args.mapping, **extra,
    )  # fmt: skip


def _scan(args: argparse.Namespace) -> int:
    from jaxinduct.engine.scan import scan

    import jax

    summary = scan(_scan_options(args))
    if jax.process_index() == 0:  # under jax.distributed, one report (and one writer)
        print(summary.describe())
        print(f"results: {args.store}  (jaxinduct show --store {args.store})")
    return 1 if summary.failed else 0


def _watch(args: argparse.Namespace) -> int:
    from jaxinduct.engine.scan import watch

    summary = watch(
        _scan_options(args), poll_seconds=args.poll, until_step=args.until_step, idle_timeout=args.idle_timeout
    )
    print(f"watch: {summary.scanned} checkpoints scanned, {summary.failed} failed; results: {args.store}")
    return 1 if summary.failed else 0


def _show(args: argparse.Namespace) -> int:
    from jaxinduct.report.show import render_show
    from jaxinduct.results.store import ResultStore

    with ResultStore.open(args.store, create=False, readonly=True) as store:
        print(render_show(store, run=args.run, metric=args.metric, step=args.step, top=args.top))
    return 0


def _report(args: argparse.Namespace) -> int:
    from jaxinduct.report.page import write_report
    from jaxinduct.results.store import ResultStore

    with ResultStore.open(args.store, create=False, readonly=True) as store:
        report = write_report(store, args.out, run=args.run)
    print(report.describe())
    return 0


def _export(args: argparse.Namespace) -> int:
    from jaxinduct.results.store import ResultStore, export

    with ResultStore.open(args.store, create=False, readonly=True) as store:
        rows = export(store, args.table, args.format, args.out, run=args.run)
    print(f"{rows} rows of {args.table} written to {args.out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from jaxinduct.checkpoints.convert import convert_hf

    written = convert_hf(args.source, args.out, steps=args.steps)
    print(f"{len(written)} revisions written to {args.out}" + (f" (steps {written[0]}..{written[-1]})" if written else ""))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from jaxinduct.quickstart import quickstart

    return quickstart(args.out, progress=not args.no_progress)


def _add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="SOURCE",
        help="an Orbax CheckpointManager directory, a Hugging Face model directory, or a directory of "
        "Hugging Face revisions (stepN, checkpoint-N, revision-*)",
    )  # fmt: skip
    parser.add_argument("--store", required=True, help="results store (SQLite file; created if missing)")
    parser.add_argument("--run", help="run name in the store (default: the SOURCE directory's name)")
    parser.add_argument("--steps", default="all", help="all | latest | N | A:B | A:B:S | every:N, comma-separated")
    parser.add_argument("--scores", help="comma-separated score names to keep (default: all; see docs/scores.md)")
    parser.add_argument("--dataset", help=".npy token ids [example, seq] for icl_score, per_token_loss and ablation")
    parser.add_argument("--icl-late", type=int, help="icl_score: late context index (default 500)")
    parser.add_argument("--icl-early", type=int, help="icl_score: early context index (default 50)")
    parser.add_argument("--examples", type=int, help="sequences per probe (default 32)")
    parser.add_argument("--block-len", type=int, help="random block length of the repeated probes (default 25)")
    parser.add_argument("--repeats", type=int, help="repeats of the block (default 4; probe = 1 + block-len x repeats)")
    parser.add_argument("--batch", type=int, help="checkpoints per batch, a multiple of the mesh's ckpt axis (default 8)")
    parser.add_argument("--mesh", help="device mesh 'ckpt=N,head=M' (default: every device on ckpt)")
    parser.add_argument("--load-workers", type=int, default=None,
                        help="threads restoring checkpoints (default 4; on the CPU backend half the cores, at most 4)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument(
        "--mapping", metavar="FILE",
        help="YAML mapping the params tree of someone else's Orbax checkpoints to canonical names "
        "(see docs/mappings/ and jaxinduct/mapping.py)",
    )  # fmt: skip


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

    scan = sub.add_parser(
        "scan",
        help="score every head of every checkpoint of a trajectory into a store",
        description="Score the selected checkpoints of SOURCE (batched, compiled once) into --store. "
        "Resumable: checkpoints already in the store for the same probes are skipped.",
    )
    _add_scan_arguments(scan)
    scan.set_defaults(func=_scan)

    watch = sub.add_parser(
        "watch",
        help="scan checkpoints of a run that is still training, as they are saved",
        description="Poll SOURCE and scan each checkpoint as soon as its save is committed.",
    )
    _add_scan_arguments(watch)
    watch.add_argument("--poll", type=float, default=10.0, help="seconds between looks at SOURCE (default 10)")
    watch.add_argument("--until-step", type=int,
                       help="stop once a step >= N is committed and every committed step is scanned")  # fmt: skip
    watch.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a new checkpoint")
    watch.set_defaults(func=_watch)

    show = sub.add_parser("show", help="print the top heads and model scores of a store")
    show.add_argument("--store", required=True)
    show.add_argument("--run", help="run name (default: every run in the store)")
    show.add_argument("--metric", default="prefix_matching", help="head score to rank by (default prefix_matching)")
    show.add_argument("--step", type=int, help="checkpoint step (default: the last scanned)")
    show.add_argument("--top", type=int, default=10, help="how many heads (default 10)")
    show.set_defaults(func=_show)

    report = sub.add_parser(
        "report",
        help="draw a store's runs as figures (PNG) and an HTML page",
        description="Figures of each run (phase change, head maps, copying vs prefix matching, "
        "K-composition, per-token loss, ablations, verdicts) and DIR/index.html embedding them. "
        "Reads the store only; the page needs no network.",
    )
    report.add_argument("--store", required=True)
    report.add_argument("--run", help="only this run (default: every run in the store)")
    report.add_argument("--out", required=True, metavar="DIR", help="output directory (created; its report files are replaced)")
    report.set_defaults(func=_report)

    export = sub.add_parser("export", help="write a store's scores as CSV or Parquet")
    export.add_argument("--store", required=True)
    export.add_argument("--table", required=True, choices=["heads", "pairs", "model"])
    export.add_argument("--format", required=True, choices=["csv", "parquet"])
    export.add_argument("--out", required=True, help="output file")
    export.add_argument("--run", help="only this run (default: all)")
    export.set_defaults(func=_export)

    convert = sub.add_parser("convert", help="convert checkpoints of another format into an Orbax trajectory")
    convert_formats = convert.add_subparsers(dest="format", required=True)
    hf = convert_formats.add_parser(
        "hf",
        help="Hugging Face revisions (stepN, checkpoint-N, revision-*) or one model directory",
        description="Write each selected Hugging Face revision (config.json + safetensors) as one Orbax "
        "step in jaxinduct's canonical layout. Resumable.",
    )
    hf.add_argument("source", metavar="SOURCE")
    hf.add_argument("--out", required=True, help="Orbax trajectory directory to write")
    hf.add_argument("--steps", default="all", help="all | latest | N | A:B | A:B:S | every:N, comma-separated")
    hf.set_defaults(func=_convert)

    quick = sub.add_parser(
        "quickstart",
        help="train the quickstart model, scan its trajectory, show the induction heads, write a report",
        description="The built-in default job: trains the quickstart preset into DIR/trajectory "
        "(about 3 minutes on 2 CPU cores), scans every checkpoint into DIR/results.sqlite and "
        "shows the heads that became induction heads, then writes a report (DIR/report/index.html). "
        "Re-running resumes training and scanning.",
    )
    quick.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    quick.add_argument("--no-progress", action="store_true")
    quick.set_defaults(func=_quickstart)
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
            f"jaxinduct {args.command}: interrupted; finished work (committed checkpoints, scanned "
            "batches) is kept, and the same command resumes where it stopped",
            file=sys.stderr,
        )
        return 130


def entry_point() -> None:
    # Orbax and absl log at INFO by default; a CLI user wants our output, not theirs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
