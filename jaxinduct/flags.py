"""Command-line spellings of typed config values, for configs that are the CLI (`jaxinduct.cli`).

A config field annotated with one of these types is parsed from (and printed as) one
command-line word: ``--scores prefix_matching,copying``, ``--mesh ckpt=4,head=2``,
``--steps 0:1000:100,latest``. The field's type stays the typed value; these annotations
only tell tyro how to spell it. Plain Python: the command line imports this before JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol

import tyro

from jaxinduct.checkpoints.selection import StepSelection


class OneWord(Protocol):
    """A config value with a one-word form: ``parse(text)`` reads it and ``str()`` writes it."""

    @classmethod
    def parse(cls, text: str) -> Any: ...


def one_word(cls: type, metavar: str, parse: Callable[[str], Any] | None = None) -> Any:
    """``Annotated[cls, ...]``: a field of type ``cls`` read from one word by ``cls.parse``
    (or ``parse``) and printed with ``str``."""
    read = parse or cls.parse  # type: ignore[attr-defined]
    return Annotated[
        cls,
        tyro.constructors.PrimitiveConstructorSpec(
            nargs=1,
            metavar=metavar,
            instance_from_str=lambda args: read(args[0]),
            is_instance=lambda value: isinstance(value, cls),
            str_from_instance=lambda value: [str(value)],
        ),
    ]


def comma_separated(text: str) -> tuple[str, ...] | None:
    """The names of ``a,b,c``; None for an empty list (not given)."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    return names or None


# A comma-separated list of names; empty means "not given" (None).
CommaSeparated = Annotated[
    tuple[str, ...] | None,
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=1,
        metavar="NAME,NAME,...",
        instance_from_str=lambda args: comma_separated(args[0]),
        is_instance=lambda value: value is None or isinstance(value, tuple),
        str_from_instance=lambda value: [",".join(value or ())],
    ),
]

# A --steps expression: all | latest | N | A:B | A:B:S | every:N, comma-separated.
StepsFlag = one_word(StepSelection, "STEPS")

# Checkpoints computed at once inside a batch's compiled pass.
PerPass = int | Literal["auto", "all"]

# A command's positional SOURCE (a checkpoint directory).
SourcePath = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")]

# On a nested config field: its flags without the field's name in front (--block-len, not
# --probe.block-len); configs nested deeper keep theirs (--thresholds.copying).
NO_PREFIX = tyro.conf.arg(name="")


def default_is(text: str) -> Any:
    """Field metadata: how the help states a default that is computed, not a literal."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")
