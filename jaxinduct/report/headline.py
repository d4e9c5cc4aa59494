"""Which scores the readers present, and how, from the score registry.

`show` and the report do not list score names themselves: the registry
(`jaxinduct.scores.registry`) says which head scores are headline (a context column of
`show`; with a value range also a head map of the report), which are 0/1 verdicts, which
model scores and ablations there are, in its registration order, and how each is named
in words. The registry names its scores' functions without importing them, so `show` and
the report read it without starting JAX; this module still imports it when a reader first
asks, and `jaxinduct.results` never imports this module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def _registry() -> ModuleType:
    from jaxinduct.scores import registry

    return registry


def _head_scores() -> tuple[Any, ...]:
    registry = _registry()
    return registry.scores(registry.Kind.HEAD)


def context_columns() -> list[tuple[str, str]]:
    """(name, short title) of the headline head scores that are not verdicts: `show`'s context columns."""
    return [(s.name, s.title or s.name) for s in _head_scores() if s.headline and not s.verdict]


def verdict_columns() -> list[tuple[str, str]]:
    """(name, short title) of the induction verdicts: `show`'s verdict columns, and what flags a
    head in the report.

    The 0/1 verdicts that have a short title: induction_behaviour and induction_mechanism.
    induction_verdicts_agree is a verdict too, but about the other two (1 where they agree,
    both 0 or both 1), so it flags no head and gets no column; it has no title.
    """
    return [(s.name, s.title) for s in _head_scores() if s.verdict and s.title]


def map_metrics() -> list[tuple[str, tuple[float, float]]]:
    """(name, colour range) of the headline head scores with a value range: the report's head maps."""
    return [(s.name, s.value_range) for s in _head_scores() if s.headline and not s.verdict and s.value_range]


def model_metrics() -> tuple[str, ...]:
    """The model-level scores, in registration order: `show` lists each, "-" where not computed."""
    registry = _registry()
    return tuple(s.name for s in registry.scores(registry.Kind.MODEL))


def ablation_metrics() -> list[str]:
    """The per-head ablation scores (the ablation family's head scores), in registration order."""
    return [s.name for s in _head_scores() if s.family == _registry().Family.ABLATION]


def words(name: str) -> str:
    """A score named in words, as figures and tables title it (its registry label)."""
    registry = _registry()
    try:
        return registry.get(name).words
    except registry.UnknownScoreError:  # a score stored by a scan but not registered here
        return name.replace("_", " ")
