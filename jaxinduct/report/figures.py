"""The report's figures: each a pure function of a run's ``RunView`` that draws one PNG.

Olsson et al.'s figures are the model (docs/reports.md lists what each shows and needs).
Matplotlib without a display (``Figure``, never pyplot). A figure whose data the run lacks
is not drawn: its function returns None. Nothing here reads the store: the view holds
every number drawn, so a figure shows exactly what `show` and the page's table say.

"Induction heads", drawn in colour, are the heads that formed (docs/scores.md,
"Formation") plus those a verdict flags at the last step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from jaxinduct.report.format import head_name
from jaxinduct.report.headline import ablation_metrics, map_metrics, model_metrics, verdict_columns, words
from jaxinduct.results.phase import FORMATION_METRIC, PhaseChange
from jaxinduct.results.run_view import HEAD_CURVES, RunView

DPI = 110
NOT_DEFINED_GREY = "0.82"  # cells and points whose score is not defined (NaN)
HIGHLIGHT_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
MAX_NAMED_HEADS = len(HIGHLIGHT_COLOURS)  # more induction heads than this share one legend entry
MAX_ANNOTATED_CELLS = 64  # head maps print their values when a map has at most this many cells
MAX_HEAD_TICKS = 32  # axes name every head up to this many, else only layers
# Figures about particular scores (the paper's views); the others take theirs from the registry.
ABLATION_CURVE = HEAD_CURVES[0]  # the full ablation's per-token loss change, as the view loads it


def _two_lines(text: str) -> str:
    """An axis label in words, broken before its parenthesis or after its colon."""
    for mark, joint in ((" (", "\n("), (": ", ":\n")):
        if mark in text:
            return text.replace(mark, joint, 1)
    return text


def induction_heads(view: RunView) -> list[tuple[int, int]]:
    """The heads the report highlights: formed, or flagged by a verdict at the last step; by (layer, head)."""
    flagged = {(int(layer), int(head)) for layer, head in zip(*np.nonzero(view.formed >= 0))}
    if len(view.steps):
        for name, _ in verdict_columns():
            last = view.grid(name)[-1]
            flagged |= {(int(layer), int(head)) for layer, head in zip(*np.nonzero(np.nan_to_num(last) > 0.5))}
    return sorted(flagged)


# --- figure helpers ---------------------------------------------------------------------------


def _step_axis(ax, view: RunView, *, tokens: bool) -> None:
    """Log-scaled step axis that keeps step 0 (symlog, linear below the first positive step)."""
    steps = view.steps
    if len(steps) == 1:  # one checkpoint: a plain axis around it, its step as the only tick
        step = int(steps[0])
        ax.set_xlim(step - 1, step + 1)
        ax.set_xticks([step])
        ax.set_xlabel("training step (one checkpoint so far)")
        return
    positive = steps[steps > 0]
    ax.set_xscale("symlog", linthresh=float(positive[0]) if len(positive) else 1.0, linscale=0.5)
    ax.set_xlim(steps[0], steps[-1] * 1.05 if steps[-1] > 0 else 1)
    ax.set_xlabel("training step (log scale)")
    known = view.tokens_by_step()
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


def _per_head_lines(ax, view: RunView, heads: list[tuple[int, int]], grid: np.ndarray) -> None:
    """Every head's series: induction heads in colour (named), the others thin and grey."""
    colours = _head_colours(heads)
    grey_labelled = False
    for layer, head in np.ndindex(*grid.shape[1:]):
        values = grid[:, layer, head]
        if np.isnan(values).all():
            continue
        if (layer, head) in colours:
            named = heads.index((layer, head)) < MAX_NAMED_HEADS
            ax.plot(view.steps, values, color=colours[(layer, head)], lw=1.8, marker=".", ms=3,
                    label=head_name(layer, head) if named else None, zorder=3)  # fmt: skip
        else:
            ax.plot(view.steps, values, color="0.6", lw=0.7, alpha=0.7, zorder=2, marker="." if len(values) == 1 else None,
                    label=None if grey_labelled else "other heads")  # fmt: skip
            grey_labelled = True
    ax.legend(fontsize=8, loc="best", ncols=2)


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


# --- the figures ----------------------------------------------------------------------------------


def phase_change_figure(view: RunView, path: Path) -> Path:
    model_panels = [(m, _two_lines(words(m))) for m in model_metrics() if m in view.model]
    n_panels = len(model_panels) + 1
    fig = Figure(figsize=(9, 2.4 * n_panels + 1.2), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (metric, panel_title) in zip(axes, model_panels):
        values = view.model[metric]
        ok = ~np.isnan(values)
        ax.plot(view.steps[ok], values[ok], color="black", marker=".", ms=4, lw=1.5)
        ax.set_ylabel(panel_title, fontsize=9)
        _shade_phase(ax, view.phase)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    _shade_phase(ax, view.phase, label=True)
    _per_head_lines(ax, view, induction_heads(view), view.grid(FORMATION_METRIC))
    ax.set_ylabel("prefix matching\n(per head)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    for a in axes:
        _step_axis(a, view, tokens=a is axes[0])
        if a is not axes[-1]:
            a.set_xlabel("")
    found = "no phase change found" if view.phase is None else f"phase change at steps {view.phase.start}-{view.phase.end}"
    fig.suptitle(f"{view.name}: induction heads over training ({found})", fontsize=11)
    return _save(fig, path)


def head_maps_figure(view: RunView, path: Path) -> Path:
    columns = view.key_steps
    maps = map_metrics()
    n_layers, n_heads = view.shape
    cell = max(0.35, min(0.6, 6.0 / max(n_heads, 1)))
    width = 1.2 + len(columns) * (n_heads * cell + 0.6)
    height = 0.9 + len(maps) * (n_layers * cell + 0.9)
    fig = Figure(figsize=(max(width, 7.5), max(height, 6)), layout="constrained")
    axes = fig.subplots(len(maps), len(columns), squeeze=False)
    for row, (metric, vrange) in enumerate(maps):
        grid = view.grid(metric)
        cmap = "viridis" if vrange[0] == 0 else "RdBu_r"
        image = None
        for col, (label, step) in enumerate(columns):
            ax = axes[row, col]
            image = _map_image(ax, grid[view.index(step)], vrange, cmap)
            if row == 0:
                ax.set_title(f"{label}\nstep {step}", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{words(metric)}\nlayer", fontsize=9)
            if row == len(maps) - 1:
                ax.set_xlabel("head", fontsize=9)
        fig.colorbar(image, ax=list(axes[row]), shrink=0.9, pad=0.01).ax.tick_params(labelsize=7)
    fig.suptitle(f"{view.name}: head scores (grey: not defined)", fontsize=11)
    return _save(fig, path)


def copying_vs_prefix_figure(view: RunView, path: Path) -> Path:
    prefix, copying = view.grid("prefix_matching"), view.grid("copying")
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.subplots()
    steps = np.broadcast_to(view.steps[:, None, None], prefix.shape)
    ok = ~(np.isnan(prefix) | np.isnan(copying))
    positive = view.steps[view.steps > 0]
    norm = LogNorm(vmin=float(positive[0]), vmax=float(positive[-1])) if len(positive) >= 2 else Normalize()
    # Step 0 has no place on a log colour scale: drawn at the first positive step's colour.
    colour = np.maximum(steps[ok], positive[0] if len(positive) else 0) if ok.any() else np.zeros(0)
    points = ax.scatter(prefix[ok], copying[ok], c=colour, cmap="viridis", norm=norm, s=10, alpha=0.75, lw=0)
    ax.axvline(view.thresholds.prefix_matching, color="0.3", ls="--", lw=1)
    ax.axhline(view.thresholds.copying, color="0.3", ls="--", lw=1)
    ax.text(0.98, 0.98, "induction by behaviour\n(both thresholds passed)", transform=ax.transAxes,
            ha="right", va="top", fontsize=8, color="0.3")  # fmt: skip
    # Where each induction head ends: open circles in its colour (text labels would collide).
    heads = induction_heads(view)
    colours = _head_colours(heads)
    for layer, head in heads[:MAX_NAMED_HEADS]:
        index = np.nonzero(ok[:, layer, head])[0]
        if len(index):
            ax.scatter(prefix[index[-1], layer, head], copying[index[-1], layer, head], s=70, facecolors="none",
                       edgecolors=colours[(layer, head)], linewidths=1.6, label=f"{head_name(layer, head)} at the last step")  # fmt: skip
    if ax.get_legend_handles_labels()[0]:  # a head with no point to circle gets no entry
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("prefix matching")
    ax.set_ylabel("copying")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    if ok.any():
        fig.colorbar(points, ax=ax, label="training step")
    ax.set_title(f"{view.name}: copying vs. prefix matching, one point per head per step", fontsize=10)
    return _save(fig, path)


def composition_figure(view: RunView, path: Path) -> Path | None:
    n_layers, n_heads = view.shape
    n = n_layers * n_heads
    # [src_layer, src_head, dst_layer, dst_head] -> [src head, dst head], heads numbered layer-major.
    matrices = [grid.reshape(n, n) for grid in view.pair_grids["k_composition"]]
    if all(np.isnan(m).all() for m in matrices):
        return None
    top = max(float(np.nanmax(m)) for m in matrices if not np.isnan(m).all())
    side = max(3.0, min(5.5, 0.28 * n + 1.5))
    fig = Figure(figsize=(side * len(matrices) + 1.2, side + 0.8), layout="constrained")
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    image = None
    for ax, (label, step), matrix in zip(axes, view.key_steps, matrices):
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=_colormap("magma"), vmin=0.0, vmax=top, aspect="equal")
        ax.set_title(f"{label}, step {step}", fontsize=9)
        _head_ticks(ax, n_layers, n_heads, "x")
        _head_ticks(ax, n_layers, n_heads, "y")
        ax.set_xlabel("destination head (reads, K side)", fontsize=8)
        ax.set_ylabel("source head (writes)", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.85, label="K-composition")
    fig.suptitle(f"{view.name}: K-composition, source head -> destination head (blank: not a pair)", fontsize=10)
    return _save(fig, path)


def per_token_loss_figure(view: RunView, path: Path) -> Path | None:
    if not view.loss_curves:
        return None
    steps = sorted(view.loss_curves)
    length = max(len(v) for v in view.loss_curves.values())
    matrix = np.full((len(steps), length), np.nan)
    for i, step in enumerate(steps):
        matrix[i, : len(view.loss_curves[step])] = view.loss_curves[step]
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    heat, lines = fig.subplots(1, 2, width_ratios=(1.4, 1))
    image = heat.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=_colormap("viridis"), interpolation="nearest")
    # Rows are checkpoints in order (the schedule is not uniform): label a readable subset.
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int))
    heat.set_yticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
    heat.set_ylabel("training step (one row per checkpoint)")
    heat.set_xlabel("context index (token position)")
    fig.colorbar(image, ax=heat, label="loss (nats)")
    if view.phase is not None:
        for edge in (view.phase.start, view.phase.end):
            if edge in steps:
                heat.axhline(steps.index(edge), color="gold", lw=1.2, ls="--")
    heat.set_title("loss by context index over training" + (" (dashed: phase change)" if view.phase else ""), fontsize=9)
    for label, step in view.key_steps:
        if step in steps:
            lines.plot(np.arange(length), matrix[steps.index(step)], label=f"{label} (step {step})", lw=1.3)
    lines.set_xlabel("context index (token position)")
    lines.set_ylabel("loss (nats)")
    lines.grid(alpha=0.3)
    if lines.get_legend_handles_labels()[0]:  # the key steps may have no curve
        lines.legend(fontsize=8)
    lines.set_title("per-token loss at three steps", fontsize=9)
    fig.suptitle(f"{view.name}: per-token loss", fontsize=11)
    return _save(fig, path)


def _phase_vector(view: RunView) -> np.ndarray | None:
    """Unit vector of the per-token loss the phase change removed: before minus after it.

    Olsson's "first view": projecting a head's ablation (ablated minus clean loss) on it
    gives how much of the phase change's improvement that head carries (positive: ablating
    it gives the improvement back)."""
    if view.phase is None:
        return None
    curves = view.loss_curves
    before = [s for s in curves if s <= view.phase.start]
    after = [s for s in curves if s >= view.phase.end]
    if not before or not after:
        return None
    vector = curves[max(before)].astype(np.float64) - curves[min(after)]
    vector = np.where(np.isnan(vector), 0.0, vector)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else None


def _ablation_projection(curves: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """[n, layer, head]: each stored per-head curve [n, layer, head, seq] projected on ``direction``."""
    if curves.shape[-1] != len(direction):
        return np.full(curves.shape[:-1], np.nan)
    stored = ~np.isnan(curves).all(axis=-1)
    return np.where(stored, np.nan_to_num(curves.astype(np.float64)) @ direction, np.nan)


def ablation_figure(view: RunView, path: Path) -> Path | None:
    panels: list[tuple[np.ndarray, str]] = []
    for metric in ablation_metrics():
        grid = view.grid(metric)
        if grid.size and not np.isnan(grid).all():
            panels.append((grid, _two_lines(words(metric))))
    if not panels:
        return None
    direction = _phase_vector(view)
    if direction is not None:
        projection = _ablation_projection(view.head_curves[ABLATION_CURVE], direction)
        if not np.isnan(projection).all():
            panels.append((projection, "full ablation: loss\nincrease along the phase\nchange's loss decrease"))
    heads = induction_heads(view)
    fig = Figure(figsize=(9, 2.6 * len(panels) + 1.0), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (grid, panel_title) in zip(axes, panels):
        _shade_phase(ax, view.phase, label=ax is axes[0])
        _per_head_lines(ax, view, heads, grid)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(panel_title, fontsize=9)
        ax.grid(alpha=0.3)
        _step_axis(ax, view, tokens=False)
        if ax is not axes[-1]:
            ax.set_xlabel("")
    fig.suptitle(f"{view.name}: head ablations over training (ICL score: more positive = head helps in-context learning)",
                 fontsize=10)  # fmt: skip
    return _save(fig, path)


VERDICT_CLASSES = (("neither", "white"), ("behaviour only", "tab:orange"), ("mechanism only", "tab:blue"), ("both", "tab:green"))


def verdicts_figure(view: RunView, path: Path) -> Path | None:
    (behaviour_name, _), (mechanism_name, _) = verdict_columns()
    behaviour, mechanism = view.grid(behaviour_name), view.grid(mechanism_name)
    if behaviour.size == 0 or (np.isnan(behaviour).all() and np.isnan(mechanism).all()):
        return None
    flat_b = behaviour.reshape(len(view.steps), -1)
    flat_m = mechanism.reshape(len(view.steps), -1)
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
        ticks = np.unique(np.linspace(0, len(view.steps) - 1, min(len(view.steps), 12)).round().astype(int))
        ax.set_xticks(ticks, [str(view.steps[t]) for t in ticks], fontsize=7)
        disagree = int(((classes == 1) | (classes == 2)).sum())
        ax.set_title(f"{view.name}: induction verdicts per head and step ({disagree} head-steps where they disagree; "
                     f"{behaviour.shape[1] * n_heads - len(flagged)} never-flagged heads left out)", fontsize=9)  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no head is flagged by either verdict at any step", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{view.name}: induction verdicts", fontsize=9)
    ax.set_xlabel("training step (one column per checkpoint)")
    ax.set_ylabel("head")
    handles = [Patch(facecolor=c, edgecolor="0.4", label=l) for l, c in VERDICT_CLASSES] + [
        Patch(facecolor=NOT_DEFINED_GREY, edgecolor="0.4", label="not computed")
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=5, fontsize=8)
    return _save(fig, path)


# (file name, figure) in the page's order.
FIGURES: tuple[tuple[str, Callable[[RunView, Path], Path | None]], ...] = (
    ("phase_change", phase_change_figure),
    ("head_maps", head_maps_figure),
    ("copying_vs_prefix", copying_vs_prefix_figure),
    ("composition", composition_figure),
    ("per_token_loss", per_token_loss_figure),
    ("ablation", ablation_figure),
    ("verdicts", verdicts_figure),
)
