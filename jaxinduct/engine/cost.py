"""What a compiled program costs: matmul FLOPs, bytes moved and eigenproblems, per run.

XLA's own cost analysis (``compiled.cost_analysis()``) counts the body of a loop once,
whatever its trip count: the scan over layers in every forward pass and the lax.map
over source layers and checkpoints would be undercounted by the number of layers or
more (issue 13 read 44 GFLOP for a forward pass that does about 250). Counting from
the jaxpr instead overcounts: it sees logits that no score reads and products that
XLA hoists out of loops. So this module reads the optimised HLO of the compiled
program, which is what runs, and multiplies each loop body by the trip count XLA
proved for it (``known_trip_count``).

What is counted, per execution of the program:

- ``flops``: 2 x (output elements) x (contracted size) of every ``dot``, wherever
  it is (fused or not). Element-wise work, softmax, norms and gathers are left out:
  the share of the matmul peak is only meaningful for products.
- ``bytes_accessed``: operands read plus results written by every instruction that
  runs as a unit (a fusion counts its operands and results, not its insides), the
  model of XLA's cost analysis, with loops multiplied out. What the program moves
  if nothing stays in cache between units.
- ``eigenproblems`` and ``eig_flops``: matrices whose eigenvalues are computed,
  by a host callback (the CPU and TPU path of
  `jaxinduct.scores.mechanistic.eigenvalues`) or a LAPACK/cuSOLVER custom call;
  their work is estimated as 10 n^3 each (Hessenberg reduction plus QR iterations).
- ``unbounded_loops``: while loops whose trip count XLA could not prove, counted
  once each (0 for every jaxinduct program; a caller can check).

A conditional counts its most expensive branch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][a-z0-9-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>\S+)\s.*\{\s*$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%([^\s,)}]+)")
_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|(?:true|false)_computation=%([^\s,]+))")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
# Instructions that move no data of their own.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id", "replica-id"}
_EIG_TARGETS = ("geev", "callback", "eig")


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Work of one execution of a compiled program (see the module docstring)."""

    flops: float = 0.0
    bytes_accessed: float = 0.0
    eig_flops: float = 0.0
    eigenproblems: float = 0.0
    unbounded_loops: int = 0

    def __add__(self, other: ProgramCost) -> ProgramCost:
        return ProgramCost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def times(self, n: float) -> ProgramCost:
        return ProgramCost(self.flops * n, self.bytes_accessed * n, self.eig_flops * n, self.eigenproblems * n,
                           self.unbounded_loops)  # fmt: skip

    def per(self, n: float) -> ProgramCost:
        return self.times(1.0 / n)


def compiled_cost(compiled: Any) -> ProgramCost:
    """The cost of one run of a `jax.stages.Compiled` (``jax.jit(f).lower(...).compile()``)."""
    return hlo_cost(compiled.as_text())


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str
    op: str
    rest: str


def hlo_cost(text: str) -> ProgramCost:
    """The cost of one run of the entry computation of an optimised HLO module's text."""
    computations, entry = _parse(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    memo: dict[tuple[str, bool], ProgramCost] = {}
    return _computation_cost(entry, computations, memo, top_level=True)


def _parse(text: str) -> tuple[dict[str, list[_Instruction]], str | None]:
    computations: dict[str, list[_Instruction]] = {}
    entry = None
    current: list[_Instruction] | None = None
    for line in text.splitlines():
        if current is None:
            header = _COMPUTATION.match(line)
            if header:
                current = computations.setdefault(header["name"], [])
                if line.startswith("ENTRY"):
                    entry = header["name"]
            continue
        if line.startswith("}"):
            current = None
            continue
        found = _INSTRUCTION.match(line)
        if found:
            current.append(_Instruction(found["name"], found["shape"], found["op"], found["rest"]))
    return computations, entry


def _computation_cost(
    name: str, computations: dict[str, list[_Instruction]], memo: dict[tuple[str, bool], ProgramCost], *, top_level: bool
) -> ProgramCost:
    """top_level: the computation's instructions run as units (entry, loop bodies, branches),
    so their bytes count; inside a fusion only the products do."""
    key = (name, top_level)
    if key in memo:
        return memo[key]
    instructions = computations.get(name, [])
    shapes = {i.name: i.shape for i in instructions}
    total = ProgramCost()
    for ins in instructions:
        total = total + _instruction_cost(ins, shapes, computations, memo, top_level=top_level)
    memo[key] = total
    return total


def _instruction_cost(
    ins: _Instruction,
    shapes: dict[str, str],
    computations: dict[str, list[_Instruction]],
    memo: dict[tuple[str, bool], ProgramCost],
    *,
    top_level: bool,
) -> ProgramCost:
    cost = ProgramCost()
    if top_level and ins.op not in _FREE and ins.op not in ("while", "conditional", "call"):
        operands = _operand_names(ins.rest)
        moved = _bytes(ins.shape) + sum(_bytes(shapes[o]) for o in operands if o in shapes)
        cost = cost + ProgramCost(bytes_accessed=moved)
    if ins.op == "dot":
        cost = cost + ProgramCost(flops=_dot_flops(ins, shapes))
    elif ins.op == "custom-call" and any(t in _custom_call_target(ins.rest) for t in _EIG_TARGETS):
        cost = cost + _eig_cost(ins, shapes)
    elif ins.op == "while":
        called = dict(re.findall(r"(body|condition)=%([^\s,)}]+)", ins.rest))
        trips = _TRIP_COUNT.search(ins.rest)
        body = _computation_cost(called["body"], computations, memo, top_level=True)
        body = body + _computation_cost(called["condition"], computations, memo, top_level=True)
        if trips is None:
            cost = cost + dataclasses.replace(body, unbounded_loops=body.unbounded_loops + 1)
        else:
            cost = cost + body.times(int(trips[1]))
    elif ins.op == "conditional":
        branches = []
        for group, single in _BRANCHES.findall(ins.rest):
            branches += [b.strip().lstrip("%") for b in group.split(",") if b.strip()] if group else [single]
        costs = [_computation_cost(b, computations, memo, top_level=True) for b in branches]
        if costs:
            cost = cost + max(costs, key=lambda c: c.flops + c.eig_flops)
    else:
        for called in _CALLED.findall(ins.rest):
            # A call runs its computation as units; a fusion's (or reduce's) insides are one unit.
            cost = cost + _computation_cost(called, computations, memo, top_level=ins.op == "call")
    return cost


def _operand_names(rest: str) -> list[str]:
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return re.findall(r"%([^\s,)]+)", rest[:end])


def _arrays(shape: str) -> list[tuple[np.dtype, tuple[int, ...]]]:
    out = []
    for found in _ARRAY.finditer(shape):
        try:
            dtype = np.dtype(_DTYPES.get(found["dtype"], found["dtype"]))
        except TypeError:
            continue
        out.append((dtype, tuple(int(d) for d in found["dims"].split(",") if d)))
    return out


_DTYPES = {"pred": "bool", "f32": "float32", "f64": "float64", "f16": "float16", "bf16": "uint16", "s32": "int32",
           "s64": "int64", "u32": "uint32", "u8": "uint8", "s8": "int8", "c64": "complex64", "c128": "complex128",
           "s16": "int16", "u16": "uint16", "u64": "uint64"}  # fmt: skip


def _bytes(shape: str) -> float:
    return float(sum(math.prod(dims) * dtype.itemsize for dtype, dims in _arrays(shape)))


def _dot_flops(ins: _Instruction, shapes: dict[str, str]) -> float:
    operands = _operand_names(ins.rest)
    contracting = _CONTRACTING.search(ins.rest)
    lhs = _arrays(shapes.get(operands[0], "")) if operands else []
    out = _arrays(ins.shape)
    if not lhs or not out or contracting is None:
        return 0.0
    dims = [int(d) for d in contracting[1].split(",") if d]
    return 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][d] for d in dims)


def _custom_call_target(rest: str) -> str:
    found = re.search(r'custom_call_target="([^"]*)"', rest)
    return found[1].lower() if found else ""


def _eig_cost(ins: _Instruction, shapes: dict[str, str]) -> ProgramCost:
    # The operand that is a stack of square matrices [..., n, n].
    for operand in _operand_names(ins.rest):
        for _, dims in _arrays(shapes.get(operand, "")):
            if len(dims) >= 2 and dims[-1] == dims[-2]:
                count = math.prod(dims[:-2])
                return ProgramCost(eig_flops=10.0 * dims[-1] ** 3 * count, eigenproblems=float(count))
    return ProgramCost()
