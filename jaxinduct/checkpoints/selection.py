"""Step selection: the ``--steps`` grammar, parsed once into a typed `StepSelection` and
applied to the steps a source has committed.

Terms, joined by commas (the union is taken):

  all              every step (the default)
  latest           the last committed step
  N                step N (must exist)
  A:B              steps with A <= step <= B (either end may be left out)
  A:B:S            steps A, A+S, A+2S, ... up to B that exist
  every:N          every N-th available step, counting from the first (and the last)

A malformed expression is refused when it is parsed (a config is built), before any
checkpoint is listed; what an expression selects depends on the committed steps. Plain
Python (no JAX), so that the command line can parse it before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jaxinduct.errors import JaxInductError

class StepSelectionError(JaxInductError, ValueError):
    """A --steps expression is malformed or selects nothing."""


_RANGE = re.compile(r"^(-?\d*):(-?\d*)(?::(\d+))?$")
_EXAMPLES = "use e.g. 'all', 'latest', '0:5000:100', '100,200' or 'every:4'"


@dataclasses.dataclass(frozen=True)
class AllSteps:
    def pick(self, available: list[int]) -> set[int]:
        return set(available)


@dataclasses.dataclass(frozen=True)
class LatestStep:
    def pick(self, available: list[int]) -> set[int]:
        return set(available[-1:])


@dataclasses.dataclass(frozen=True)
class OneStep:
    step: int

    def pick(self, available: list[int]) -> set[int]:
        if self.step not in available:
            raise StepSelectionError(f"--steps: step {self.step} is not a committed step ({_describe(available)})")
        return {self.step}


@dataclasses.dataclass(frozen=True)
class StepRange:
    start: int | None  # None: the first committed step
    stop: int | None  # None: the last committed step (inclusive)
    stride: int | None = None  # None: every step in the range

    def pick(self, available: list[int]) -> set[int]:
        start = self.start if self.start is not None else (available[0] if available else 0)
        stop = self.stop if self.stop is not None else (available[-1] if available else 0)
        in_range = {s for s in available if start <= s <= stop}
        return in_range if self.stride is None else {s for s in in_range if (s - start) % self.stride == 0}


@dataclasses.dataclass(frozen=True)
class EveryNth:
    n: int

    def pick(self, available: list[int]) -> set[int]:
        return set(available[:: self.n]) | set(available[-1:])


StepTerm = AllSteps | LatestStep | OneStep | StepRange | EveryNth


def _parse_term(term: str) -> StepTerm:
    if term == "all":
        return AllSteps()
    if term == "latest":
        return LatestStep()
    if term.startswith("every:"):
        n = term.removeprefix("every:")
        if not n.isdigit() or int(n) < 1:
            raise StepSelectionError(f"--steps term {term!r}: every:N needs a positive integer N")
        return EveryNth(int(n))
    if re.fullmatch(r"\d+", term):
        return OneStep(int(term))
    match = _RANGE.match(term)
    if not match:
        raise StepSelectionError(
            f"--steps term {term!r} is not one of: all, latest, N, A:B, A:B:S, every:N (comma-separated)"
        )
    stride = int(match[3]) if match[3] else None
    if stride == 0:
        raise StepSelectionError(f"--steps term {term!r}: the stride must be positive")
    return StepRange(int(match[1]) if match[1] else None, int(match[2]) if match[2] else None, stride)


@dataclasses.dataclass(frozen=True)
class StepSelection:
    """A parsed ``--steps`` expression: its terms, and the text they were written as."""

    text: str
    terms: tuple[StepTerm, ...]

    @classmethod
    def parse(cls, text: str) -> StepSelection:
        if not text or not text.strip():
            raise StepSelectionError(f"--steps is empty; {_EXAMPLES}")
        return cls(text, tuple(_parse_term(term.strip()) for term in text.split(",")))

    def select(self, available: Sequence[int]) -> list[int]:
        """The available steps this selects, ascending; an error naming them if it selects none."""
        steps = sorted(set(available))
        chosen: set[int] = set()
        for term in self.terms:
            chosen |= term.pick(steps)
        if not chosen:
            raise StepSelectionError(f"--steps {self.text!r} selects none of the committed steps ({_describe(steps)})")
        return sorted(chosen)

    def __str__(self) -> str:
        return self.text


ALL_STEPS = StepSelection.parse("all")


def select_steps(expression: str | StepSelection, available: Sequence[int]) -> list[int]:
    """The available steps an expression (module doc) selects, ascending."""
    selection = expression if isinstance(expression, StepSelection) else StepSelection.parse(expression)
    return selection.select(available)


def _describe(steps: list[int]) -> str:
    if not steps:
        return "none yet"
    if len(steps) <= 8:
        return f"{len(steps)}: {steps}"
    return f"{len(steps)}: {steps[:4]} ... {steps[-3:]}"
