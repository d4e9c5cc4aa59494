"""`jaxinduct report`: figures of a run's induction heads over training, and an HTML page.

For each run of a results store, ``write_report`` reads the run once into a ``RunView``
(``jaxinduct.results.run_view``), draws the figures of ``jaxinduct.report.figures`` from
it (docs/reports.md lists them), and writes index.html beside them: a summary table per
run, the table of its induction heads, and every figure, with no script and no remote
resource, so that it opens offline and can be mailed as a folder.

The report only reads the store. The phase change it marks is detected afresh from the
stored scores (the same function `scan` records with), so it is current even for a store
scanned by an older jaxinduct.
"""

from __future__ import annotations

import html
import math
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxinduct.report.figures import (
    FIGURES,
    ablation_effect,
    highlighted_heads,
    induction_heads,
    save_figure,
    strongest_first,
)
from jaxinduct.report.format import format_value, head_name
from jaxinduct.report.headline import map_metrics, model_metrics, verdict_columns, words
from jaxinduct.results.run_view import RunView, load_run_view, select_runs
from jaxinduct.results.store import ResultStore

CAPTIONS = {
    "phase_change": "ICL score, induction loss and every head's prefix matching over training; "
    "the detected phase change is shaded, the strongest induction heads (and the heads whose ablation matters most) "
    "are in colour, the other heads grey (in a large model, one band: their 10-90% range, median, min and max).",
    "head_maps": "Layer x head maps of the headline scores at the first step, the phase change and the last step.",
    "copying_vs_prefix": "Copying against prefix matching, one point per head per step; induction heads move to the "
    "top right as they form. Dashed: the behavioural verdict's thresholds.",
    "composition": "K-composition of every (earlier source head, later destination head) pair at three steps "
    "(in a large model, the strongest pair of each pair of layers, and the strongest head pairs named): "
    "induction heads read the previous-token head's output in their keys.",
    "per_token_loss": "Loss at each context index over training; after the phase change, late tokens get cheaper.",
    "ablation": "The change of ICL score when one head is ablated (full, and with attention patterns frozen), "
    "and each full ablation's per-token-loss change projected on the phase change's direction; "
    "the same heads in colour as above, the others grey.",
    "verdicts": "Which heads the behavioural verdict (prefix matching and copying) and the mechanistic verdict "
    "(OV copying, QK positivity, a previous-token head upstream) flag at each step, and where they disagree.",
}

MAX_TABLE_ROWS = 32  # induction heads the table lists at most (the strongest); the note says how many more

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
.note { color: #666; }
"""


def _verdict(value: float) -> str:
    """A 0/1 verdict as 0 or 1; not computed as "-"."""
    return "-" if not math.isfinite(value) else f"{value:.0f}"


def _summary_rows(view: RunView) -> list[tuple[str, str]]:
    steps = view.steps
    rows = [
        ("source", view.source),
        ("probe hash", str(view.probe_hash)),
        ("checkpoints", f"{len(steps)} done (steps {steps[0]}..{steps[-1]}), {len(view.failed)} failed"),
        ("phase change", "none found" if view.phase is None else view.phase.describe()),
    ]
    for metric in model_metrics():
        values = view.model.get(metric)
        if values is not None:  # a stored score has a value somewhere
            ok = np.nonzero(~np.isnan(values))[0]
            rows.append((metric, f"{format_value(values[ok[0]])} at step {steps[ok[0]]} -> "
                                 f"{format_value(values[ok[-1]])} at step {steps[ok[-1]]}"))  # fmt: skip
    return rows


def _table_heads(view: RunView) -> list[tuple[int, int]]:
    """The induction heads the table lists, by (layer, head): all of them up to MAX_TABLE_ROWS, else the
    strongest by prefix matching at the last step (the figures' order)."""
    heads = induction_heads(view)
    if len(heads) <= MAX_TABLE_ROWS:
        return heads
    return sorted(strongest_first(view, heads)[:MAX_TABLE_ROWS])


def _head_table(view: RunView) -> str:
    heads = induction_heads(view)
    if not heads:
        return '<p class="note">No head became an induction head (no formation, no verdict at the last step).</p>'
    scores = [name for name, _ in map_metrics()]
    verdicts = [name for name, _ in verdict_columns()]
    header = ("head", "formed (step)", *(words(name) for name in (*scores, *verdicts)))
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    listed = _table_heads(view)
    for layer, head in listed:
        formed = int(view.formed[layer, head])
        cells = [
            head_name(layer, head),
            "-" if formed < 0 else str(formed),
            *(format_value(float(view.grid(name)[-1, layer, head])) for name in scores),
            *(_verdict(float(view.grid(name)[-1, layer, head])) for name in verdicts),
        ]
        lines.append("<tr>" + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells) + "</tr>")
    lines.append("</table>")
    if len(listed) < len(heads):
        lines.append(f'<p class="note">{len(heads) - len(listed)} more induction heads, weaker by prefix matching at '
                     f"the last step, are not listed (`jaxinduct show --top {len(heads)}` lists them all).</p>")  # fmt: skip
    return "\n".join(lines)


def _ablation_note(view: RunView) -> list[str]:
    """The heads the figures colour for their ablation effect alone, with that effect: they are not in the table."""
    highlight = highlighted_heads(view)
    if not highlight.by_ablation:
        return []
    effect = ablation_effect(view)
    heads = [h for h in highlight.named if h in highlight.by_ablation]
    named = ", ".join(f"{head_name(*h)} ({format_value(float(effect[h]))})" for h in heads)
    return [f'<p class="note">Also in colour in the figures, for the largest change of ICL score their full ablation '
            f"causes at any step (dashed): {html.escape(named)}.</p>"]  # fmt: skip


def _run_section(view: RunView, figures: dict[str, Path], out: Path) -> str:
    parts = [f"<h2>run {html.escape(view.name)}</h2>", "<table>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(view)]
    parts.append("</table>")
    parts.append(f"<h3>induction heads at the last step (step {view.steps[-1]})</h3>")
    parts.append(_head_table(view))
    parts += _ablation_note(view)
    for name, path in figures.items():
        src = html.escape(path.relative_to(out).as_posix(), quote=True)
        parts.append(f'<figure><img src="{src}" alt="{html.escape(name)}">'
                     f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>")  # fmt: skip
    return "\n".join(parts)


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"
    slug, i = base, 1
    while slug in taken:
        i += 1
        slug = f"{base}_{i}"
    taken.add(slug)
    return slug


# --- the entry point ------------------------------------------------------------------------------


@dataclass
class Report:
    index: Path
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)  # run -> figure name -> file
    skipped: list[str] = field(default_factory=list)  # runs without a done checkpoint

    def describe(self) -> str:
        n = sum(len(f) for f in self.figures.values())
        text = f"report: {self.index} ({len(self.figures)} run(s), {n} figures)"
        return text + "".join(f"\n  run {r!r} has no done checkpoint yet: not in the report" for r in self.skipped)


def _run_figures(view: RunView, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, draw in FIGURES:
        path = folder / f"{name}.png"
        path.unlink(missing_ok=True)  # a figure this run no longer has must not linger from an older report
        figure = draw(view)
        if figure is not None:
            figures[name] = save_figure(figure, path)
    return figures


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Figures of each run (phase change, head maps, copying vs prefix matching,
    K-composition, per-token loss, ablations, verdicts) and OUT/index.html embedding them.
    Reads the store only; the page needs no network."""

    store: str
    """results store (SQLite file)"""
    out: str
    """output directory (created; its report files are replaced)"""
    run: str | None = None
    """only this run (default: every run in the store)"""


def write_report(store: ResultStore, out: str | Path, *, run: str | None = ReportConfig.run) -> Report:
    """Figures and index.html for ``run`` (every run if None) of ``store``, in ``out``."""
    runs = select_runs(store, run, "report")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "index.html")
    sections, taken = [], set()
    for record in runs:
        view = load_run_view(store, record.name, record.source)
        if not view.done_steps:
            report.skipped.append(record.name)
            continue
        figures = _run_figures(view, out / _slug(record.name, taken))
        report.figures[record.name] = figures
        sections.append(_run_section(view, figures, out))
    if not sections:
        sections.append('<p class="note">No run has a done checkpoint yet.</p>')
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>jaxinduct report: {html.escape(str(store.path.name))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>jaxinduct report</h1>",
        f'<p class="note">store {html.escape(str(store.path))}; scores are defined in docs/scores.md.</p>',
        *sections,
        "</body></html>",
    ]
    report.index.write_text("\n".join(page) + "\n", encoding="utf-8")
    return report
