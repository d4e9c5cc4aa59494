"""`jaxinduct quickstart`: the built-in default job, end to end.

Train the quickstart preset (a 2-layer attention-only model on tiled random blocks, in
which induction heads form within a few hundred steps), scan every checkpoint of its
trajectory with every score, show the heads that became induction heads, and write the
report (figures and an HTML page) into DIR/report. Training and scanning each
resume: re-running after an interruption continues training and scanning where they
stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxinduct.train.data import TiledBlocks
from jaxinduct.scores.probes import ProbeConfig
from jaxinduct.report.page import write_report
from jaxinduct.engine.scan import ScanConfig, scan
from jaxinduct.report.show import render_show
from jaxinduct.results.store import ResultStore
from jaxinduct.train.trainer import get_preset, train

TRAJECTORY, STORE, DATASET, REPORT = "trajectory", "results.sqlite", "icl_dataset.npy", "report"
# The quickstart context is 128 tokens, too short for Olsson's indices 500 and 50.
ICL_LATE, ICL_EARLY, DATASET_EXAMPLES = 100, 10, 16


def quickstart_dataset(seed: int = 10_000) -> np.ndarray:
    """Held-out sequences of the quickstart corpus (another seed than training) for icl_score."""
    spec = get_preset("quickstart").model
    corpus = TiledBlocks(
        d_vocab=spec.d_vocab, seq_len=spec.n_ctx, batch_size=DATASET_EXAMPLES,
        min_block=spec.n_ctx // 8, max_block=spec.n_ctx // 2, seed=seed, bos_token_id=spec.bos_token_id or 0,
    )  # fmt: skip
    return np.asarray(corpus.batch(0))


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """The built-in default job: trains the quickstart preset into OUT/trajectory (about 3
    minutes on 2 CPU cores), scans every checkpoint into OUT/results.sqlite, shows the heads
    that became induction heads and writes a report (OUT/report/index.html). Re-running
    resumes training and scanning."""

    out: str = "runs/quickstart"
    """output directory"""
    progress: bool = True
    """show progress"""


def quickstart(out: str | Path = QuickstartConfig.out, *, progress: bool = QuickstartConfig.progress) -> int:
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    print(f"1/4 training the quickstart model into {out / TRAJECTORY}", flush=True)
    result = train(get_preset("quickstart"), out / TRAJECTORY, progress=progress)
    print(f"    {len(result.steps_saved)} checkpoints, steps {result.steps_saved[0]}..{result.steps_saved[-1]}")
    np.save(out / DATASET, quickstart_dataset())
    print(f"2/4 scanning every checkpoint into {out / STORE}", flush=True)
    options = ScanConfig(
        source=str(out / TRAJECTORY), store=str(out / STORE), run="quickstart", dataset=str(out / DATASET),
        probe=ProbeConfig(icl_late=ICL_LATE, icl_early=ICL_EARLY), progress=progress,
    )  # fmt: skip
    summary = scan(options)
    print("    " + summary.describe().replace("\n", "\n    "))
    print("3/4 the heads that became induction heads:\n", flush=True)
    with ResultStore.open(out / STORE, create=False, readonly=True) as store:
        print(render_show(store, run="quickstart", metric="prefix_matching", top=8).rstrip())
        print(f"\n4/4 writing the report into {out / REPORT}", flush=True)
        report = write_report(store, out / REPORT, run="quickstart")
    print(f"    open {report.index.resolve()}")
    print(f"\nexplore: jaxinduct show --store {out / STORE} --metric copying")
    print(f"         jaxinduct export --store {out / STORE} --table heads --format csv --out heads.csv")
    return 1 if summary.failed else 0
