"""The scan engine: every score of every checkpoint of a trajectory, into the store.

Data flow (docs/DESIGN: discovery -> adapter -> batcher -> placement -> kernels -> store):

1. discovery: the source's committed steps, the ``--steps`` selection, minus the steps
   the store already holds for this (run, probe hash): a rescan or a resumed scan only
   computes what is missing;
2. batcher: K checkpoints per batch, restored by a thread pool while the previous batch
   computes, stacked on the host on a leading ckpt axis and padded to K (always K, so
   that the kernels compile once per (model shape, K, mesh)); a validity mask marks the
   real rows;
3. placement: a Mesh with axes (ckpt, head); every leaf sharded along ckpt and, for the
   per-head leaves, along head;
4. kernels: `score_all` (one jit + vmap);
5. store: one transaction per batch (process 0 only); after the last, the run's phase
   change is detected again from everything stored (`jaxinduct.results.phase`).

Under ``jax.distributed`` (several processes, one per host), each process restores only
the rows of a batch that live on its own devices, the global batch is assembled from
process-local data (`jax.make_array_from_process_local_data`), results are gathered,
and process 0 alone opens and writes the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinduct.errors import JaxInductError
from jaxinduct.results.phase import update_phase_change
from jaxinduct.scores.probes import ProbeConfig, Probes, make_probes
from jaxinduct.scores.batched import PUBLIC_SCORE_NAMES, SCORES_VERSION, ScoreResults, score_all
from jaxinduct.checkpoints.sources import CheckpointSource, LoadedCheckpoint, open_source, select_steps
from jaxinduct.results.store import CheckpointScores, ResultStore
from jaxinduct.model.weights import ModelSpec, Weights, expected_shapes, make_weights

CKPT, HEAD = "ckpt", "head"
DEFAULT_BATCH = 8


class ScanError(JaxInductError):
    """A scan's options do not fit the source, the devices or each other."""


# --- options -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    """One scan (the `jaxinduct scan` command's options, as a Python API)."""

    source: str
    store: str
    run: str | None = None  # default: the source directory's name
    steps: str = "all"
    scores: tuple[str, ...] | None = None  # public names to keep; None: all
    dataset: str | None = None  # .npy of token ids [example, seq]
    batch: int | None = None  # K checkpoints per batch; default: DEFAULT_BATCH rounded to the mesh
    mesh: str | None = None  # "ckpt=N,head=M"; default: every device on ckpt
    probe: ProbeConfig = ProbeConfig()
    # Threads restoring checkpoints; None: 4, or on the CPU backend half the cores (at most
    # 4), since there the same cores also compute the scores and more restore threads only
    # slow both down (measured on 2 cores: 1 thread 2.0 s, 4 threads 2.3 s per 50 checkpoints).
    load_workers: int | None = None
    # Checkpoints computed at once inside a batch's compiled pass (score_all's
    # checkpoints_per_pass): None vmaps the whole batch; "auto" picks 1 on CPU, where
    # vmapping tiny per-checkpoint matmuls is slower than taking them one at a time
    # (bench/score_throughput.py), and the whole batch on accelerators.
    per_pass: int | None | str = "auto"
    progress: bool = True
    mapping: str | None = None  # YAML mapping a foreign Orbax params tree to canonical names


@dataclasses.dataclass
class ScanSummary:
    run: str
    probe_hash: str
    selected: int = 0
    already_done: int = 0
    scanned: int = 0
    failed: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    failures: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    phase_change: str | None = None  # the run's detected phase change after this scan, described

    def describe(self) -> str:
        lines = [
            f"run {self.run!r} (probe hash {self.probe_hash}): {self.selected} checkpoints selected, "
            f"{self.already_done} already in the store, {self.scanned} scanned, {self.failed} failed",
        ]
        if self.scanned or self.failed:
            rate = (self.scanned + self.failed) / self.seconds if self.seconds > 0 else float("nan")
            lines.append(f"{self.seconds:.1f} s ({rate:.2f} checkpoints/s, first batch incl. compile {self.compile_seconds:.1f} s)")
        else:
            lines.append("nothing to scan: every selected checkpoint is already in the store")
        lines += [f"  step {step} failed: {error.splitlines()[0]}" for step, error in self.failures[:5]]
        if self.phase_change is not None:
            lines.append(f"phase change: {self.phase_change}")
        return "\n".join(lines)


def parse_mesh(text: str | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (ckpt, head) Mesh from "ckpt=N,head=M" (either may be left out; default all on ckpt)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {CKPT: None, HEAD: 1}
    if text:
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in sizes or not value.strip().isdigit() or int(value) < 1:
                raise ScanError(f"--mesh {text!r}: expected 'ckpt=N,head=M' with positive integers (e.g. ckpt=4,head=2)")
            sizes[name] = int(value)
    head = sizes[HEAD]
    ckpt = sizes[CKPT] if sizes[CKPT] is not None else len(devices) // head
    if ckpt < 1 or ckpt * head != len(devices):
        raise ScanError(
            f"--mesh {text!r} needs ckpt x head = {ckpt} x {head} = {ckpt * head} devices, but "
            f"{len(devices)} are present ({devices[0].platform}); choose sizes whose product is {len(devices)}"
        )
    # jax.devices() is ordered by process, so each process's devices are consecutive rows.
    return Mesh(np.array(devices).reshape(ckpt, head), (CKPT, HEAD))


def resolve_batch(batch: int | None, mesh: Mesh) -> int:
    ckpt = mesh.shape[CKPT]
    if batch is None:
        return ckpt * -(-DEFAULT_BATCH // ckpt)
    if batch < 1 or batch % ckpt:
        raise ScanError(f"--batch {batch} must be a positive multiple of the mesh's ckpt axis ({ckpt} devices)")
    return batch


def resolve_per_pass(per_pass: int | None | str, mesh: Mesh) -> int | None:
    if per_pass == "auto":
        return 1 if mesh.devices.flat[0].platform == "cpu" else None
    if per_pass is None:
        return None
    if not isinstance(per_pass, int) or per_pass < 1:
        raise ScanError(f"--per-pass must be a positive integer, 'auto' or 'all', got {per_pass!r}")
    return per_pass


def resolve_load_workers(load_workers: int | None, mesh: Mesh) -> int:
    if load_workers is None:
        if mesh.devices.flat[0].platform == "cpu":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
            return min(4, max(1, cores // 2))
        return 4
    if not isinstance(load_workers, int) or load_workers < 1:
        raise ScanError(f"--load-workers must be a positive integer, got {load_workers!r}")
    return load_workers


def check_head_axis(spec: ModelSpec, mesh: Mesh) -> None:
    if spec.n_heads % mesh.shape[HEAD]:
        raise ScanError(
            f"--mesh head={mesh.shape[HEAD]} does not divide the model's {spec.n_heads} heads; "
            "use a head axis size that divides it (or 1)"
        )


def load_dataset(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise ScanError(f"--dataset {file}: no such file (expected a .npy array of token ids [example, seq])")
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ScanError(f"--dataset {file} is not a readable .npy array ({e})") from e


def probe_identity(
    probes: Probes, scores: tuple[str, ...] | None, mapping_digest: str | None = None
) -> tuple[str, str]:
    """(hash, JSON) identifying the results: the probes, which scores are kept and, for a
    source read through a mapping (`jaxinduct.checkpoints.mapping.Mapping.digest`), the mapping."""
    config = dataclasses.asdict(probes.config)
    record = {
        "probes": config,
        "probe_hash": probes.config_hash(),
        "scores": sorted(scores) if scores else "all",
        "scores_version": SCORES_VERSION,
    }
    if mapping_digest is not None:  # absent without a mapping: unmapped hashes stay as they were
        record["mapping"] = mapping_digest
    text = json.dumps(record, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


# --- placement -----------------------------------------------------------------------------


def weight_shardings(spec: ModelSpec, mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedSharding per leaf of ckpt-stacked Weights: ckpt on every leaf, head on per-head ones."""
    per_head = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")  # [ckpt, layer, head, ...]
    shardings = {}
    for name, shape in expected_shapes(spec).items():
        axes: list[str | None] = [CKPT] + [None] * len(shape)
        if name in per_head:
            axes[2] = HEAD
        shardings[name] = NamedSharding(mesh, PartitionSpec(*axes))
    return shardings


def make_weights_skeleton(spec: ModelSpec) -> Weights:
    """Weights of zeros (host numpy), the padding row of a batch with no real checkpoint here."""
    return make_weights(spec, {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(spec).items()})


def _local_rows(mesh: Mesh, batch: int) -> list[int]:
    """The rows of a K-batch that live on this process's devices (contiguous, ascending)."""
    per_device = batch // mesh.shape[CKPT]
    me = jax.process_index()
    rows = [r for r in range(batch) if mesh.devices[r // per_device, 0].process_index == me]
    if rows and rows != list(range(rows[0], rows[-1] + 1)):
        raise ScanError("this process's devices are not consecutive on the mesh's ckpt axis")
    return rows


def place_batch(
    local: Sequence[Weights], spec: ModelSpec, shardings: dict[str, NamedSharding], batch: int
) -> Weights:
    """Stack this process's rows on the host and assemble the global [K, ...] batch on the mesh.

    shardings: `weight_shardings(spec, mesh)`, computed once per scan.
    """
    arrays = {}
    for name in expected_shapes(spec):
        stacked = np.stack([np.asarray(getattr(w, name), np.float32) for w in local])
        global_shape = (batch, *stacked.shape[1:])
        arrays[name] = jax.make_array_from_process_local_data(shardings[name], stacked, global_shape)
    return make_weights(spec, arrays, batch_dims=1)


def gather_results(results: ScoreResults) -> ScoreResults:
    """Every process's rows of the results, as host numpy arrays."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, jax.device_get(results))
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(results, tiled=True))


def checkpoint_scores(results: ScoreResults, row: int, step: int, tokens_seen: int | None, seconds: float,
                      keep: Callable[[str], bool]) -> CheckpointScores:  # fmt: skip
    """One row of the batch results, in the store's unit."""
    pick = lambda group: {k: v[row] for k, v in group.items() if keep(k)}  # noqa: E731
    curves = {**pick(results.curve), **pick(results.head_curve)}
    return CheckpointScores(
        step=step,
        tokens_seen=tokens_seen,
        seconds=seconds,
        head=pick(results.head),
        pair=pick(results.pair),
        model={k: float(v) for k, v in pick(results.model).items()},
        curve=curves,
    )


# --- the engine ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Prepared:
    source: CheckpointSource
    spec: ModelSpec
    run: str
    todo: list[int]
    selected: int
    already_done: int
    probes: Probes
    probe_hash: str
    probe_json: str
    mesh: Mesh
    batch: int


def _scores_filter(scores: tuple[str, ...] | None) -> Callable[[str], bool]:
    if not scores:
        return lambda name: True
    wanted = set(scores)
    return lambda name: name in wanted


def _probe_config_for(options: ScanOptions) -> ProbeConfig:
    # Ablation is the one costly group: compute it only when asked for (or by default).
    if options.scores and not any(name.startswith("ablation_") for name in options.scores):
        return dataclasses.replace(options.probe, ablation=False)
    return options.probe


def _check_score_names(scores: tuple[str, ...] | None) -> None:
    if not scores:
        return
    unknown = sorted(set(scores) - PUBLIC_SCORE_NAMES)
    if unknown:
        raise ScanError(f"--scores: unknown score names {unknown}; known: {', '.join(sorted(PUBLIC_SCORE_NAMES))}")


def prepare(options: ScanOptions) -> tuple[_Prepared, Callable[[], ResultStore | None]]:
    """Validate every option before the store is touched; return the plan and a store opener."""
    source = open_source(options.source, mapping=options.mapping)  # refuses a source with no committed step
    _check_score_names(options.scores)
    mesh = parse_mesh(options.mesh)
    batch = resolve_batch(options.batch, mesh)
    resolve_per_pass(options.per_pass, mesh)  # bad values fail here, before the store is touched
    resolve_load_workers(options.load_workers, mesh)
    dataset = load_dataset(options.dataset)
    available = source.steps()
    spec = source.spec(available[0])  # each listing of a large directory costs: list once
    selected = select_steps(options.steps, available)
    check_head_axis(spec, mesh)
    probes = make_probes(spec, _probe_config_for(options), dataset=dataset)
    mapping = getattr(source, "mapping", None)  # a corrected mapping must not read as already scanned
    probe_hash, probe_json = probe_identity(probes, options.scores, None if mapping is None else mapping.digest())
    run = options.run or Path(options.source).expanduser().resolve().name

    def open_store() -> ResultStore | None:
        return ResultStore.open(options.store) if jax.process_index() == 0 else None

    plan = _Prepared(source, spec, run, selected, len(selected), 0, probes, probe_hash, probe_json, mesh, batch)
    return plan, open_store


def _broadcast_steps(steps: list[int] | None) -> list[int]:
    """Process 0's list of steps, on every process."""
    if jax.process_count() == 1:
        assert steps is not None
        return steps
    count = multihost_utils.broadcast_one_to_all(np.array(len(steps or []), np.int64))
    padded = np.zeros(int(count), np.int64)
    if steps:
        padded[:] = steps
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def scan(
    options: ScanOptions,
    *,
    on_batch: Callable[[list[int]], None] | None = None,
    skip_steps: Collection[int] = (),
) -> ScanSummary:
    """Scan the selected checkpoints of ``options.source`` into ``options.store``.

    Resumable: checkpoints already done for this (run, probe hash) are skipped, so a scan
    killed at any instant continues where it stopped and never duplicates rows. Failed
    ones are retried, except ``skip_steps`` (watch: those that failed while it runs).
    """
    plan, open_store = prepare(options)
    store = open_store()
    try:
        todo = None
        if store is not None:
            store.ensure_run(plan.run, plan.source.description, json.dumps(plan.spec.to_dict(), sort_keys=True))
            store.record_probe_config(plan.probe_hash, plan.probe_json)
            done = store.done_steps(plan.run, plan.probe_hash)
            todo = [s for s in plan.todo if s not in done and s not in skip_steps]
        plan.todo = _broadcast_steps(todo)
        plan.already_done = plan.selected - len(plan.todo)
        summary = _run_batches(plan, store, options, on_batch)
        if store is not None:
            # After the batches, in its own transaction: a kill before it leaves the previous
            # detection in place, and the next scan (or watch poll) redoes it.
            found = update_phase_change(store, plan.run, plan.probe_hash)
            summary.phase_change = "none found" if found is None else found.describe()
        return summary
    finally:
        plan.source.close()
        if store is not None:
            store.close()


def _batches(steps: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(steps), size):
        yield steps[start : start + size]


def _load(source: CheckpointSource, step: int) -> tuple[LoadedCheckpoint | None, str | None, float]:
    start = time.perf_counter()
    try:
        return source.load(step), None, time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 - one unreadable checkpoint must not end the scan
        return None, f"{type(e).__name__}: {e}", time.perf_counter() - start


def _run_batches(
    plan: _Prepared, store: ResultStore | None, options: ScanOptions, on_batch: Callable[[list[int]], None] | None
) -> ScanSummary:
    summary = ScanSummary(plan.run, plan.probe_hash, plan.selected, plan.already_done)
    keep = _scores_filter(options.scores)
    per_pass = resolve_per_pass(options.per_pass, plan.mesh)
    local_rows = _local_rows(plan.mesh, plan.batch)
    padding = make_weights_skeleton(plan.spec)
    shardings = weight_shardings(plan.spec, plan.mesh)
    progress = _Progress(len(plan.todo), enabled=options.progress and jax.process_index() == 0)
    started = time.perf_counter()
    batches = list(_batches(plan.todo, plan.batch))
    workers = resolve_load_workers(options.load_workers, plan.mesh)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore") as pool:

        def submit(steps: list[int]) -> dict[int, Future]:
            # Only the rows on this process's devices; a short last batch leaves rows empty.
            return {r: pool.submit(_load, plan.source, steps[r]) for r in local_rows if r < len(steps)}

        pending = submit(batches[0]) if batches else {}
        for index, steps in enumerate(batches):
            loads = {r: f.result() for r, f in pending.items()}
            # Start restoring the next batch now: it overlaps this batch's compute.
            pending = submit(batches[index + 1]) if index + 1 < len(batches) else {}
            local = [loads[r][0].weights if r in loads and loads[r][0] is not None else padding for r in local_rows]
            local_ok = np.array([r in loads and loads[r][0] is not None for r in local_rows], bool)
            ok = _gather_flags(local_ok, plan.batch)
            compute_start = time.perf_counter()
            placed = place_batch(local, plan.spec, shardings, plan.batch)
            # Rows without a checkpoint (padding, failed restores) are skipped, not scored.
            results = gather_results(score_all(placed, plan.probes, checkpoints_per_pass=per_pass, valid=ok))
            compute = time.perf_counter() - compute_start
            if index == 0:
                summary.compile_seconds = compute
            records, failures = [], []
            for row, step in enumerate(steps):
                load = loads.get(row)
                if ok[row]:
                    tokens = load[0].tokens_seen if load is not None else None
                    load_seconds = load[2] if load is not None else 0.0
                    records.append(checkpoint_scores(results, row, step, tokens, load_seconds + compute / len(steps), keep))
                else:
                    error = load[1] if load is not None else "restore failed on another process (see its log)"
                    failures.append((step, error or "unknown error"))
            if store is not None:
                store.write_batch(plan.run, plan.probe_hash, records)
                for step, error in failures:
                    store.mark_failed(plan.run, plan.probe_hash, step, error)
            summary.scanned += len(records)
            summary.failed += len(failures)
            summary.failures += failures
            progress.update(len(steps), steps[-1])
            if on_batch is not None:
                on_batch(steps)
    progress.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _gather_flags(local_ok: np.ndarray, batch: int) -> np.ndarray:
    if jax.process_count() == 1:
        out = np.zeros(batch, bool)
        out[: len(local_ok)] = local_ok
        return out
    return np.asarray(multihost_utils.process_allgather(local_ok, tiled=True)).reshape(batch)


# --- following a live run ------------------------------------------------------------------


def watch(
    options: ScanOptions,
    *,
    poll_seconds: float = 10.0,
    until_step: int | None = None,
    idle_timeout: float | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> ScanSummary:
    """Scan each checkpoint as soon as its save is committed, until a step >= ``until_step``
    is committed and every committed step has been scanned, or nothing new has arrived for
    ``idle_timeout`` seconds.

    Single-process. Orbax finalises a save by renaming its tmp directory, so a step that
    `steps()` lists is complete; steps still being written are never seen. A checkpoint
    that fails is recorded and reported once and not retried while watch runs (a committed
    checkpoint that cannot be read stays so); a later `scan` retries it.
    """
    if until_step is None and idle_timeout is None:
        raise ScanError("watch needs --until-step N or --idle-timeout SECONDS (or both), so that it ends")
    if jax.process_count() > 1:
        raise ScanError("watch runs in one process; use scan under jax.distributed")
    total = ScanSummary(options.run or "", "")
    last_new = time.monotonic()
    listed: list[int] = []  # the committed steps at the last scan
    failed: set[int] = set()
    waiting_logged = False
    while True:
        source = open_source(options.source, allow_empty=True, mapping=options.mapping)
        try:
            steps = source.steps()
        finally:
            source.close()
        if steps and steps != listed:  # something new: scan what is neither done nor failed
            listed = steps
            summary = scan(dataclasses.replace(options, progress=False), skip_steps=failed)
            total.run, total.probe_hash, total.selected = summary.run, summary.probe_hash, summary.selected
            for step, error in summary.failures:
                log(f"watch: step {step} failed: {error}")
            failed.update(step for step, _ in summary.failures)
            if summary.scanned or summary.failed:
                last_new = time.monotonic()
                total.scanned += summary.scanned
                total.failed += summary.failed
                total.failures += summary.failures
                log(f"watch: scanned {summary.scanned} new checkpoint(s), {summary.failed} failed (latest step {steps[-1]})")
        elif not steps and not waiting_logged:
            log(f"watch: waiting for the first checkpoint in {options.source}")
            waiting_logged = True
        if until_step is not None and listed and listed[-1] >= until_step:
            log(f"watch: step {listed[-1]} >= {until_step} is committed and every committed step is scanned; stopping")
            return total
        if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
            log(f"watch: no new checkpoint for {idle_timeout:g} s; stopping")
            return total
        time.sleep(poll_seconds)


# --- progress ------------------------------------------------------------------------------


class _Progress:
    """Checkpoints/s and ETA: a bar on a terminal, a line per batch in logs."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.start = time.perf_counter()
        self.bar: Any = None
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="ckpt", desc="scan", dynamic_ncols=True)

    def update(self, n: int, last_step: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(step=last_step)
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"scan: {self.done}/{self.total} checkpoints (step {last_step}), {rate:.2f}/s, ETA {eta:.0f} s",
              file=sys.stderr)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
