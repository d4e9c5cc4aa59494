"""What ``jaxinduct show`` prints: the top heads of a run at one step, as a terminal table.

``render_show`` reads a results store (``jaxinduct.results.store``) and returns the text; the CLI
only prints it. Pure Python and numpy, no JAX, so ``show`` starts in a blink and runs
wherever the store can be copied to.

One section per run: a header (run, source, probe hash, checkpoint counts, the step
shown), the top heads by one head metric at that step with the other headline scores
beside them (docs/scores.md defines each), when each listed head first scored above
``FORMED_THRESHOLD``, the run's model scores at that step, a one-line trajectory of the
best head, and the failed checkpoints. A run is read at its latest probe hash, as every
store reader does. Numbers have 3 decimals; NaN (not defined) is "-".
"""

from __future__ import annotations

import math
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxinduct.results.phase import PHASE_METRICS  # model-level rows whose value is a step
from jaxinduct.results.store import CheckpointRecord, ResultStore, StoreError

DEFAULT_METRIC = "prefix_matching"
FORMED_THRESHOLD = 0.5  # "formed": the metric first exceeds this (strict >), as the verdicts use strict >
MIN_WIDTH = 80  # never lay out for fewer columns than this unless a width is passed
MAX_FAILED_SHOWN = 5
STEPS_NAMED = 3  # an unknown-step error names this many first and last steps, not all of them

# (store name, column title). Short titles, spelled out in the legend, so that every
# column fits 80 terminal columns; the full names would need about 150.
CONTEXT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("prefix_matching", "prefix"),
    ("copying", "copy"),
    ("ov_copying", "ov_copy"),
    ("previous_token", "prev"),
    ("induction_qk_positivity", "qk_pos"),
)
VERDICT_COLUMNS: tuple[tuple[str, str], ...] = (("induction_behaviour", "behav"), ("induction_mechanism", "mech"))
MODEL_METRICS = ("icl_score", "induction_loss")  # always listed, "-" when the scan did not compute them
_GAP = "  "  # between table columns


# --- formatting --------------------------------------------------------------------------------


def format_value(value: float | None) -> str:
    """3 decimals; NaN or None (not defined) as "-"."""
    if value is None or math.isnan(value):
        return "-"
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text  # a tiny negative is not worth a sign


def format_verdict(value: float) -> str:
    """A 0/1 verdict as yes/no; NaN (not computed for this head) as "-"."""
    if math.isnan(value):
        return "-"
    return "yes" if value >= 0.5 else "no"


def _format_step_value(value: float) -> str:
    # Phase-change rows hold a step; an interpolated one may not be whole.
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(width - 3, 0)] + "..."


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False) or [""]


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


# --- what one run holds at its latest probe hash ------------------------------------------------


@dataclass(frozen=True)
class RunView:
    name: str
    source: str
    probe_hash: str | None  # None: nothing scanned yet
    other_hashes: list[str]  # older probe configurations, not shown
    records: list[CheckpointRecord]  # at probe_hash, by step

    @property
    def done_steps(self) -> list[int]:
        return [r.step for r in self.records if r.status == "done"]

    @property
    def failed(self) -> list[CheckpointRecord]:
        return [r for r in self.records if r.status == "failed"]

    def record(self, step: int) -> CheckpointRecord | None:
        return next((r for r in self.records if r.step == step), None)


def load_run(store: ResultStore, name: str, source: str) -> RunView:
    hashes = store.probe_hashes(name)
    # The latest done hash, as the readers use; a run with failures only is shown at its latest hash.
    probe_hash = store.latest_probe_hash(name) or (hashes[-1] if hashes else None)
    records = store.steps(name, probe_hash) if probe_hash is not None else []
    return RunView(name, source, probe_hash, [h for h in hashes if h != probe_hash], records)


def _steps_named(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 2 * STEPS_NAMED:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:STEPS_NAMED])) + ", ..., " + ", ".join(map(str, steps[-STEPS_NAMED:]))


def choose_step(store: ResultStore, view: RunView, step: int | None) -> int | None:
    """The step to show: ``step`` checked against the done steps, or the last one (None if none)."""
    done = view.done_steps
    if step is None:
        return done[-1] if done else None
    if step in done:
        return step
    record = view.record(step)
    if record is not None:  # a failed step: say why, so the fix is not a guess
        why = f"step {step} failed ({_first_line(record.error)})"
    else:
        why = f"no done checkpoint at step {step}"
    raise StoreError(
        f"{store.path}: run {view.name!r} has {why}; done steps ({len(done)}): {_steps_named(done)}. "
        "Fix: pass one of them with --step, or leave --step out to show the last."
    )


def metric_grid(store: ResultStore, view: RunView, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values [step, layer, head]) of ``metric``; StoreError naming the run's metrics if it has none."""
    steps, grid = store.head_score_grid(view.name, metric, probe_hash=view.probe_hash)
    if not np.isnan(grid).all():
        return steps, grid
    # Error path only: reading every head score to list the names is fine here.
    names = sorted(set(store.head_scores(view.name, probe_hash=view.probe_hash)["metric"].tolist()))
    raise StoreError(
        f"{store.path}: run {view.name!r} has no head score {metric!r}; it has: {', '.join(names) or 'none'}. "
        "Fix: pass one of them with --metric (docs/scores.md describes each)."
    )


def scores_at(store: ResultStore, view: RunView, step: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Every head metric at ``step`` as [layer, head] arrays, NaN where not stored."""
    rows = store.head_scores(view.name, step=step, probe_hash=view.probe_hash)
    out: dict[str, np.ndarray] = {}
    for metric in sorted(set(rows["metric"].tolist())):
        mine = rows[rows["metric"] == metric]
        out[metric] = np.full(shape, np.nan)
        out[metric][mine["layer"], mine["head"]] = mine["value"]
    return out


# --- the parts of a section ---------------------------------------------------------------------


def _first_line(error: str | None) -> str:
    lines = (error or "").strip().splitlines()
    return lines[0] if lines else "(no message)"


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
    return [wrapped for line in lines for wrapped in _wrap(line, width)]


def top_heads(values: np.ndarray, top: int) -> list[tuple[int, int]]:
    """(layer, head) of the ``top`` largest defined values, descending; ties by layer then head."""
    defined = [(float(values[lh]), lh) for lh in zip(*np.nonzero(~np.isnan(values)))]
    defined.sort(key=lambda item: (-item[0], item[1]))
    return [(int(layer), int(head)) for _, (layer, head) in defined[:top]]


def formed_steps(steps: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """[layer, head] first step whose value exceeds FORMED_THRESHOLD; -1 where it never did.

    Over every done step of the run, also those after the step shown: when a head forms is
    a property of the run, and a later formation is worth seeing from an earlier step.
    """
    above = np.nan_to_num(grid, nan=-np.inf) > FORMED_THRESHOLD  # NaN never counts as formed
    first = np.argmax(above, axis=0)
    return np.where(above.any(axis=0), steps[first], -1)


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
    for name, title in CONTEXT_COLUMNS:
        if name != metric and name in at_step:  # the shown metric is already the third column
            columns.append(Column(title, [format_value(at_step[name][lh]) for lh in heads]))
    for name, title in VERDICT_COLUMNS:
        if name != metric and name in at_step:
            columns.append(Column(title, [format_verdict(at_step[name][lh]) for lh in heads]))
    return columns


def legend_text(metric: str, kept: Sequence[Column], dropped: Sequence[Column]) -> str:
    titles = dict(CONTEXT_COLUMNS + VERDICT_COLUMNS)
    full = {title: name for name, title in titles.items()}
    parts = [f"formed = first step with {metric} > {FORMED_THRESHOLD}"]
    parts += [f"{c.title} = {full[c.title]}" for c in kept if c.title in full]
    text = "; ".join(parts)
    if dropped:
        text += f" (left out to fit the width: {', '.join(full.get(c.title, c.title) for c in dropped)})"
    return text + "."


def head_table_lines(
    metric: str, step: int, top: int, at_step: dict[str, np.ndarray], formed: np.ndarray, width: int
) -> list[str]:
    heads = top_heads(at_step[metric], top)
    if not heads:
        return [f"no head has a defined {metric} at step {step}."]
    kept, dropped = fit_columns(head_columns(metric, heads, at_step, formed), width)
    lines = [f"top {len(heads)} heads by {metric} at step {step}:"]
    return lines + table_lines(kept) + _wrap(legend_text(metric, kept, dropped), width)


def _phase_value(store: ResultStore, view: RunView, metric: str, step: int) -> str | None:
    rows = store.model_scores(view.name, metric, probe_hash=view.probe_hash)
    if len(rows) == 0:
        return None
    # Stored at the step its analysis ran: prefer the step shown, else the latest analysis.
    exact = rows[rows["step"] == step]
    if len(exact):
        return _format_step_value(float(exact["value"][0]))
    return f"{_format_step_value(float(rows['value'][-1]))} (recorded at step {int(rows['step'][-1])})"


def model_lines(store: ResultStore, view: RunView, step: int, width: int) -> list[str]:
    rows = store.model_scores(view.name, step=step, probe_hash=view.probe_hash)
    values = {str(m): float(v) for m, v in zip(rows["metric"].tolist(), rows["value"].tolist())}
    parts = [f"{name} {format_value(values.get(name))}" for name in MODEL_METRICS]
    known = (*MODEL_METRICS, *PHASE_METRICS)
    parts += [f"{name} {format_value(v)}" for name, v in sorted(values.items()) if name not in known]
    for name in PHASE_METRICS:
        shown = _phase_value(store, view, name, step)
        if shown is not None:
            parts.append(f"{name} step {shown}")
    return _wrap(f"model scores at step {step}: " + ", ".join(parts), width)


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
    lines += [f"  step {r.step}: {_first_line(r.error)}" for r in failed[:MAX_FAILED_SHOWN]]
    if len(failed) > MAX_FAILED_SHOWN:
        lines.append(f"  ... and {len(failed) - MAX_FAILED_SHOWN} more")
    return lines


# --- sections and the entry point -----------------------------------------------------------------


def render_run(
    store: ResultStore, name: str, source: str, metric: str, step: int | None, top: int, width: int
) -> list[str]:
    """One run's section; StoreError for a step or metric the run does not have."""
    view = load_run(store, name, source)
    chosen = choose_step(store, view, step)
    if chosen is None:
        return [*header_lines(view, None, width), "", "no done checkpoints yet: nothing to show.", *failed_lines(view)]
    steps, grid = metric_grid(store, view, metric)
    at_step = scores_at(store, view, chosen, grid.shape[1:])
    at_step[metric] = grid[int(np.searchsorted(steps, chosen))]  # present even if all NaN at this step
    lines = [*header_lines(view, chosen, width), ""]
    lines += head_table_lines(metric, chosen, top, at_step, formed_steps(steps, grid), width)
    lines += ["", *model_lines(store, view, chosen, width), *_wrap(trajectory_line(metric, steps, grid, chosen), width)]
    failed = failed_lines(view)
    return lines + (["", *failed] if failed else [])


def run_sources(store: ResultStore, run: str | None, command: str = "show") -> list[tuple[str, str]]:
    """(name, source) of ``run``, or of every run if None; StoreError naming the fix for an
    empty store or an unknown run (``command``: the verb the messages use)."""
    runs = store.runs()
    if not runs:
        raise StoreError(
            f"{store.path}: the results store is empty (no runs yet). "
            f"Fix: fill it with `jaxinduct scan SOURCE --store {store.path}`, then {command} it."
        )
    if run is None:
        return [(r.name, r.source) for r in runs]
    for r in runs:
        if r.name == run:
            return [(r.name, r.source)]
    known = ", ".join(repr(r.name) for r in runs)
    raise StoreError(
        f"{store.path}: no run {run!r} in the results store; it has: {known}. "
        f"Fix: pass one of them with --run, or leave --run out to {command} every run."
    )


def _default_width() -> int:
    return max(shutil.get_terminal_size().columns, MIN_WIDTH)


def render_show(
    store: ResultStore,
    *,
    run: str | None = None,
    metric: str = DEFAULT_METRIC,
    step: int | None = None,
    top: int = 10,
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
    runs = run_sources(store, run)
    sections: list[list[str]] = []
    errors: list[StoreError] = []
    for name, source in runs:
        try:
            sections.append(render_run(store, name, source, metric, step, top, width))
        except StoreError as e:
            if len(runs) == 1:
                raise
            errors.append(e)
            sections.append([f"run: {name}", *_wrap(f"not shown: {e}", width)])
    if len(errors) == len(runs):
        raise errors[0]
    lines = [f"{len(runs)} runs in {store.path}:", ""] if len(runs) > 1 else []
    for i, section in enumerate(sections):
        lines += ([""] if i else []) + section
    return "\n".join(_clip(line, width) for line in lines) + "\n"
