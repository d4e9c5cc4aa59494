"""Command-line spellings of typed config values, for configs that are the CLI (`jaxinduct.cli`).

A config field annotated with one of these types is parsed from (and printed as) one
command-line word: ``--scores prefix_matching,copying``, ``--mesh ckpt=4,head=2``. The
field's type stays the typed value; these annotations only tell tyro how to spell it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import tyro

from jaxinduct.parallel import MeshConfig


def _names(text: str) -> tuple[str, ...] | None:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    return names or None


# A comma-separated list of names; empty means "not given" (None).
CommaSeparated = Annotated[
    tuple[str, ...] | None,
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=1,
        metavar="NAME,NAME,...",
        instance_from_str=lambda args: _names(args[0]),
        is_instance=lambda value: value is None or isinstance(value, tuple),
        str_from_instance=lambda value: [",".join(value or ())],
    ),
]

# A device mesh: ckpt=N,head=M (either part may be left out).
MeshFlag = Annotated[
    MeshConfig,
    tyro.constructors.PrimitiveConstructorSpec(
        nargs=1,
        metavar="ckpt=N,head=M",
        instance_from_str=lambda args: MeshConfig.parse(args[0]),
        is_instance=lambda value: isinstance(value, MeshConfig),
        str_from_instance=lambda value: [str(value)],
    ),
]

# Checkpoints computed at once inside a batch's compiled pass.
PerPass = int | Literal["auto", "all"]

Positional = tyro.conf.Positional
# A command's positional SOURCE (a checkpoint directory).
SourcePath = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")]
# On a nested config field: its flags without the field's name in front (--block-len, not
# --probe.block-len); configs nested deeper keep theirs (--thresholds.copying).
NO_PREFIX = tyro.conf.arg(name="")
