"""Step selection: the ``--steps`` grammar, applied to the steps a source has committed."""

from __future__ import annotations

import re

from jaxinduct.checkpoints.protocol import StepSelectionError

_RANGE = re.compile(r"^(-?\d*):(-?\d*)(?::(\d+))?$")


def select_steps(expression: str, available: list[int]) -> list[int]:
    """The available steps an expression selects, ascending.

    Terms, joined by commas (the union is taken):
      all              every step (the default)
      latest           the last committed step
      N                step N (must exist)
      A:B              steps with A <= step <= B (either end may be left out)
      A:B:S            steps A, A+S, A+2S, ... up to B that exist
      every:N          every N-th available step, counting from the first (and the last)
    """
    available = sorted(set(available))
    if not expression or not expression.strip():
        raise StepSelectionError("--steps is empty; use e.g. 'all', 'latest', '0:5000:100', '100,200' or 'every:4'")
    chosen: set[int] = set()
    for term in (t.strip() for t in expression.split(",")):
        chosen |= _select_term(term, available)
    if not chosen:
        shown = _describe(available)
        raise StepSelectionError(f"--steps {expression!r} selects none of the committed steps ({shown})")
    return sorted(chosen)


def _select_term(term: str, available: list[int]) -> set[int]:
    if term == "all":
        return set(available)
    if term == "latest":
        return set(available[-1:])
    if term.startswith("every:"):
        n = term.removeprefix("every:")
        if not n.isdigit() or int(n) < 1:
            raise StepSelectionError(f"--steps term {term!r}: every:N needs a positive integer N")
        return set(available[:: int(n)]) | set(available[-1:])
    if re.fullmatch(r"\d+", term):
        step = int(term)
        if step not in available:
            raise StepSelectionError(f"--steps: step {step} is not a committed step ({_describe(available)})")
        return {step}
    match = _RANGE.match(term)
    if not match:
        raise StepSelectionError(
            f"--steps term {term!r} is not one of: all, latest, N, A:B, A:B:S, every:N (comma-separated)"
        )
    start = int(match[1]) if match[1] else (available[0] if available else 0)
    stop = int(match[2]) if match[2] else (available[-1] if available else 0)
    stride = int(match[3]) if match[3] else None
    if stride == 0:
        raise StepSelectionError(f"--steps term {term!r}: the stride must be positive")
    in_range = {s for s in available if start <= s <= stop}
    return in_range if stride is None else {s for s in in_range if (s - start) % stride == 0}


def _describe(steps: list[int]) -> str:
    if not steps:
        return "none yet"
    if len(steps) <= 8:
        return f"{len(steps)}: {steps}"
    return f"{len(steps)}: {steps[:4]} ... {steps[-3:]}"
