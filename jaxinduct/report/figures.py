"""The report's figures: each a pure function of a run's ``RunView`` that draws one Figure.

Olsson et al.'s figures are the model (docs/reports.md lists what each shows and needs).
Matplotlib without a display (``Figure``, never pyplot). A figure whose data the run lacks
is not drawn: its function returns None. Nothing here reads the store: the view holds
every number drawn, so a figure shows exactly what `show` and the page's table say.

Which heads a figure singles out (``highlighted_heads``) is decided once per run, so that
a head has the same colour in every figure. "Induction heads" are the heads that formed
(docs/scores.md, "Formation") plus those a verdict flags at the last step; the strongest
of them (by prefix matching at the last step) are coloured and named, together with the
few heads whose full ablation changes the ICL score most, up to ``MAX_NAMED_HEADS`` in
all. Induction heads past that cap are drawn unnamed, as thin faint dark lines. Every other
head is context, in grey: one thin line each in a small model, and in a large one (a
Pythia-1.4B has 384 heads) one aggregate: the band of their 10-90% range, their median and
their minimum and maximum, so that a figure stays readable and cheap at any size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from jaxinduct.report.format import head_name
from jaxinduct.report.headline import ablation_metrics, map_metrics, model_metrics, verdict_columns, words
from jaxinduct.results.phase import FORMATION_METRIC, PhaseChange
from jaxinduct.results.run_view import HEAD_CURVES, RunView

Head = tuple[int, int]  # (layer, head)

DPI = 110
NOT_DEFINED_GREY = "0.82"  # cells and points whose score is not defined (NaN)
HIGHLIGHT_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
MAX_NAMED_HEADS = len(HIGHLIGHT_COLOURS)  # heads coloured and named in a figure, at most: one colour each
MAX_ABLATION_HEADS = 3  # of them, at most this many chosen for their ablation effect ...
ABLATION_STANDS_OUT = 3.0  # ... and only when it is this many times the median head's (else it is noise)
MAX_HEAD_LINES = 64  # up to this many other heads, one grey line each; beyond, one grey band for them all
OTHERS_BAND = (10.0, 90.0)  # the percentiles the grey band spans
MORE_INDUCTION_COLOUR = "0.15"  # induction heads past the cap: thin, faint and unnamed, dozens of them still legible
MAX_ANNOTATED_CELLS = 64  # head maps print their values when a map has at most this many cells
MAX_HEAD_TICKS = 32  # axes name every head up to this many, else only layers
MAX_PAIR_HEADS = 64  # K-composition per pair of heads up to this many heads; beyond, per pair of layers
TOP_PAIRS = 8  # a per-layer composition map lists this many of its strongest head pairs
MAX_VERDICT_ROWS = 40  # the verdict figure's rows: the heads flagged at the most steps
# Figures about particular scores (the paper's views); the others take theirs from the registry.
ABLATION_CURVE = HEAD_CURVES[0]  # the full ablation's per-token loss change, as the view loads it


def _two_lines(text: str) -> str:
    """An axis label in words, broken before its parenthesis or after its colon."""
    for mark, joint in ((" (", "\n("), (": ", ":\n")):
        if mark in text:
            return text.replace(mark, joint, 1)
    return text


def induction_heads(view: RunView) -> list[Head]:
    """The run's induction heads: formed, or flagged by a verdict at the last step; by (layer, head)."""
    flagged = {(int(layer), int(head)) for layer, head in zip(*np.nonzero(view.formed >= 0))}
    if len(view.steps):
        for name, _ in verdict_columns():
            last = view.grid(name)[-1]
            flagged |= {(int(layer), int(head)) for layer, head in zip(*np.nonzero(np.nan_to_num(last) > 0.5))}
    return sorted(flagged)


def strongest_first(view: RunView, heads: Sequence[Head]) -> list[Head]:
    """``heads`` by prefix matching at the last step, highest first (undefined last; ties by (layer, head))."""
    last = view.grid(FORMATION_METRIC)[-1] if len(view.steps) else np.full(view.shape, np.nan)
    return sorted(sorted(heads), key=lambda h: -np.nan_to_num(last[h], nan=-np.inf))


def _peak(grid: np.ndarray) -> np.ndarray:
    """[layer, head]: the largest |value| over the steps of [step, layer, head]; NaN where never defined."""
    magnitude = np.where(np.isnan(grid), -np.inf, np.abs(grid))
    peak = magnitude.max(axis=0) if len(grid) else np.full(grid.shape[1:], -np.inf)
    return np.where(np.isinf(peak), np.nan, peak)


def ablation_effect(view: RunView) -> np.ndarray:
    """[layer, head]: the largest change of ICL score the head's full ablation caused at any done step.

    NaN where never computed (no dataset). The magnitude: a head whose ablation helps is as
    worth seeing as one whose ablation hurts."""
    metrics = ablation_metrics()
    return _peak(view.grid(metrics[0])) if metrics else np.full(view.shape, np.nan)


def top_ablation_heads(view: RunView, count: int = MAX_ABLATION_HEADS) -> list[Head]:
    """The ``count`` heads with the largest ``ablation_effect``, largest first, among those whose
    effect stands out (``ABLATION_STANDS_OUT`` times the median head's): without a standout, none."""
    effect = ablation_effect(view)
    defined = effect[~np.isnan(effect)]
    if not len(defined):
        return []
    floor = ABLATION_STANDS_OUT * float(np.median(defined))
    order = np.argsort(-np.nan_to_num(effect, nan=-np.inf), axis=None, kind="stable")
    ranked = [(int(i) // effect.shape[1], int(i) % effect.shape[1]) for i in order]
    return [h for h in ranked if effect[h] > max(floor, 0.0)][:count]


@dataclass(frozen=True)
class Highlight:
    """The heads the figures single out (module doc). Colours follow ``named``'s order."""

    named: tuple[Head, ...]  # coloured and named: induction heads, the strongest first, then the ablation-only ones
    by_ablation: frozenset[Head]  # named for their ablation effect alone (not induction heads): dashed
    more_induction: tuple[Head, ...]  # induction heads past the cap: drawn unnamed

    @property
    def drawn(self) -> tuple[Head, ...]:
        return self.named + self.more_induction

    def colour(self, head: Head) -> str:
        return HIGHLIGHT_COLOURS[self.named.index(head) % len(HIGHLIGHT_COLOURS)]

    def label(self, head: Head) -> str:
        return head_name(*head) + (" (ablation)" if head in self.by_ablation else "")


def highlighted_heads(view: RunView) -> Highlight:
    """Induction heads by prefix matching at the last step (strongest first), and the top ablation heads.

    The top ablation heads are always named; the induction heads fill the other places up to
    ``MAX_NAMED_HEADS``, and the rest of them are drawn unnamed."""
    induction = induction_heads(view)
    ranked = strongest_first(view, induction)
    by_ablation = top_ablation_heads(view)
    chosen = list(by_ablation)
    for head in ranked:
        if len(chosen) >= MAX_NAMED_HEADS:
            break
        if head not in chosen:
            chosen.append(head)
    ablation_only = [h for h in by_ablation if h not in induction]
    return Highlight(
        named=tuple([h for h in ranked if h in chosen] + ablation_only),
        by_ablation=frozenset(ablation_only),
        more_induction=tuple(h for h in ranked if h not in chosen),
    )


# --- figure helpers ---------------------------------------------------------------------------


def _step_axis(ax: Axes, view: RunView, *, tokens: bool) -> None:
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


def _shade_phase(ax: Axes, phase: PhaseChange | None, *, label: bool = False) -> None:
    if phase is not None:
        ax.axvspan(phase.start, phase.end, color="gold", alpha=0.35, lw=0,
                   label=f"phase change (steps {phase.start}-{phase.end})" if label else None)  # fmt: skip


def _other_heads(grid: np.ndarray, highlight: Highlight) -> np.ndarray:
    """[step, k]: the series of every head not highlighted and not undefined throughout."""
    others = np.ones(grid.shape[1:], bool)
    for head in highlight.drawn:
        others[head] = False
    series = grid[:, others]
    return series[:, ~np.isnan(series).all(axis=0)]


def _draw_other_heads(ax: Axes, steps: np.ndarray, others: np.ndarray) -> None:
    """The heads not highlighted, in grey: a line each when few, else their range as one band."""
    count = others.shape[1]
    if count == 0:
        return
    single = len(steps) == 1  # one checkpoint: points, not lines
    if count <= MAX_HEAD_LINES:
        for i in range(count):
            ax.plot(steps, others[:, i], color="0.6", lw=0.7, alpha=0.7, zorder=2, marker="." if single else None,
                    label="other heads" if i == 0 else None)  # fmt: skip
        return
    defined = ~np.isnan(others).all(axis=1)
    x, values = steps[defined], others[defined]
    low, median, high = np.nanpercentile(values, [OTHERS_BAND[0], 50.0, OTHERS_BAND[1]], axis=1)
    band = f"{OTHERS_BAND[0]:.0f}-{OTHERS_BAND[1]:.0f}%"
    ax.fill_between(x, low, high, color="0.6", alpha=0.35, lw=0, zorder=1, label=f"other {count} heads: {band} range")
    ax.plot(x, median, color="0.45", lw=1.2, zorder=2, marker="." if single else None, label=f"other {count} heads: median")
    for i, extreme in enumerate((np.nanmin(values, axis=1), np.nanmax(values, axis=1))):
        ax.plot(x, extreme, color="0.45", lw=0.8, ls=":", zorder=2, marker="." if single else None,
                label=f"other {count} heads: min and max" if i == 0 else None)  # fmt: skip


def _per_head_lines(ax: Axes, view: RunView, highlight: Highlight, grid: np.ndarray) -> None:
    """A series per head: the named heads in colour, further induction heads dark and unnamed, the rest grey.

    Drawn in legend order (named first); zorder keeps the coloured lines above the grey."""
    marker = "." if len(view.steps) <= 60 else None  # dots only where the checkpoints are apart
    for head in highlight.named:
        values = grid[:, head[0], head[1]]
        if not np.isnan(values).all():
            ax.plot(view.steps, values, color=highlight.colour(head), lw=1.8, marker=marker, ms=3, zorder=4,
                    ls="--" if head in highlight.by_ablation else "-", label=highlight.label(head))  # fmt: skip
    more = len(highlight.more_induction)
    for i, head in enumerate(highlight.more_induction):
        values = grid[:, head[0], head[1]]
        if not np.isnan(values).all():
            ax.plot(view.steps, values, color=MORE_INDUCTION_COLOUR, lw=0.7, alpha=0.45, zorder=3,
                    label=f"{more} more induction head{'s' if more > 1 else ''}" if i == 0 else None)  # fmt: skip
    _draw_other_heads(ax, view.steps, _other_heads(grid, highlight))


def _legend_beside(ax: Axes) -> None:
    """The axes' legend to their right, where it covers no data however many entries it has."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # tight: nothing clipped, whatever the labels
    return path


def _head_ticks(ax: Axes, n_layers: int, n_heads: int, axis: str) -> None:
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


def _ticks(n: int) -> range:
    """Every index up to 16, else about 8 evenly spaced: tick labels that do not collide."""
    return range(n) if n <= 16 else range(0, n, max(1, n // 8))


def _map_image(ax: Axes, values: np.ndarray, vrange: tuple[float, float], cmap_name: str):
    cmap = _colormap(cmap_name)
    norm = Normalize(*vrange)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    rows, columns = values.shape
    if values.size <= MAX_ANNOTATED_CELLS:
        for row, column in np.ndindex(rows, columns):
            v = values[row, column]
            if not np.isnan(v):
                colour = _text_colour(cmap(norm(v)))
                ax.text(column, row, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(_ticks(columns))
    ax.set_yticks(_ticks(rows))
    ax.tick_params(labelsize=7)
    return image


# --- the figures ----------------------------------------------------------------------------------


def phase_change_figure(view: RunView) -> Figure:
    model_panels = [(m, _two_lines(words(m))) for m in model_metrics() if m in view.model]
    n_panels = len(model_panels) + 1
    fig = Figure(figsize=(10.5, 2.4 * n_panels + 1.2), layout="constrained")
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
    ax.axhline(view.thresholds.prefix_matching, color="0.3", ls="--", lw=0.8, label="verdict threshold")
    _per_head_lines(ax, view, highlighted_heads(view), view.grid(FORMATION_METRIC))
    _legend_beside(ax)
    ax.set_ylabel("prefix matching\n(per head)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    for a in axes:
        _step_axis(a, view, tokens=a is axes[0])
        if a is not axes[-1]:
            a.set_xlabel("")
    found = "no phase change found" if view.phase is None else f"phase change at steps {view.phase.start}-{view.phase.end}"
    fig.suptitle(f"{view.name}: induction heads over training ({found})", fontsize=11)
    return fig


def head_maps_figure(view: RunView) -> Figure:
    columns = view.key_steps
    maps = map_metrics()
    n_layers, n_heads = view.shape
    # Cells shrink with the model so that a large one's maps stay about a page wide and
    # (four rows of them) a few pages tall: a 24 x 16 model gets ~0.23 inch cells, never
    # below 0.15 inch (16 pixels).
    cell = max(0.15, min(0.6, 6.0 / max(n_heads, 1), 22.0 / max(len(maps) * n_layers, 1)))
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
    return fig


def copying_vs_prefix_figure(view: RunView) -> Figure:
    prefix, copying = view.grid("prefix_matching"), view.grid("copying")
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.subplots()
    steps = np.broadcast_to(view.steps[:, None, None], prefix.shape)
    ok = ~(np.isnan(prefix) | np.isnan(copying))
    positive = view.steps[view.steps > 0]
    norm = LogNorm(vmin=float(positive[0]), vmax=float(positive[-1])) if len(positive) >= 2 else Normalize()
    # Step 0 has no place on a log colour scale: drawn at the first positive step's colour.
    colour = np.maximum(steps[ok], positive[0] if len(positive) else 0) if ok.any() else np.zeros(0)
    # Tens of thousands of points in a large run: smaller and lighter, so that density shows.
    size, alpha = (10, 0.75) if ok.sum() <= 20_000 else (4, 0.5)
    points = ax.scatter(prefix[ok], copying[ok], c=colour, cmap="viridis", norm=norm, s=size, alpha=alpha, lw=0)
    ax.axvline(view.thresholds.prefix_matching, color="0.3", ls="--", lw=1)
    ax.axhline(view.thresholds.copying, color="0.3", ls="--", lw=1)
    ax.text(0.98, 0.98, "induction by behaviour\n(both thresholds passed)", transform=ax.transAxes,
            ha="right", va="top", fontsize=8, color="0.3")  # fmt: skip
    # Where each named head ends: open circles in its colour (text labels would collide).
    highlight = highlighted_heads(view)
    for layer, head in highlight.named:
        index = np.nonzero(ok[:, layer, head])[0]
        if len(index):
            ax.scatter(prefix[index[-1], layer, head], copying[index[-1], layer, head], s=70, facecolors="none",
                       edgecolors=highlight.colour((layer, head)), linewidths=1.6,
                       linestyle="--" if (layer, head) in highlight.by_ablation else "-",
                       label=f"{highlight.label((layer, head))} at the last step")  # fmt: skip
    if ax.get_legend_handles_labels()[0]:  # a head with no point to circle gets no entry
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("prefix matching")
    ax.set_ylabel("copying")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    if ok.any():
        fig.colorbar(points, ax=ax, label="training step").solids.set_alpha(1.0)  # the scale itself unfaded
    ax.set_title(f"{view.name}: copying vs. prefix matching, one point per head per step", fontsize=10)
    return fig


def _layer_pairs(pairs: np.ndarray) -> np.ndarray:
    """[src_layer, dst_layer]: the largest value over the head pairs of [src_layer, src_head, dst_layer, dst_head]."""
    peak = np.where(np.isnan(pairs), -np.inf, pairs).max(axis=(1, 3))
    return np.where(np.isinf(peak), np.nan, peak)


def strongest_pairs(pairs: np.ndarray, count: int) -> list[tuple[Head, Head, float]]:
    """(source, destination, value) of the ``count`` largest defined values of [l, h, l, h], largest first."""
    flat = np.where(np.isnan(pairs), -np.inf, pairs).ravel()
    order = np.argsort(-flat, kind="stable")[:count]
    found = []
    for i in order:
        if np.isfinite(flat[i]):
            src_layer, src_head, dst_layer, dst_head = np.unravel_index(i, pairs.shape)
            found.append(((int(src_layer), int(src_head)), (int(dst_layer), int(dst_head)), float(flat[i])))
    return found


def composition_figure(view: RunView) -> Figure | None:
    grids = view.pair_grids["k_composition"]  # [key step, src_layer, src_head, dst_layer, dst_head]
    if np.isnan(grids).all():
        return None
    n_layers, n_heads = view.shape
    n = n_layers * n_heads
    top = float(np.nanmax(grids))
    by_layer = n > MAX_PAIR_HEADS  # a 384 x 384 matrix has cells too small to see: layers, and the top pairs named
    side = 4.6 if by_layer else max(3.0, min(5.5, 0.28 * n + 1.5))
    fig = Figure(figsize=(side * len(grids) + 1.2, side + 0.8), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    image = None
    for ax, (label, step), pairs in zip(axes, view.key_steps, grids):
        ax.set_title(f"{label}, step {step}", fontsize=9)
        if by_layer:
            image = _map_image(ax, _layer_pairs(pairs), (0.0, top), "magma")
            ax.set_xlabel("destination layer (reads, K side)", fontsize=8)
            ax.set_ylabel("source layer (writes)", fontsize=8)
            # The blank lower-left triangle (no pair reads an earlier or equal layer) holds the list.
            listed = [f"{head_name(*s):>6s} -> {head_name(*d):<6s} {v:.2f}" for s, d, v in strongest_pairs(pairs, TOP_PAIRS)]
            ax.text(0.02, 0.02, "strongest head pairs:\n" + "\n".join(listed), transform=ax.transAxes, ha="left",
                    va="bottom", fontsize=7, family="monospace")  # fmt: skip
        else:
            # [src_layer, src_head, dst_layer, dst_head] -> [src head, dst head], heads numbered layer-major.
            image = ax.imshow(np.ma.masked_invalid(pairs.reshape(n, n)), cmap=_colormap("magma"), vmin=0.0, vmax=top,
                              aspect="equal", interpolation="nearest")  # fmt: skip
            _head_ticks(ax, n_layers, n_heads, "x")
            _head_ticks(ax, n_layers, n_heads, "y")
            ax.set_xlabel("destination head (reads, K side)", fontsize=8)
            ax.set_ylabel("source head (writes)", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.85, label="K-composition" + (" (max over head pairs)" if by_layer else ""))
    what = "max over the head pairs of each pair of layers" if by_layer else "source head -> destination head"
    fig.suptitle(f"{view.name}: K-composition, {what} (blank: not a pair)", fontsize=10)
    return fig


def per_token_loss_figure(view: RunView) -> Figure | None:
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
    return fig


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


def ablation_figure(view: RunView) -> Figure | None:
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
    highlight = highlighted_heads(view)
    fig = Figure(figsize=(10.5, 2.6 * len(panels) + 1.0), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (grid, panel_title) in zip(axes, panels):
        _shade_phase(ax, view.phase, label=ax is axes[0])
        _per_head_lines(ax, view, highlight, grid)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(panel_title, fontsize=9)
        ax.grid(alpha=0.3)
        _step_axis(ax, view, tokens=False)
        if ax is not axes[-1]:
            ax.set_xlabel("")
    _legend_beside(axes[0])  # the same heads in every panel: one legend
    fig.suptitle(f"{view.name}: head ablations over training (ICL score: more positive = head helps in-context learning)",
                 fontsize=10)  # fmt: skip
    return fig


VERDICT_CLASSES = (("neither", "white"), ("behaviour only", "tab:orange"), ("mechanism only", "tab:blue"), ("both", "tab:green"))


def verdicts_figure(view: RunView) -> Figure | None:
    (behaviour_name, _), (mechanism_name, _) = verdict_columns()
    behaviour, mechanism = view.grid(behaviour_name), view.grid(mechanism_name)
    if behaviour.size == 0 or (np.isnan(behaviour).all() and np.isnan(mechanism).all()):
        return None
    flat_b = behaviour.reshape(len(view.steps), -1)
    flat_m = mechanism.reshape(len(view.steps), -1)
    n_heads = behaviour.shape[2]
    flagged_steps = ((np.nan_to_num(flat_b) > 0.5) | (np.nan_to_num(flat_m) > 0.5)).sum(axis=0)
    flagged = np.nonzero(flagged_steps)[0]
    # Past the cap, the heads flagged at the most steps, shown in (layer, head) order.
    shown = np.sort(flagged[np.argsort(-flagged_steps[flagged], kind="stable")[:MAX_VERDICT_ROWS]])
    fig = Figure(figsize=(10, 1.6 + 0.28 * max(len(shown), 3)), layout="constrained")
    ax = fig.subplots()
    if len(shown):
        classes = (np.nan_to_num(flat_b[:, shown]) > 0.5).astype(float) + 2 * (np.nan_to_num(flat_m[:, shown]) > 0.5)
        classes[np.isnan(flat_b[:, shown]) & np.isnan(flat_m[:, shown])] = np.nan
        cmap = ListedColormap([c for _, c in VERDICT_CLASSES]).with_extremes(bad=NOT_DEFINED_GREY)
        ax.imshow(np.ma.masked_invalid(classes.T), cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(shown)), [head_name(int(i) // n_heads, int(i) % n_heads) for i in shown], fontsize=7)
        ticks = np.unique(np.linspace(0, len(view.steps) - 1, min(len(view.steps), 12)).round().astype(int))
        ax.set_xticks(ticks, [str(view.steps[t]) for t in ticks], fontsize=7)
        disagree = f"{int(((classes == 1) | (classes == 2)).sum())} head-steps where they disagree"
        left_out = f"{behaviour.shape[1] * n_heads - len(flagged)} never-flagged heads"
        if len(shown) < len(flagged):
            disagree += " among those shown"
            left_out += f" and {len(flagged) - len(shown)} flagged at fewer steps"
        ax.set_title(f"{view.name}: induction verdicts per head and step ({disagree}; {left_out} left out)", fontsize=9)
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
    return fig


# (file name, figure) in the page's order; ``save_figure`` writes each.
FIGURES: tuple[tuple[str, Callable[[RunView], Figure | None]], ...] = (
    ("phase_change", phase_change_figure),
    ("head_maps", head_maps_figure),
    ("copying_vs_prefix", copying_vs_prefix_figure),
    ("composition", composition_figure),
    ("per_token_loss", per_token_loss_figure),
    ("ablation", ablation_figure),
    ("verdicts", verdicts_figure),
)
