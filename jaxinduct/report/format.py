"""How the readers write numbers, verdicts, head names and free text."""

from __future__ import annotations

import math
import textwrap


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


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def first_line(error: str | None) -> str:
    """The first line of an error message (a traceback's headline), or a placeholder."""
    lines = (error or "").strip().splitlines()
    return lines[0] if lines else "(no message)"


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width``, continuation lines indented; never cut mid-word."""
    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False) or [""]
