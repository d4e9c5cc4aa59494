"""Memory planned, not guessed: how many checkpoints a batch holds, from the memory there is.

A scan holds, at its peak:

- on the host, the batch's restored checkpoints and the next batch's restores, which
  start as soon as this batch is handed over (the prefetch queue), in their stored dtype,
  plus a stacked copy where a device holds several rows (`host_bytes`);
- on each device, the compiled program's arguments (the placed batch: its rows, divided
  over the head axis where a leaf is sharded there), temporaries and outputs, read from
  the program's own memory analysis (`jax.stages.Compiled.memory_analysis`).

On the CPU backend the devices are the host: everything comes out of the RAM available
(MemAvailable). On an accelerator the device side must fit each device's free memory
(``memory_stats``: bytes_limit - bytes_in_use) and the host side the RAM.

`plan_batch` compiles the scan program for the batch asked for (or the default) and, when
it does not fit, for smaller batches (and, on an accelerator, one checkpoint per pass),
until one fits; `--batch` given and not fitting is a clear error before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinduct.errors import JaxInductError

HEADROOM = 0.85  # plan within this share of the memory there is: allocators, fragmentation, other threads
# On the CPU backend a batch computes one checkpoint at a time (--per-pass auto), so a second
# checkpoint per device buys no speed, only amortises per-batch overhead, which matters for
# small models alone: by default a device takes more than one only while they fit in this.
CPU_BATCH_BYTES = 256 * 2**20
# On the CPU backend a restore takes the cores the computation runs on, so overlapping them
# gains little (13 s of a 5-minute Pythia-1.4B checkpoint here) for a second checkpoint held
# in memory: a checkpoint larger than this is restored once the previous one has computed.
CPU_PREFETCH_BYTES = 2**30
GIB = 2**30


class MemoryPlanError(JaxInductError):
    """No batch fits the memory there is, or the batch asked for (--batch) does not."""


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    host_bytes: int  # RAM the scan may use
    device_bytes: int | None  # free memory of the fullest local device; None: the CPU backend (host RAM)
    described: str


def available_ram() -> int:
    """RAM available to a new allocation without swapping: MemAvailable (Linux), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(devices: list[jax.Device]) -> MemoryBudget:
    """What a scan on ``devices`` (this process's devices of the mesh) may use, with headroom."""
    host = int(available_ram() * HEADROOM)
    if devices[0].platform == "cpu":
        return MemoryBudget(host, None, f"{host / GIB:.1f} GiB of this host's available RAM")
    free = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if not free:  # a backend that reports no memory: plan the host side only
        return MemoryBudget(host, None, f"{host / GIB:.1f} GiB of host RAM (the devices report no memory)")
    device = int(min(free) * HEADROOM)
    return MemoryBudget(host, device, f"{device / GIB:.1f} GiB free per device, {host / GIB:.1f} GiB of host RAM")


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Per-device bytes of a compiled program (`memory_analysis`)."""

    arguments: int
    outputs: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries

    @classmethod
    def of(cls, compiled: Any) -> ProgramMemory:
        stats = compiled.memory_analysis()
        if stats is None:  # a backend without the analysis: count nothing rather than guess
            return cls(0, 0, 0)
        return cls(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes), int(stats.temp_size_in_bytes))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    batch: int
    per_pass: int | None
    checkpoint_bytes: int  # one checkpoint, as stored
    host_bytes: int  # peak on the host (on the CPU backend: everything)
    device_bytes: int | None  # peak per device on an accelerator
    budget: MemoryBudget
    program: Any  # the compiled program for this batch (`ScoreProgram`)
    compile_seconds: float = 0.0  # compiling every program tried
    ahead: bool = True  # the next batch restored while this one computes

    def describe(self) -> str:
        need = _needs(self.host_bytes, self.device_bytes)
        per_pass = "all" if self.per_pass is None else self.per_pass
        ahead = "" if self.ahead else ", the next restored after it"
        return (f"batch {self.batch} (checkpoints per pass: {per_pass}; {self.checkpoint_bytes / GIB:.2f} GiB per "
                f"checkpoint as stored{ahead}): about {need}, within {self.budget.described}")  # fmt: skip


def host_bytes(
    local_rows: int, checkpoint_bytes: int, program: ProgramMemory | None, devices: int, *, stacked: bool, ahead: bool = True
) -> int:
    """Peak host bytes of a batch of ``local_rows`` rows on this process.

    The host holds the batch's restored checkpoints (R = rows x checkpoint) and the next
    batch's restores, which start as soon as this batch is handed over (the prefetch queue,
    R; none without ``ahead``). Placing the batch copies it (``stacked``: a device holds several rows, or a slice of
    one) or not: a device holding one whole row gets a view of it (`place_batch`). On the
    CPU backend (``program`` given, per device, for ``devices`` local devices) the devices'
    memory is host memory: the placed batch is the restored rows themselves or their copy
    (whose originals are dropped once it is placed), and the program's temporaries and
    outputs come on top while it computes.
    """
    restores = local_rows * checkpoint_bytes
    copy = restores if stacked else 0
    held = (2 if ahead else 1) * restores
    if program is None:
        return held + copy
    return held + max(copy, devices * (program.outputs + program.temporaries))


Compile = Callable[[int, int | None], Any]  # (batch, per_pass) -> ScoreProgram


def plan_batch(
    compile_for: Compile,
    *,
    batch: int,
    batch_given: bool,
    step: int,
    per_pass: int | None,
    per_pass_given: bool,
    checkpoint_bytes: int,
    rows_for: Callable[[int], int],
    budget: MemoryBudget,
    local_devices: int,
    head_devices: int = 1,
    ahead: bool = True,
) -> MemoryPlan:
    """The largest batch (a multiple of ``step``, the mesh's ckpt axis, at most ``batch``) whose
    peak fits ``budget``; with ``batch_given`` only ``batch`` itself, else MemoryPlanError.

    rows_for(b): this process's rows of a batch of b. head_devices: the mesh's head axis (a
    row sliced over it is copied when placed). On an accelerator with per_pass not given, a
    batch that does not fit all at once is tried one checkpoint per pass first.
    """
    tried: list[str] = []
    candidates = [batch] if batch_given else list(range(batch, 0, -step))
    for b in candidates:
        passes = [per_pass]
        if budget.device_bytes is not None and not per_pass_given and per_pass != 1:
            passes.append(1)
        for p in passes:
            program = compile_for(b, p)
            memory = ProgramMemory.of(program.compiled)
            rows = rows_for(b)
            stacked = b // step > 1 or head_devices > 1
            if budget.device_bytes is None:
                host, device = host_bytes(rows, checkpoint_bytes, memory, local_devices, stacked=stacked, ahead=ahead), None
                fits = host <= budget.host_bytes
            else:
                host, device = host_bytes(rows, checkpoint_bytes, None, local_devices, stacked=stacked, ahead=ahead), memory.total
                fits = host <= budget.host_bytes and device <= budget.device_bytes
            plan = MemoryPlan(b, p, checkpoint_bytes, host, device, budget, program, ahead=ahead)
            if fits:
                return plan
            tried.append(f"batch {b} (checkpoints per pass: {'all' if p is None else p}) needs about {_needs(host, device)}")
    fix = (
        "Fix: pass a smaller --batch (or leave it out to have one chosen), or free memory"
        if batch_given
        else "Fix: free memory, scan on a machine with more, or select fewer scores (--scores)"
    )
    raise MemoryPlanError(f"no batch fits {budget.described}: " + "; ".join(tried) + f". {fix}.")


def _needs(host: int, device: int | None) -> str:
    text = f"{host / GIB:.1f} GiB on the host"
    return text if device is None else f"{device / GIB:.1f} GiB per device and " + text


def checkpoint_nbytes(weights: Any) -> int:
    """Bytes of one checkpoint's host arrays, in their stored dtypes."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(weights)))
