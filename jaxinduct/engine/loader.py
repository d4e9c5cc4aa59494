"""The batcher: K checkpoints at a time, restored by a thread pool while the previous batch computes.

Restores run on host threads into host (numpy) weights; a batch's restores are started as
soon as the previous batch's have been taken, so reading the next checkpoints overlaps
scoring the current ones. One unreadable checkpoint is a failed row, never the end of a
scan. Under ``jax.distributed`` a process restores only the rows of each batch that live on
its own devices (`jaxinduct.parallel.local_rows`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from jax.sharding import Mesh

from jaxinduct import parallel
from jaxinduct.checkpoints.source import CheckpointSource, LoadedCheckpoint
from jaxinduct.errors import JaxInductError


@dataclasses.dataclass(frozen=True)
class Restored:
    """One row's restore: the checkpoint, or the error that stopped it."""

    checkpoint: LoadedCheckpoint | None
    error: str | None
    seconds: float


def restore(source: CheckpointSource, step: int) -> Restored:
    start = time.perf_counter()
    try:
        return Restored(source.load(step), None, time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - one unreadable checkpoint must not end the scan
        return Restored(None, f"{type(e).__name__}: {e}", time.perf_counter() - start)
    finally:
        release_freed_memory()


def _libc_malloc_trim() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Give the heap memory a restore freed back to the system (glibc's malloc_trim).

    Reading a checkpoint allocates a layer's tensors at a time (tens of MB each), below the
    size glibc's malloc then maps on its own, and glibc keeps what was freed in its heaps:
    at Pythia-1.4B's size that was 2.4 GB held by a scan for nothing. A no-op elsewhere.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def batches(steps: Sequence[int], size: int) -> list[list[int]]:
    """``steps`` in consecutive batches of ``size`` (the last may be short)."""
    return [list(steps[start : start + size]) for start in range(0, len(steps), size)]


# Restore threads by default: a few on accelerators; on the CPU backend half the cores (at
# most that many), since there the same cores also compute the scores and more restore
# threads only slow both down (measured on 2 cores: 1 thread 2.0 s, 4 threads 2.3 s per 50
# checkpoints).
LOAD_WORKERS = 4
LOAD_WORKERS_DEFAULT = f"{LOAD_WORKERS}; on the CPU backend half the cores, at most {LOAD_WORKERS}"


def resolve_load_workers(load_workers: int | None, mesh: Mesh) -> int:
    """Restore threads: the given number, else the default (`LOAD_WORKERS_DEFAULT`)."""
    if load_workers is None:
        if parallel.platform(mesh) == "cpu":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
            return min(LOAD_WORKERS, max(1, cores // 2))
        return LOAD_WORKERS
    if not isinstance(load_workers, int) or isinstance(load_workers, bool) or load_workers < 1:
        raise JaxInductError(f"--load-workers must be a positive integer, got {load_workers!r}")
    return load_workers


class RestoreGate:
    """How many restores may run at once, adjustable while they run (the engine sets it
    from measured restore and compute times: `restores_needed`)."""

    def __init__(self, limit: int) -> None:
        self._limit, self._active = max(1, limit), 0
        self._changed = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        with self._changed:
            self._limit = max(1, limit)
            self._changed.notify_all()

    def run(self, source: CheckpointSource, step: int) -> Restored:
        with self._changed:
            self._changed.wait_for(lambda: self._active < self._limit)
            self._active += 1
        try:
            return restore(source, step)
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()


def restores_needed(rows: int, restore_seconds: float, compute_seconds: float, cap: int) -> int:
    """Concurrent restores that keep up with the compute: a batch's rows must be restored
    within one batch's compute, so ceil(rows x restore time / compute time), in [1, cap].

    More would only take cores (on the CPU backend) or bandwidth from the computation;
    fewer would leave it waiting. One batch ahead is then enough: when restores keep up,
    the next batch is ready when the current one is done, and when they cannot (cap
    reached), no deeper queue makes the average rate higher.
    """
    if compute_seconds <= 0 or restore_seconds <= 0:
        return cap
    return max(1, min(cap, math.ceil(rows * restore_seconds / compute_seconds)))


def prefetched(
    source: CheckpointSource,
    steps_by_batch: Sequence[list[int]],
    rows: Sequence[int],
    workers: int,
    gate: RestoreGate | None = None,
    *,
    ahead: bool = True,
) -> Iterator[tuple[list[int], dict[int, Restored]]]:
    """Each batch's steps with this process's restored rows (row -> Restored), in order.

    ``rows``: the rows of a batch this process restores; a short last batch leaves some
    empty. With ``ahead`` the next batch's restores start before this batch is handed over
    (they overlap its compute); without, once the consumer asks for the next batch (one
    batch of checkpoints in memory, not two). ``workers`` threads at most; ``gate`` limits
    how many restore at once (default: all of them).
    """
    gate = gate or RestoreGate(workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore") as pool:

        def submit(steps: list[int]) -> dict[int, Future[Restored]]:
            return {r: pool.submit(gate.run, source, steps[r]) for r in rows if r < len(steps)}

        pending = submit(steps_by_batch[0]) if steps_by_batch else {}
        for index, steps in enumerate(steps_by_batch):
            restored = {r: future.result() for r, future in pending.items()}
            pending = {}
            if ahead and index + 1 < len(steps_by_batch):
                pending = submit(steps_by_batch[index + 1])
            yield steps, restored
            if not ahead and index + 1 < len(steps_by_batch):
                pending = submit(steps_by_batch[index + 1])
