"""The score registry: every public score name, with its kind, family and definition.

This is the one place in the package that lists score names. Each entry maps a name to
its `Kind` (the shape of its value), the module of its family, a one-line meaning (what
``jaxinduct scores`` prints), how the readers present it, and ``compute``: a pure
function of one checkpoint (`jaxinduct.scores.context.Checkpoint`) that returns the
score's value for that checkpoint, or None where the probes cannot define it (no
dataset: no icl_score). `jaxinduct.scores.batched.score_all` computes every registered
score, or a selection, for a whole stack of checkpoints in one compiled pass.

Adding a score is one function (in the module of its family, formula in its docstring)
and one `Score` entry below; `register` adds one from outside the package, and
`registered` does so for the duration of a ``with`` block (tests).

A name may be registered under several kinds: induction_qk_positivity,
induction_qk_trace and pointer_arithmetic are pair scores and also head scores (their
per-head forms, weighted over source heads), stored under the same name in both the
``head`` and the ``pair`` results. An entry is therefore identified by (name, kind);
`get` without a kind returns the name's first registered entry (for those three, the
head form), and `names` lists each name once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from jaxinduct.errors import JaxInductError

if TYPE_CHECKING:
    from jaxtyping import Array

    from jaxinduct.scores.context import Checkpoint

# Bumped whenever a definition changes what a score's number is: part of the results'
# identity in the store (`jaxinduct.engine.scan.probe_identity`), so old and new numbers are never mixed.
SCORES_VERSION = 1


class Kind(enum.StrEnum):
    """The shape of one checkpoint's value of a score (score_all adds a leading ckpt axis)."""

    HEAD = "head"  # [layer, head]
    PAIR = "pair"  # [src_layer, src_head, dst_layer, dst_head], NaN unless src_layer < dst_layer
    MODEL = "model"  # scalar
    CURVE = "curve"  # [seq]
    HEAD_CURVE = "head_curve"  # [layer, head, seq]


class Family(enum.StrEnum):
    """The module of jaxinduct.scores a built-in score is defined in."""

    EMPIRICAL = "empirical"
    MECHANISTIC = "mechanistic"
    LOSSES = "losses"
    ABLATION = "ablation"
    VERDICTS = "verdicts"


class UnknownScoreError(JaxInductError, LookupError):
    """A score name (or name and kind) that is not registered."""


class DuplicateScoreError(JaxInductError, ValueError):
    """A score registered twice under the same name and kind."""


@dataclasses.dataclass(frozen=True)
class Score:
    """One registered score. Hashable (the compiled pass is specialised on a selection of these).

    compute: the score of one checkpoint, from the `Checkpoint` it is given; None where
        the probes do not define it (the name is then absent from the results). Either the
        function or its name as "module:function" (the built-in scores: so that the readers,
        which only need names and titles, start without importing JAX); ``function`` is the
        function either way.
    title: a short column title (``jaxinduct show``); the name when None.
    value_range: the values it can take, where bounded (the report's colour scale).
    headline: a context column of ``show``; with a value_range also a head map in the report.
    verdict: a 0/1 verdict rather than a graded score.
    label: how figures and tables name it in words; the name with spaces when None.
    """

    name: str
    kind: Kind
    family: Family | str  # a Family for the built-in scores; any name for one registered elsewhere
    meaning: str
    compute: Callable[[Checkpoint], Array | None] | str
    title: str | None = None
    value_range: tuple[float, float] | None = None
    headline: bool = False
    verdict: bool = False
    label: str | None = None

    @property
    def function(self) -> Callable[[Checkpoint], Array | None]:
        """``compute`` as a function (imported on first use when given by name)."""
        if callable(self.compute):
            return self.compute
        return _imported(self.compute)

    @property
    def words(self) -> str:
        """The score named in words (``label``, else the name with spaces)."""
        return self.label or self.name.replace("_", " ")

    def __post_init__(self) -> None:
        # Coerced so that an entry written with plain strings or lists is still hashable and compares equal.
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.value_range is not None:
            low, high = self.value_range
            object.__setattr__(self, "value_range", (float(low), float(high)))
        if isinstance(self.compute, str) and self.compute.count(":") != 1:
            raise ValueError(f"a score's compute given by name is 'module:function', got {self.compute!r}")
        if not self.name.isidentifier():
            raise ValueError(f"a score name is a Python identifier (it becomes a column and a file name), got {self.name!r}")


def _imported(qualified: str) -> Callable[..., Any]:
    module, name = qualified.split(":")
    return getattr(importlib.import_module(module), name)


_EMPIRICAL, _MECHANISTIC, _LOSSES = Family.EMPIRICAL, Family.MECHANISTIC, Family.LOSSES
_ABLATION, _VERDICTS = Family.ABLATION, Family.VERDICTS
_UNIT, _SIGNED = (0.0, 1.0), (-1.0, 1.0)

# Registration order is presentation order: head scores in show's context columns and the
# report's head maps (headline first), then everything else family by family.
_BUILTIN: tuple[Score, ...] = (
    # --- head scores [layer, head] ---
    Score("prefix_matching", Kind.HEAD, _EMPIRICAL,
          "attention from a repeated token to the successor of its earlier copies (1: induction head)",
          "jaxinduct.scores.empirical:prefix_matching_heads", title="prefix", value_range=_UNIT, headline=True),
    Score("copying", Kind.HEAD, _EMPIRICAL,
          "does the head raise the logits of the tokens it attends to (1) or lower them (-1)",
          "jaxinduct.scores.empirical:copying_heads", title="copy", value_range=_SIGNED, headline=True),
    Score("ov_copying", Kind.HEAD, _MECHANISTIC,
          "positivity of the full OV circuit's eigenvalues (1: copies every token)",
          "jaxinduct.scores.mechanistic:ov_copying_heads", title="ov_copy", value_range=_SIGNED, headline=True, label="OV copying"),
    Score("previous_token", Kind.HEAD, _EMPIRICAL,
          "attention to the previous position (dataset text, else random tokens)",
          "jaxinduct.scores.empirical:previous_token_heads", title="prev", headline=True),
    Score("induction_qk_positivity", Kind.HEAD, _MECHANISTIC,
          "induction QK positivity of the pairs into this head, weighted by the sources' previous_token",
          "jaxinduct.scores.mechanistic:induction_qk_positivity_heads", title="qk_pos", value_range=_SIGNED, headline=True,
          label="induction QK positivity"),
    Score("duplicate_token", Kind.HEAD, _EMPIRICAL,
          "attention from a repeated token to its earlier copies",
          "jaxinduct.scores.empirical:duplicate_token_heads"),
    Score("prefix2_sensitivity", Kind.HEAD, _EMPIRICAL,
          "prefix_matching lost when predecessors change (>0: matches two tokens back)",
          "jaxinduct.scores.empirical:prefix2_sensitivity"),
    Score("qk_prev_token", Kind.HEAD, _MECHANISTIC,
          "how far the positional QK circuit alone points at the previous position (learned/shortformer)",
          "jaxinduct.scores.mechanistic:qk_prev_token_heads"),
    Score("induction_qk_trace", Kind.HEAD, _MECHANISTIC,
          "induction QK trace of the pairs into this head, weighted by the sources' previous_token",
          "jaxinduct.scores.mechanistic:induction_qk_trace_heads"),
    Score("pointer_arithmetic", Kind.HEAD, _MECHANISTIC,
          "pointer arithmetic of the pairs into this head, weighted by the sources' duplicate_token",
          "jaxinduct.scores.mechanistic:pointer_arithmetic_heads"),
    Score("induction_behaviour", Kind.HEAD, _VERDICTS,
          "1 where prefix_matching and copying pass their thresholds",
          "jaxinduct.scores.verdicts:induction_behaviour", title="behav", verdict=True, label="behaviour"),
    Score("induction_mechanism", Kind.HEAD, _VERDICTS,
          "1 where ov_copying and induction_qk_positivity pass, with a previous-token head upstream",
          "jaxinduct.scores.verdicts:induction_mechanism", title="mech", verdict=True, label="mechanism"),
    Score("induction_verdicts_agree", Kind.HEAD, _VERDICTS,
          "1 where the behaviour and mechanism verdicts agree",
          "jaxinduct.scores.verdicts:induction_verdicts_agree", verdict=True),
    Score("ablation_icl_delta", Kind.HEAD, _ABLATION,
          "icl_score with the head's output zeroed minus icl_score (dataset)",
          "jaxinduct.scores.ablation:ablation_icl_delta", label="full ablation: change of ICL score"),
    Score("ablation_icl_delta_pattern_preserving", Kind.HEAD, _ABLATION,
          "as ablation_icl_delta, with every attention pattern frozen to the clean run's (dataset)",
          "jaxinduct.scores.ablation:ablation_icl_delta_pattern_preserving", label="pattern-preserving: change of ICL score"),
    # --- pair scores [src_layer, src_head, dst_layer, dst_head] ---
    Score("q_composition", Kind.PAIR, _MECHANISTIC,
          "|W_OV1 W_QK2|_F / (|W_OV1|_F |W_QK2|_F): the source feeds the destination's queries",
          "jaxinduct.scores.mechanistic:q_composition_pairs"),
    Score("k_composition", Kind.PAIR, _MECHANISTIC,
          "as q_composition against W_QK2^T: the source feeds the destination's keys",
          "jaxinduct.scores.mechanistic:k_composition_pairs"),
    Score("v_composition", Kind.PAIR, _MECHANISTIC,
          "as q_composition against W_OV2: the source feeds the destination's values",
          "jaxinduct.scores.mechanistic:v_composition_pairs"),
    Score("induction_qk_positivity", Kind.PAIR, _MECHANISTIC,
          "positivity of W_E W_QK2 (W_E W_OV1)^T: query token against the key's previous token",
          "jaxinduct.scores.mechanistic:induction_qk_positivity_pairs"),
    Score("induction_qk_trace", Kind.PAIR, _MECHANISTIC,
          "trace of W_E W_QK2 (W_E W_OV1)^T (Olsson's QK eigenvalue trace; unnormalised)",
          "jaxinduct.scores.mechanistic:induction_qk_trace_pairs"),
    Score("pointer_arithmetic", Kind.PAIR, _MECHANISTIC,
          "the destination, reading a position the source copied, attends one further (learned positions)",
          "jaxinduct.scores.mechanistic:pointer_arithmetic_pairs"),
    # --- model scores [] ---
    Score("icl_score", Kind.MODEL, _LOSSES,
          "loss at context index icl_late minus at icl_early (dataset; negative: in-context learning)",
          "jaxinduct.scores.losses:icl_score", label="ICL score (loss@late - loss@early)"),
    Score("induction_loss", Kind.MODEL, _LOSSES,
          "mean loss on the second half of the repeated random tokens",
          "jaxinduct.scores.losses:induction_loss", label="induction loss (nats)"),
    # --- curves [seq] ---
    Score("per_token_loss", Kind.CURVE, _LOSSES,
          "mean loss at every context index of the dataset (NaN at 0)",
          "jaxinduct.scores.losses:per_token_loss"),
    # --- head curves [layer, head, seq] ---
    Score("ablation_per_token_loss_delta", Kind.HEAD_CURVE, _ABLATION,
          "per_token_loss with the head's output zeroed minus per_token_loss (dataset)",
          "jaxinduct.scores.ablation:ablation_per_token_loss_delta"),
    Score("ablation_per_token_loss_delta_pattern_preserving", Kind.HEAD_CURVE, _ABLATION,
          "as ablation_per_token_loss_delta, with attention patterns frozen (dataset)",
          "jaxinduct.scores.ablation:ablation_per_token_loss_delta_pattern_preserving"),
)  # fmt: skip

_REGISTRY: dict[tuple[str, Kind], Score] = {}


def register(score: Score) -> Score:
    """Add ``score``; refuses a (name, kind) already registered. Returns it."""
    key = (score.name, score.kind)
    if key in _REGISTRY:
        raise DuplicateScoreError(f"a {score.kind} score named {score.name!r} is already registered")
    _REGISTRY[key] = score
    return score


def unregister(name: str, kind: Kind | None = None) -> None:
    """Remove the score ``name`` (of ``kind``; of every kind when None)."""
    keys = [key for key in _REGISTRY if key[0] == name and kind in (None, key[1])]
    if not keys:
        raise _unknown([name] if kind is None else [f"{name} ({kind})"])
    for key in keys:
        del _REGISTRY[key]


@contextlib.contextmanager
def registered(*scores: Score) -> Iterator[tuple[Score, ...]]:
    """Register ``scores`` for the duration of a ``with`` block (tests, experiments)."""
    for i, score in enumerate(scores):
        try:
            register(score)
        except DuplicateScoreError:
            for done in scores[:i]:
                unregister(done.name, done.kind)
            raise
    try:
        yield scores
    finally:
        for score in scores:
            unregister(score.name, score.kind)


def scores(kind: Kind | None = None) -> tuple[Score, ...]:
    """The registered scores (of ``kind``), in registration order."""
    return tuple(s for s in _REGISTRY.values() if kind in (None, s.kind))


def names(kind: Kind | None = None) -> tuple[str, ...]:
    """The registered score names (of ``kind``), in registration order, each once."""
    return tuple(dict.fromkeys(s.name for s in scores(kind)))


def get(name: str, kind: Kind | None = None) -> Score:
    """The score ``name`` (of ``kind``; without one, the name's first registered entry)."""
    for score in scores(kind):
        if score.name == name:
            return score
    raise _unknown([name] if kind is None else [f"{name} ({kind})"])


def select(selected: Sequence[str] | None = None) -> tuple[Score, ...]:
    """The entries of these names, every kind of each, in registration order; None: every score."""
    if selected is None:
        return scores()
    if isinstance(selected, str):  # a lone name would otherwise be read as its characters
        selected = (selected,)
    unknown = sorted(set(selected) - set(names()))
    if unknown:
        raise _unknown(unknown)
    wanted = set(selected)
    return tuple(s for s in scores() if s.name in wanted)


def _unknown(what: Sequence[str]) -> UnknownScoreError:
    return UnknownScoreError(
        f"unknown score {', '.join(map(repr, what))}; known: {', '.join(sorted(names()))} (`jaxinduct scores` lists them)"
    )


def describe_scores() -> str:
    """The listing of ``jaxinduct scores``: name, kind, family and meaning of every score, aligned."""
    rows = [("name", "kind", "family", "meaning")] + [(s.name, str(s.kind), str(s.family), s.meaning) for s in scores()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


for _score in _BUILTIN:
    register(_score)
