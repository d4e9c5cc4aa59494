"""What ``jaxinduct show`` prints: the top heads of a run at one step, as a terminal table.

``render_show`` reads each run of a results store once into a ``RunView``
(``jaxinduct.results.run_view``) and returns the text; the CLI only prints it. A run's
section is a pure function of its view (``show_run``).

One section per run: a header (run, source, probe hash, checkpoint counts, the step
shown), the top heads by one head metric at that step with the headline scores beside
them (docs/scores.md defines each; the score registry says which are headline), the step
each listed head formed at (docs/scores.md, "Formation": always about prefix_matching,
whatever metric ranks the heads), the run's model scores at that step, a one-line
trajectory of the best head, and the failed checkpoints. A run is read at its latest
probe hash, as every store reader does. Numbers have 3 decimals; NaN (not defined) is "-".
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass

import numpy as np

from jaxinduct.report.format import first_line, format_value, format_verdict, head_name, wrap
from jaxinduct.report.headline import context_columns, model_metrics, verdict_columns
from jaxinduct.results.phase import FORMATION_METRIC, PHASE_METRICS  # PHASE_METRICS: model rows whose value is a step
from jaxinduct.results.run_view import HeadScoreSlice, RunView, load_run_view, select_runs
from jaxinduct.results.store import ResultStore, StoreError

MIN_WIDTH = 80  # never lay out for fewer columns than this unless a width is passed
MAX_FAILED_SHOWN = 5
STEPS_NAMED = 3  # an unknown-step error names this many first and last steps, not all of them
_GAP = "  "  # between table columns
# Context and verdict columns carry the registry's short titles, spelled out in the legend,
# so that every column fits 80 terminal columns; the full names would need about 150.


def _format_step_value(value: float) -> str:
    # Phase-change rows hold a step; an interpolated one may not be whole.
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(width - 3, 0)] + "..."


# --- a table that drops optional columns from the right to fit --------------------------------


@dataclass(frozen=True)
class Column:
    title: str
    cells: list[str]
    optional: bool = True
    left: bool = False  # text columns read better left-aligned, numbers right-aligned

    @property
    def width(self) -> int:
        return max(len(self.title), *(len(c) for c in self.cells)) if self.cells else len(self.title)

    def cell(self, text: str) -> str:
        return text.ljust(self.width) if self.left else text.rjust(self.width)


def fit_columns(columns: Sequence[Column], width: int) -> tuple[list[Column], list[Column]]:
    """(kept, dropped): optional columns dropped from the right until a row fits ``width``."""
    kept = list(columns)
    dropped: list[Column] = []

    def row_width() -> int:
        return sum(c.width for c in kept) + len(_GAP) * (len(kept) - 1)

    while row_width() > width:
        optional = [i for i, c in enumerate(kept) if c.optional]
        if not optional:
            break  # only required columns left; the final clip keeps lines within width
        dropped.insert(0, kept.pop(optional[-1]))
    return kept, dropped


def table_lines(columns: Sequence[Column]) -> list[str]:
    rows = [[c.cell(c.title) for c in columns]]
    rows += [[c.cell(c.cells[i]) for c in columns] for i in range(len(columns[0].cells))]
    return [_GAP.join(row).rstrip() for row in rows]


# --- what is shown of a run ------------------------------------------------------------------------


def _steps_named(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 2 * STEPS_NAMED:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:STEPS_NAMED])) + ", ..., " + ", ".join(map(str, steps[-STEPS_NAMED:]))


def choose_step(view: RunView, step: int | None) -> int | None:
    """The step to show: ``step`` checked against the done steps, or the last one (None if none)."""
    done = view.done_steps
    if step is None:
        return done[-1] if done else None
    if step in done:
        return step
    record = view.record(step)
    if record is not None:  # a failed step: say why, so the fix is not a guess
        why = f"step {step} failed ({first_line(record.error)})"
    else:
        why = f"no done checkpoint at step {step}"
    raise StoreError(
        f"{view.store_path}: run {view.name!r} has {why}; done steps ({len(done)}): {_steps_named(done)}. "
        "Fix: pass one of them with --step, or leave --step out to show the last."
    )


def metric_grid(view: RunView, metric: str) -> np.ndarray:
    """[step, layer, head] of ``metric``; StoreError naming the run's metrics if it has none."""
    if metric in view.grids:  # a stored metric has a value somewhere: NaN is never stored
        return view.grids[metric]
    raise StoreError(
        f"{view.store_path}: run {view.name!r} has no head score {metric!r}; it has: {', '.join(sorted(view.grids)) or 'none'}. "
        "Fix: pass one of them with --metric (docs/scores.md describes each)."
    )


def header_lines(view: RunView, step: int | None, width: int) -> list[str]:
    done, failed = view.done_steps, view.failed
    lines = [f"run: {view.name}", f"source: {view.source}"]
    probe = view.probe_hash or "- (nothing scanned yet)"
    if view.other_hashes:
        probe += f" (older probe hashes, not shown: {', '.join(view.other_hashes)})"
    lines.append(f"probe hash: {probe}")
    span = f"; done steps {done[0]} to {done[-1]}" if done else ""
    lines.append(f"checkpoints: {len(done)} done, {len(failed)} failed{span}")
    if step is not None:
        notes = ["last done step"] if step == done[-1] else []
        record = view.record(step)
        if record is not None and record.tokens_seen is not None:
            notes.append(f"tokens seen {record.tokens_seen:,}")
        lines.append(f"step: {step}" + (f" ({'; '.join(notes)})" if notes else ""))
    # Wrapped, not clipped: a long source path is worth reading whole.
    return [wrapped for line in lines for wrapped in wrap(line, width)]


def top_heads(values: np.ndarray, top: int) -> list[tuple[int, int]]:
    """(layer, head) of the ``top`` largest defined values, descending; ties by layer then head."""
    defined = [(float(values[lh]), lh) for lh in zip(*np.nonzero(~np.isnan(values)))]
    defined.sort(key=lambda item: (-item[0], item[1]))
    return [(int(layer), int(head)) for _, (layer, head) in defined[:top]]


def head_columns(
    metric: str, heads: list[tuple[int, int]], at_step: dict[str, np.ndarray], formed: np.ndarray
) -> list[Column]:
    """Required columns (rank, head, metric, formed), then context and verdict columns present at the step."""
    columns = [
        Column("#", [str(i + 1) for i in range(len(heads))], optional=False),
        Column("head", [head_name(*lh) for lh in heads], optional=False, left=True),
        Column(metric, [format_value(at_step[metric][lh]) for lh in heads], optional=False),
        Column("formed", [str(formed[lh]) if formed[lh] >= 0 else "-" for lh in heads], optional=False),
    ]
    for name, title in context_columns():
        if name != metric and name in at_step:  # the shown metric is already the third column
            columns.append(Column(title, [format_value(at_step[name][lh]) for lh in heads]))
    for name, title in verdict_columns():
        if name != metric and name in at_step:
            columns.append(Column(title, [format_verdict(at_step[name][lh]) for lh in heads]))
    return columns


def legend_text(kept: Sequence[Column], dropped: Sequence[Column], threshold: float) -> str:
    full = {title: name for name, title in (*context_columns(), *verdict_columns())}
    parts = [f"formed = first step from which {FORMATION_METRIC} stays > {threshold:g}"]
    parts += [f"{c.title} = {full[c.title]}" for c in kept if c.title in full]
    text = "; ".join(parts)
    if dropped:
        text += f" (left out to fit the width: {', '.join(full.get(c.title, c.title) for c in dropped)})"
    return text + "."


def head_table_lines(view: RunView, metric: str, step: int, top: int, at_step: dict[str, np.ndarray], width: int) -> list[str]:
    heads = top_heads(at_step[metric], top)
    if not heads:
        return [f"no head has a defined {metric} at step {step}."]
    kept, dropped = fit_columns(head_columns(metric, heads, at_step, view.formed), width)
    lines = [f"top {len(heads)} heads by {metric} at step {step}:"]
    return lines + table_lines(kept) + wrap(legend_text(kept, dropped, view.thresholds.prefix_matching), width)


def _phase_value(view: RunView, metric: str, step: int) -> str | None:
    values = view.model.get(metric)
    if values is None:
        return None
    # Stored at the step its analysis ran: prefer the step shown, else the latest analysis.
    here = values[view.index(step)]
    if not math.isnan(here):
        return _format_step_value(float(here))
    last = int(np.flatnonzero(~np.isnan(values))[-1])
    return f"{_format_step_value(float(values[last]))} (recorded at step {int(view.steps[last])})"


def model_lines(view: RunView, step: int, width: int) -> list[str]:
    i = view.index(step)
    values = {name: float(series[i]) for name, series in view.model.items() if not math.isnan(series[i])}
    listed = model_metrics()
    parts = [f"{name} {format_value(values.get(name))}" for name in listed]
    known = (*listed, *PHASE_METRICS)
    parts += [f"{name} {format_value(v)}" for name, v in sorted(values.items()) if name not in known]
    for name in PHASE_METRICS:
        shown = _phase_value(view, name, step)
        if shown is not None:
            parts.append(f"{name} step {shown}")
    return wrap(f"model scores at step {step}: " + ", ".join(parts), width)


def _best(values: np.ndarray) -> tuple[float, str]:
    if np.isnan(values).all():
        return math.nan, ""
    layer, head = np.unravel_index(np.nanargmax(values), values.shape)
    return float(values[layer, head]), head_name(int(layer), int(head))


def trajectory_line(metric: str, steps: np.ndarray, grid: np.ndarray, step: int) -> str:
    """Max over heads of ``metric`` at the run's first done step and at the step shown."""
    (first_value, first_head), (value, head) = _best(grid[0]), _best(grid[int(np.searchsorted(steps, step))])

    def at(v: float, h: str, s: int) -> str:
        return f"{format_value(v)} at step {s}" + (f" ({h})" if h else "")

    return f"max {metric} over heads: {at(first_value, first_head, int(steps[0]))} -> {at(value, head, step)}"


def failed_lines(view: RunView) -> list[str]:
    failed = view.failed
    if not failed:
        return []
    lines = [f"failed checkpoints ({len(failed)}; a rescan retries them):"]
    lines += [f"  step {r.step}: {first_line(r.error)}" for r in failed[:MAX_FAILED_SHOWN]]
    if len(failed) > MAX_FAILED_SHOWN:
        lines.append(f"  ... and {len(failed) - MAX_FAILED_SHOWN} more")
    return lines


# --- sections and the entry point -----------------------------------------------------------------


def show_run(view: RunView, metric: str, step: int | None, top: int, width: int) -> list[str]:
    """One run's section; StoreError for a step or metric the run does not have."""
    chosen = choose_step(view, step)
    if chosen is None:
        return [*header_lines(view, None, width), "", "no done checkpoints yet: nothing to show.", *failed_lines(view)]
    grid = metric_grid(view, metric)
    i = view.index(chosen)
    # The head scores defined at this step (a score not computed here gets no column) ...
    at_step = {name: g[i] for name, g in view.grids.items() if not np.isnan(g[i]).all()}
    at_step[metric] = grid[i]  # ... and the shown metric, even if all NaN at this step
    lines = [*header_lines(view, chosen, width), ""]
    lines += head_table_lines(view, metric, chosen, top, at_step, width)
    lines += ["", *model_lines(view, chosen, width), *wrap(trajectory_line(metric, view.steps, grid, chosen), width)]
    failed = failed_lines(view)
    return lines + (["", *failed] if failed else [])


def _default_width() -> int:
    return max(shutil.get_terminal_size().columns, MIN_WIDTH)


@dataclasses.dataclass(frozen=True)
class ShowConfig:
    """Print the top heads and model scores of a store."""

    store: str
    """results store (SQLite file)"""
    run: str | None = None
    """run name (default: every run in the store)"""
    metric: str = FORMATION_METRIC
    """head score to rank by (`jaxinduct scores` lists them)"""
    step: int | None = None
    """checkpoint step (default: the last scanned)"""
    top: int = 10
    """how many heads"""


def render_show(
    store: ResultStore,
    *,
    run: str | None = ShowConfig.run,
    metric: str = ShowConfig.metric,
    step: int | None = ShowConfig.step,
    top: int = ShowConfig.top,
    width: int | None = None,
) -> str:
    """The text of ``jaxinduct show``: a section per run (``run`` alone if given).

    Raises StoreError for an empty store, an unknown run, metric or step (naming what
    exists), or ``top`` < 1. With several runs and no ``run``, a run that lacks the asked
    metric or step gets a one-line note in its section instead, so the others still show;
    the error is raised only when no run has it.
    """
    if top < 1:
        raise StoreError(f"--top must be at least 1, got {top}.")
    width = _default_width() if width is None else width
    runs = select_runs(store, run, "show")
    sections: list[list[str]] = []
    errors: list[StoreError] = []
    for record in runs:
        try:
            # Every head score at the step shown, and at every step only the ranking metric
            # (the trajectory line) and prefix_matching (formation, the phase change).
            needed = HeadScoreSlice(whole=(metric,), step=step)
            view = load_run_view(store, record.name, record.source, figure_data=False, head_slice=needed)
            sections.append(show_run(view, metric, step, top, width))
        except StoreError as e:
            if len(runs) == 1:
                raise
            errors.append(e)
            sections.append([f"run: {record.name}", *wrap(f"not shown: {e}", width)])
    if len(errors) == len(runs):
        raise errors[0]
    lines = [f"{len(runs)} runs in {store.path}:", ""] if len(runs) > 1 else []
    for i, section in enumerate(sections):
        lines += ([""] if i else []) + section
    return "\n".join(_clip(line, width) for line in lines) + "\n"
