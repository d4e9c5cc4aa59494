"""`jaxinduct report`: figures of a run's induction heads over training, and an HTML page.

Olsson et al.'s figures are the model. For each run of a results store, ``write_report``
draws (PNG, matplotlib without a display):

- phase_change.png: icl_score, induction_loss and every head's prefix_matching against the
  step (log scale; tokens on the top axis when the store knows them), the detected phase
  change shaded, induction heads drawn in colour and the others in grey;
- head_maps.png: layer x head maps of prefix_matching, copying, ov_copying and
  induction_qk_positivity at the first step, at the phase change and at the last step;
- copying_vs_prefix.png: one point per head per step, coloured by step;
- composition.png: K-composition (source head x destination head) at the same three steps;
- per_token_loss.png: loss by context index over training, when the scan stored curves;
- ablation.png: the change of icl_score when each head is ablated, over training, and each
  ablation's per-token-loss change projected on the phase change's own per-token-loss
  change (SCORES.md), when the scan computed ablations;
- verdicts.png: which heads the behavioural and the mechanistic verdicts flag at each step,
  and where they disagree;

and writes index.html beside them: a summary table per run and every figure, with no
script and no remote resource, so that it opens offline and can be mailed as a folder.

The report only reads the store. The phase change it marks is detected afresh from the
stored scores (the same function `scan` records with), so it is current even for a store
scanned by an older jaxinduct.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from jaxinduct.scores.probes import VerdictThresholds
from jaxinduct.results.phase import Change, DetectionConfig, PhaseChange, RunSeries, detect_phase_change, head_formations, run_series
from jaxinduct.report.show import format_value, head_name, run_sources
from jaxinduct.results.store import CheckpointRecord, ResultStore

DPI = 110
NOT_DEFINED_GREY = "0.82"  # cells and points whose score is not defined (NaN)
MAP_METRICS: tuple[tuple[str, str, tuple[float, float]], ...] = (
    # (store name, title, colour range): prefix matching is a share of attention, the others signed.
    ("prefix_matching", "prefix matching", (0.0, 1.0)),
    ("copying", "copying", (-1.0, 1.0)),
    ("ov_copying", "OV copying", (-1.0, 1.0)),
    ("induction_qk_positivity", "induction QK positivity", (-1.0, 1.0)),
)
HIGHLIGHT_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
MAX_NAMED_HEADS = len(HIGHLIGHT_COLOURS)  # more induction heads than this share one legend entry
MAX_ANNOTATED_CELLS = 64  # head maps print their values when a map has at most this many cells
MAX_HEAD_TICKS = 32  # axes name every head up to this many, else only layers


# --- what a run's figures are drawn from ------------------------------------------------------


@dataclass
class RunData:
    name: str
    source: str
    probe_hash: str
    records: list[CheckpointRecord]
    thresholds: tuple[float, float]  # the behavioural verdict's (prefix_matching, copying)
    series: RunSeries
    loss_curves: dict[int, np.ndarray]  # step -> per_token_loss by context index (model-level)
    grids: dict[str, np.ndarray]  # head metric -> [step, layer, head]
    phase: PhaseChange | None
    formations: dict[tuple[int, int], Change]
    induction_heads: list[tuple[int, int]]  # highlighted: formed, or flagged by a verdict at the last step

    @property
    def steps(self) -> np.ndarray:
        return self.series.steps

    @property
    def shape(self) -> tuple[int, int]:
        return self.series.prefix_matching.shape[1:]  # type: ignore[return-value]

    def tokens_by_step(self) -> dict[int, int]:
        return {r.step: r.tokens_seen for r in self.records if r.status == "done" and r.tokens_seen is not None}

    def key_steps(self) -> list[tuple[str, int]]:
        """(label, step): the first step, the phase change (or the middle of the run), the last."""
        steps = self.steps
        if self.phase is not None:
            # The done step nearest the interval's middle in log(1 + step), the figures' scale.
            middle = math.expm1((math.log1p(self.phase.start) + math.log1p(self.phase.end)) / 2)
            inside = steps[(steps >= self.phase.start) & (steps <= self.phase.end)]
            distance = np.abs(inside - middle)
            # On a tie (a two-checkpoint interval) the later step: the heads as they have formed.
            mid_step, mid_label = int(inside[np.flatnonzero(distance == distance.min())[-1]]), "phase change"
        else:
            mid_step, mid_label = int(steps[len(steps) // 2]), "middle (no phase change)"
        chosen = [("first", int(steps[0])), (mid_label, mid_step), ("last", int(steps[-1]))]
        unique: list[tuple[str, int]] = []
        for label, step in chosen:
            if step not in [s for _, s in unique]:
                unique.append((label, step))
        return unique


def load_run(store: ResultStore, name: str, source: str) -> RunData | None:
    """The run's scores at its latest probe hash; None when it has no done checkpoint."""
    probe_hash = store.latest_probe_hash(name)
    if probe_hash is None:
        return None
    thresholds = _thresholds(store, probe_hash)
    config = DetectionConfig(formed_prefix=thresholds[0])
    steps, grids = store.head_score_grids(name, (
        "prefix_matching", "copying", "ov_copying", "induction_qk_positivity", "induction_behaviour",
        "induction_mechanism", "ablation_icl_delta", "ablation_icl_delta_pattern_preserving",
    ), probe_hash=probe_hash)  # fmt: skip
    series = run_series(store, name, probe_hash, prefix_matching=(steps, grids["prefix_matching"]))
    phase = detect_phase_change(series.steps, series.series, config)
    formations = head_formations(series.steps, series.prefix_matching, config)
    flagged = set(formations)
    for verdict in ("induction_behaviour", "induction_mechanism"):
        grid = grids[verdict]
        if grid.size:
            flagged |= {(int(l), int(h)) for l, h in zip(*np.nonzero(np.nan_to_num(grid[-1]) > 0.5))}
    records = store.steps(name, probe_hash)
    curves = store.curves(name, "per_token_loss", probe_hash=probe_hash)
    loss_curves = {c.step: c.values for c in curves if c.layer == -1}
    return RunData(name, source, probe_hash, records, thresholds, series, loss_curves, grids, phase, formations,
                   sorted(flagged))  # fmt: skip


# --- figure helpers ---------------------------------------------------------------------------


def _step_axis(ax, data: RunData, *, tokens: bool) -> None:
    """Log-scaled step axis that keeps step 0 (symlog, linear below the first positive step)."""
    if len(data.steps) == 1:  # one checkpoint: a plain axis around it, its step as the only tick
        step = int(data.steps[0])
        ax.set_xlim(step - 1, step + 1)
        ax.set_xticks([step])
        ax.set_xlabel("training step (one checkpoint so far)")
        return
    positive = data.steps[data.steps > 0]
    ax.set_xscale("symlog", linthresh=float(positive[0]) if len(positive) else 1.0, linscale=0.5)
    ax.set_xlim(data.steps[0], data.steps[-1] * 1.05 if data.steps[-1] > 0 else 1)
    ax.set_xlabel("training step (log scale)")
    known = data.tokens_by_step()
    if tokens and len(known) >= 2:
        s = np.array(sorted(known), dtype=float)
        t = np.array([known[int(k)] for k in s], dtype=float)
        if np.all(np.diff(t) > 0):
            top = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, s, t), lambda y: np.interp(y, t, s)))
            top.set_xscale("symlog", linthresh=max(float(t[t > 0][0]) if (t > 0).any() else 1.0, 1.0), linscale=0.5)
            top.set_xlabel("tokens seen")


def _shade_phase(ax, phase: PhaseChange | None, *, label: bool = False) -> None:
    if phase is not None:
        ax.axvspan(phase.start, phase.end, color="gold", alpha=0.35, lw=0,
                   label=f"phase change (steps {phase.start}-{phase.end})" if label else None)  # fmt: skip


def _head_colours(heads: Sequence[tuple[int, int]]) -> dict[tuple[int, int], str]:
    return {h: HIGHLIGHT_COLOURS[i % len(HIGHLIGHT_COLOURS)] for i, h in enumerate(heads)}


def _per_head_lines(ax, data: RunData, grid: np.ndarray, *, legend_title: str | None = None) -> None:
    """Every head's series: induction heads in colour (named), the others thin and grey."""
    highlighted = set(data.induction_heads)
    colours = _head_colours(data.induction_heads)
    grey_labelled = False
    for layer, head in np.ndindex(*grid.shape[1:]):
        values = grid[:, layer, head]
        if np.isnan(values).all():
            continue
        if (layer, head) in highlighted:
            named = data.induction_heads.index((layer, head)) < MAX_NAMED_HEADS
            ax.plot(data.steps, values, color=colours[(layer, head)], lw=1.8, marker=".", ms=3,
                    label=head_name(layer, head) if named else None, zorder=3)  # fmt: skip
        else:
            ax.plot(data.steps, values, color="0.6", lw=0.7, alpha=0.7, zorder=2, marker="." if len(values) == 1 else None,
                    label=None if grey_labelled else "other heads")  # fmt: skip
            grey_labelled = True
    ax.legend(fontsize=8, loc="best", ncols=2, title=legend_title, title_fontsize=8)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # tight: nothing clipped, whatever the labels
    return path


def _head_ticks(ax, n_layers: int, n_heads: int, axis: str) -> None:
    n = n_layers * n_heads
    set_ticks, set_labels = (ax.set_xticks, ax.set_xticklabels) if axis == "x" else (ax.set_yticks, ax.set_yticklabels)
    if n <= MAX_HEAD_TICKS:
        set_ticks(range(n))
        set_labels([head_name(l, h) for l in range(n_layers) for h in range(n_heads)], fontsize=7,
                   rotation=90 if axis == "x" else 0)  # fmt: skip
    else:
        set_ticks([l * n_heads + (n_heads - 1) / 2 for l in range(n_layers)])
        set_labels([f"L{l}" for l in range(n_layers)], fontsize=8)


# --- the figures ----------------------------------------------------------------------------------


def phase_change_figure(data: RunData, path: Path) -> Path:
    model_panels = [(m, t) for m, t in (("icl_score", "ICL score\n(loss@late - loss@early)"),
                                        ("induction_loss", "induction loss\n(nats)"))
                    if m in data.series.series]  # fmt: skip
    n_panels = len(model_panels) + 1
    fig = Figure(figsize=(9, 2.4 * n_panels + 1.2), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (metric, title) in zip(axes, model_panels):
        values = data.series.series[metric]
        ok = ~np.isnan(values)
        ax.plot(data.steps[ok], values[ok], color="black", marker=".", ms=4, lw=1.5)
        ax.set_ylabel(title, fontsize=9)
        _shade_phase(ax, data.phase)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    _shade_phase(ax, data.phase, label=True)
    _per_head_lines(ax, data, data.series.prefix_matching)
    ax.set_ylabel("prefix matching\n(per head)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    for a in axes:
        _step_axis(a, data, tokens=a is axes[0])
        if a is not axes[-1]:
            a.set_xlabel("")
    found = "no phase change found" if data.phase is None else f"phase change at steps {data.phase.start}-{data.phase.end}"
    fig.suptitle(f"{data.name}: induction heads over training ({found})", fontsize=11)
    return _save(fig, path)


def _colormap(name: str):
    return colormaps[name].with_extremes(bad=NOT_DEFINED_GREY)


def _text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads on a cell of this colour (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _map_image(ax, values: np.ndarray, vrange: tuple[float, float], cmap_name: str):
    cmap = _colormap(cmap_name)
    norm = Normalize(*vrange)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    n_layers, n_heads = values.shape
    if values.size <= MAX_ANNOTATED_CELLS:
        for layer, head in np.ndindex(n_layers, n_heads):
            v = values[layer, head]
            if not np.isnan(v):
                colour = _text_colour(cmap(norm(v)))
                ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n_heads) if n_heads <= 16 else range(0, n_heads, max(1, n_heads // 8)))
    ax.set_yticks(range(n_layers) if n_layers <= 16 else range(0, n_layers, max(1, n_layers // 8)))
    ax.tick_params(labelsize=7)
    return image


def head_maps_figure(data: RunData, path: Path) -> Path:
    columns = data.key_steps()
    n_layers, n_heads = data.shape
    cell = max(0.35, min(0.6, 6.0 / max(n_heads, 1)))
    width = 1.2 + len(columns) * (n_heads * cell + 0.6)
    height = 0.9 + len(MAP_METRICS) * (n_layers * cell + 0.9)
    fig = Figure(figsize=(max(width, 7.5), max(height, 6)), layout="constrained")
    axes = fig.subplots(len(MAP_METRICS), len(columns), squeeze=False)
    for row, (metric, title, vrange) in enumerate(MAP_METRICS):
        grid = data.grids[metric]
        cmap = "viridis" if vrange[0] == 0 else "RdBu_r"
        image = None
        for col, (label, step) in enumerate(columns):
            ax = axes[row, col]
            index = int(np.searchsorted(data.steps, step))
            values = grid[index] if grid.size else np.full((n_layers, n_heads), np.nan)
            image = _map_image(ax, values, vrange, cmap)
            if row == 0:
                ax.set_title(f"{label}\nstep {step}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{title}\nlayer", fontsize=9)
            if row == len(MAP_METRICS) - 1:
                ax.set_xlabel("head", fontsize=9)
        fig.colorbar(image, ax=list(axes[row]), shrink=0.9, pad=0.01).ax.tick_params(labelsize=7)
    fig.suptitle(f"{data.name}: head scores (grey: not defined)", fontsize=11)
    return _save(fig, path)


def copying_vs_prefix_figure(data: RunData, path: Path) -> Path:
    prefix, copying = data.series.prefix_matching, data.grids["copying"]
    prefix_threshold, copying_threshold = data.thresholds
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.subplots()
    steps = np.broadcast_to(data.steps[:, None, None], prefix.shape) if prefix.size else np.zeros(0)
    ok = ~(np.isnan(prefix) | np.isnan(copying)) if copying.shape == prefix.shape else np.zeros(prefix.shape, bool)
    positive = data.steps[data.steps > 0]
    norm = LogNorm(vmin=float(positive[0]), vmax=float(positive[-1])) if len(positive) >= 2 else Normalize()
    # Step 0 has no place on a log colour scale: drawn at the first positive step's colour.
    colour = np.maximum(steps[ok], positive[0] if len(positive) else 0) if ok.any() else np.zeros(0)
    points = ax.scatter(prefix[ok], copying[ok], c=colour, cmap="viridis", norm=norm, s=10, alpha=0.75, lw=0)
    ax.axvline(prefix_threshold, color="0.3", ls="--", lw=1)
    ax.axhline(copying_threshold, color="0.3", ls="--", lw=1)
    ax.text(0.98, 0.98, "induction by behaviour\n(both thresholds passed)", transform=ax.transAxes,
            ha="right", va="top", fontsize=8, color="0.3")  # fmt: skip
    # Where each induction head ends: open circles in its colour (text labels would collide).
    colours = _head_colours(data.induction_heads)
    for layer, head in data.induction_heads[:MAX_NAMED_HEADS]:
        index = np.nonzero(~np.isnan(prefix[:, layer, head]) & ~np.isnan(copying[:, layer, head]))[0]
        if len(index):
            ax.scatter(prefix[index[-1], layer, head], copying[index[-1], layer, head], s=70, facecolors="none",
                       edgecolors=colours[(layer, head)], linewidths=1.6, label=f"{head_name(layer, head)} at the last step")  # fmt: skip
    if data.induction_heads:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("prefix matching")
    ax.set_ylabel("copying")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    if ok.any():
        fig.colorbar(points, ax=ax, label="training step")
    ax.set_title(f"{data.name}: copying vs. prefix matching, one point per head per step", fontsize=10)
    return _save(fig, path)


def composition_figure(store: ResultStore, data: RunData, path: Path) -> Path | None:
    columns = data.key_steps()
    n_layers, n_heads = data.shape
    n = n_layers * n_heads
    matrices = []
    for _, step in columns:
        rows = store.pair_scores(data.name, "k_composition", step, probe_hash=data.probe_hash)
        matrix = np.full((n, n), np.nan)
        matrix[rows["src_layer"] * n_heads + rows["src_head"], rows["dst_layer"] * n_heads + rows["dst_head"]] = rows["value"]
        matrices.append(matrix)
    if all(np.isnan(m).all() for m in matrices):
        return None
    top = max(float(np.nanmax(m)) for m in matrices if not np.isnan(m).all())
    side = max(3.0, min(5.5, 0.28 * n + 1.5))
    fig = Figure(figsize=(side * len(columns) + 1.2, side + 0.8), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    image = None
    for ax, (label, step), matrix in zip(axes, columns, matrices):
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=_colormap("magma"), vmin=0.0, vmax=top, aspect="equal")
        ax.set_title(f"{label}, step {step}", fontsize=9)
        _head_ticks(ax, n_layers, n_heads, "x")
        _head_ticks(ax, n_layers, n_heads, "y")
        ax.set_xlabel("destination head (reads, K side)", fontsize=8)
        ax.set_ylabel("source head (writes)", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.85, label="K-composition")
    fig.suptitle(f"{data.name}: K-composition, source head -> destination head (blank: not a pair)", fontsize=10)
    return _save(fig, path)


def per_token_loss_figure(data: RunData, path: Path) -> Path | None:
    if not data.loss_curves:
        return None
    steps = sorted(data.loss_curves)
    length = max(len(v) for v in data.loss_curves.values())
    matrix = np.full((len(steps), length), np.nan)
    for i, step in enumerate(steps):
        matrix[i, : len(data.loss_curves[step])] = data.loss_curves[step]
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    heat, lines = fig.subplots(1, 2, width_ratios=(1.4, 1))
    image = heat.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=_colormap("viridis"), interpolation="nearest")
    # Rows are checkpoints in order (the schedule is not uniform): label a readable subset.
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
    heat.set_yticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
    heat.set_ylabel("training step (one row per checkpoint)")
    heat.set_xlabel("context index (token position)")
    fig.colorbar(image, ax=heat, label="loss (nats)")
    if data.phase is not None:
        for edge in (data.phase.start, data.phase.end):
            if edge in steps:
                heat.axhline(steps.index(edge), color="gold", lw=1.2, ls="--")
    heat.set_title("loss by context index over training" + (" (dashed: phase change)" if data.phase else ""), fontsize=9)
    for label, step in data.key_steps():
        if step in steps:
            lines.plot(np.arange(length), matrix[steps.index(step)], label=f"{label} (step {step})", lw=1.3)
    lines.set_xlabel("context index (token position)")
    lines.set_ylabel("loss (nats)")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=8)
    lines.set_title("per-token loss at three steps", fontsize=9)
    fig.suptitle(f"{data.name}: per-token loss", fontsize=11)
    return _save(fig, path)


def _phase_vector(data: RunData) -> np.ndarray | None:
    """Unit vector of the per-token loss the phase change removed: before minus after it.

    Olsson's "first view": projecting a head's ablation (ablated minus clean loss) on it
    gives how much of the phase change's improvement that head carries (positive: ablating
    it gives the improvement back)."""
    if data.phase is None:
        return None
    curves = data.loss_curves
    before = [s for s in curves if s <= data.phase.start]
    after = [s for s in curves if s >= data.phase.end]
    if not before or not after:
        return None
    vector = curves[max(before)].astype(np.float64) - curves[min(after)]
    vector = np.where(np.isnan(vector), 0.0, vector)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else None


def _ablation_projection(store: ResultStore, data: RunData, metric: str, direction: np.ndarray) -> np.ndarray:
    projection = np.full(data.series.prefix_matching.shape, np.nan)
    for curve in store.curves(data.name, metric, probe_hash=data.probe_hash):
        if curve.layer >= 0 and len(curve.values) == len(direction):
            index = int(np.searchsorted(data.steps, curve.step))
            projection[index, curve.layer, curve.head] = float(np.nan_to_num(curve.values.astype(np.float64)) @ direction)
    return projection


def ablation_figure(store: ResultStore, data: RunData, path: Path) -> Path | None:
    panels: list[tuple[np.ndarray, str]] = []
    for metric, title in (("ablation_icl_delta", "full ablation:\nchange of ICL score"),
                          ("ablation_icl_delta_pattern_preserving", "pattern-preserving:\nchange of ICL score")):  # fmt: skip
        grid = data.grids[metric]
        if grid.size and not np.isnan(grid).all():
            panels.append((grid, title))
    if not panels:
        return None
    direction = _phase_vector(data)
    if direction is not None:
        projection = _ablation_projection(store, data, "ablation_per_token_loss_delta", direction)
        if not np.isnan(projection).all():
            panels.append((projection, "full ablation: loss\nincrease along the phase\nchange's loss decrease"))
    fig = Figure(figsize=(9, 2.6 * len(panels) + 1.0), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (grid, title) in zip(axes, panels):
        _shade_phase(ax, data.phase, label=ax is axes[0])
        _per_head_lines(ax, data, grid)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(title, fontsize=9)
        ax.grid(alpha=0.3)
        _step_axis(ax, data, tokens=False)
        if ax is not axes[-1]:
            ax.set_xlabel("")
    fig.suptitle(f"{data.name}: head ablations over training (ICL score: more positive = head helps in-context learning)",
                 fontsize=10)  # fmt: skip
    return _save(fig, path)


VERDICT_CLASSES = (("neither", "white"), ("behaviour only", "tab:orange"), ("mechanism only", "tab:blue"), ("both", "tab:green"))


def verdicts_figure(data: RunData, path: Path) -> Path | None:
    behaviour, mechanism = data.grids["induction_behaviour"], data.grids["induction_mechanism"]
    if behaviour.size == 0 or mechanism.size == 0 or (np.isnan(behaviour).all() and np.isnan(mechanism).all()):
        return None
    flat_b = behaviour.reshape(len(data.steps), -1)
    flat_m = mechanism.reshape(len(data.steps), -1)
    n_heads = behaviour.shape[2]
    flagged = np.nonzero((np.nan_to_num(flat_b) > 0.5).any(0) | (np.nan_to_num(flat_m) > 0.5).any(0))[0]
    fig = Figure(figsize=(10, 1.6 + 0.28 * max(len(flagged), 3)), layout="constrained")
    ax = fig.subplots()
    if len(flagged):
        classes = (np.nan_to_num(flat_b[:, flagged]) > 0.5).astype(float) + 2 * (np.nan_to_num(flat_m[:, flagged]) > 0.5)
        classes[np.isnan(flat_b[:, flagged]) & np.isnan(flat_m[:, flagged])] = np.nan
        cmap = ListedColormap([c for _, c in VERDICT_CLASSES]).with_extremes(bad=NOT_DEFINED_GREY)
        ax.imshow(np.ma.masked_invalid(classes.T), cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(flagged)), [head_name(int(i) // n_heads, int(i) % n_heads) for i in flagged], fontsize=7)
        ticks = np.unique(np.linspace(0, len(data.steps) - 1, min(len(data.steps), 12)).round().astype(int))
        ax.set_xticks(ticks, [str(data.steps[t]) for t in ticks], fontsize=7)
        disagree = int(((classes == 1) | (classes == 2)).sum())
        ax.set_title(f"{data.name}: induction verdicts per head and step ({disagree} head-steps where they disagree; "
                     f"{behaviour.shape[1] * n_heads - len(flagged)} never-flagged heads left out)", fontsize=9)  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no head is flagged by either verdict at any step", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{data.name}: induction verdicts", fontsize=9)
    ax.set_xlabel("training step (one column per checkpoint)")
    ax.set_ylabel("head")
    handles = [Patch(facecolor=c, edgecolor="0.4", label=l) for l, c in VERDICT_CLASSES] + [
        Patch(facecolor=NOT_DEFINED_GREY, edgecolor="0.4", label="not computed")
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=5, fontsize=8)
    return _save(fig, path)


# --- the page -------------------------------------------------------------------------------------

CAPTIONS = {
    "phase_change": "ICL score, induction loss and every head's prefix matching over training; "
    "the detected phase change is shaded, induction heads are in colour.",
    "head_maps": "Layer x head maps of the headline scores at the first step, the phase change and the last step.",
    "copying_vs_prefix": "Copying against prefix matching, one point per head per step; induction heads move to the "
    "top right as they form. Dashed: the behavioural verdict's thresholds.",
    "composition": "K-composition of every (earlier source head, later destination head) pair at three steps: "
    "induction heads read the previous-token head's output in their keys.",
    "per_token_loss": "Loss at each context index over training; after the phase change, late tokens get cheaper.",
    "ablation": "The change of ICL score when one head is ablated (full, and with attention patterns frozen), "
    "and each full ablation's per-token-loss change projected on the phase change's direction.",
    "verdicts": "Which heads the behavioural verdict (prefix matching and copying) and the mechanistic verdict "
    "(OV copying, QK positivity, a previous-token head upstream) flag at each step, and where they disagree.",
}

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


def _verdict(value: float | None) -> str:
    """A 0/1 verdict as 0 or 1; not computed as "-"."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.0f}"


def _value_at(grid: np.ndarray, index: int, layer: int, head: int) -> float | None:
    return float(grid[index, layer, head]) if grid.size else None


def _summary_rows(data: RunData) -> list[tuple[str, str]]:
    done = [r for r in data.records if r.status == "done"]
    failed = [r for r in data.records if r.status == "failed"]
    rows = [
        ("source", data.source),
        ("probe hash", data.probe_hash),
        ("checkpoints", f"{len(done)} done (steps {data.steps[0]}..{data.steps[-1]}), {len(failed)} failed"),
        ("phase change", "none found" if data.phase is None else data.phase.describe()),
    ]
    for metric in ("icl_score", "induction_loss"):
        values = data.series.series.get(metric)
        if values is not None and not np.isnan(values).all():
            ok = np.nonzero(~np.isnan(values))[0]
            rows.append((metric, f"{format_value(values[ok[0]])} at step {data.steps[ok[0]]} -> "
                                 f"{format_value(values[ok[-1]])} at step {data.steps[ok[-1]]}"))  # fmt: skip
    return rows


def _head_table(data: RunData) -> str:
    if not data.induction_heads:
        return '<p class="note">No head became an induction head (no formation, no verdict at the last step).</p>'
    last = len(data.steps) - 1
    header = ("head", "formed (steps)", "prefix matching", "copying", "OV copying", "behaviour", "mechanism")
    lines = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for layer, head in data.induction_heads:
        formed = data.formations.get((layer, head))
        cells = [
            head_name(layer, head),
            "-" if formed is None else f"{formed.start}-{formed.end}",
            *(format_value(_value_at(data.grids[m], last, layer, head)) for m in ("prefix_matching", "copying", "ov_copying")),
            *(_verdict(_value_at(data.grids[m], last, layer, head)) for m in ("induction_behaviour", "induction_mechanism")),
        ]
        lines.append("<tr>" + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def _run_section(data: RunData, figures: dict[str, Path], out: Path) -> str:
    parts = [f"<h2>run {html.escape(data.name)}</h2>", "<table>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(data)]
    parts.append("</table>")
    parts.append(f"<h3>induction heads at the last step (step {data.steps[-1]})</h3>")
    parts.append(_head_table(data))
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


def _run_figures(store: ResultStore, data: RunData, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    makers: list[tuple[str, Callable[[Path], Path | None]]] = [
        ("phase_change", lambda p: phase_change_figure(data, p)),
        ("head_maps", lambda p: head_maps_figure(data, p)),
        ("copying_vs_prefix", lambda p: copying_vs_prefix_figure(data, p)),
        ("composition", lambda p: composition_figure(store, data, p)),
        ("per_token_loss", lambda p: per_token_loss_figure(data, p)),
        ("ablation", lambda p: ablation_figure(store, data, p)),
        ("verdicts", lambda p: verdicts_figure(data, p)),
    ]
    figures = {}
    for name, make in makers:
        path = folder / f"{name}.png"
        path.unlink(missing_ok=True)  # a figure this run no longer has must not linger from an older report
        made = make(path)
        if made is not None:
            figures[name] = made
    return figures


def _thresholds(store: ResultStore, probe_hash: str) -> tuple[float, float]:
    """The behavioural verdict's thresholds (prefix matching, copying) the run was scanned with."""
    defaults = VerdictThresholds()
    recorded = json.loads(store.probe_config(probe_hash) or "{}")
    found = recorded.get("probes", {}).get("thresholds", {}) if isinstance(recorded, dict) else {}
    return float(found.get("prefix_matching", defaults.prefix_matching)), float(found.get("copying", defaults.copying))


def write_report(store: ResultStore, out: str | Path, *, run: str | None = None) -> Report:
    """Figures and index.html for ``run`` (every run if None) of ``store``, in ``out``."""
    runs = run_sources(store, run, "report")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "index.html")
    sections, taken = [], set()
    for name, source in runs:
        data = load_run(store, name, source)
        if data is None:
            report.skipped.append(name)
            continue
        figures = _run_figures(store, data, out / _slug(name, taken))
        report.figures[name] = figures
        sections.append(_run_section(data, figures, out))
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
