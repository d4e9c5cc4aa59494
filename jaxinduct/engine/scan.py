"""The scan engine: every score of every checkpoint of a trajectory, into the store.

Data flow (DESIGN.md: discovery -> adapter -> batcher -> placement -> kernels -> store):

1. discovery: the source's committed steps, the ``--steps`` selection, minus the steps
   the store already holds for this (run, probe hash): a rescan or a resumed scan only
   computes what is missing;
2. batcher (`jaxinduct.engine.loader`): K checkpoints per batch, restored by a thread
   pool while the previous batch computes, padded to K (always K, so that the kernels
   compile once per (model shape, K, mesh)); a validity mask marks the real rows;
3. placement (`jaxinduct.parallel`): stacked on a leading ckpt axis and placed on the
   (ckpt, head) mesh, each leaf sharded as its logical axes say;
4. kernels: `score_all` (one jit + vmap), computing only the selected scores;
5. store: one transaction per batch (process 0 only); after the last, the run's phase
   change is detected again from everything stored (`jaxinduct.results.phase`).

Under ``jax.distributed`` (several processes, one per host), each process restores only
the rows of a batch that live on its own devices, the global batch is assembled from
process-local data and the results gathered (`jaxinduct.parallel`), and process 0 alone
opens and writes the store. `ScanConfig` is both this engine's input and the `jaxinduct
scan` command's config (`jaxinduct.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxinduct import parallel
from jaxinduct.checkpoints import CheckpointSource, open_source
from jaxinduct.checkpoints.selection import ALL_STEPS, StepSelection
from jaxinduct.engine import compile_cache
from jaxinduct.engine.loader import (
    LOAD_WORKERS_DEFAULT,
    RestoreGate,
    batches,
    prefetched,
    resolve_load_workers,
    restore,
    restores_needed,
)
from jaxinduct.engine.memory import CPU_BATCH_BYTES, CPU_PREFETCH_BYTES, MemoryPlan, checkpoint_nbytes, memory_budget, plan_batch
from jaxinduct.errors import JaxInductError
from jaxinduct.flags import NO_PREFIX, CommaSeparated, PerPass, SourcePath, StepsFlag, comma_separated, default_is, one_word
from jaxinduct.model.weights import (
    ModelSpec,
    Weights,
    abstract_weights,
    expected_shapes,
    host_zeros,
    shapes_and_dtypes,
    zero_weights,
)
from jaxinduct.parallel import MeshConfig, broadcast_steps
from jaxinduct.results.identity import identity_record
from jaxinduct.results.phase import DetectionConfig, update_phase_change
from jaxinduct.results.store import CheckpointScores, ResultStore
from jaxinduct.scores import registry
from jaxinduct.scores.batched import ScoreProgram, ScoreResults, compile_score_all
from jaxinduct.scores.probes import ProbeConfig, Probes, make_probes

DEFAULT_BATCH = 8


class ScanError(JaxInductError):
    """A scan's options do not fit the source, the devices or each other."""


# --- options -------------------------------------------------------------------------------


MeshFlag = one_word(MeshConfig, "ckpt=N,head=M")


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Score the selected checkpoints of SOURCE (batched, compiled once) into --store.

    Resumable: checkpoints already in the store for the same probes are skipped. This is
    the `jaxinduct scan` command's config and the Python API's: every flag is a field.
    """

    source: SourcePath
    """an Orbax CheckpointManager directory, a Hugging Face model directory or one of its revisions"""
    store: str
    """results store (SQLite file; created if missing)"""
    run: Annotated[str | None, default_is("the SOURCE directory's name")] = None
    """run name in the store"""
    steps: StepsFlag = ALL_STEPS
    """which committed steps: all | latest | N | A:B | A:B:S | every:N, comma-separated"""
    scores: Annotated[CommaSeparated, default_is("every score")] = None
    """score names to compute and keep, comma-separated (`jaxinduct scores` lists them)"""
    dataset: str | None = None
    """.npy token ids [example, seq] for icl_score, per_token_loss and ablation"""
    batch: Annotated[int | None, default_is(f"the largest up to {DEFAULT_BATCH} (a multiple of the ckpt axis) that fits memory and the work")] = None
    """checkpoints per batch, a multiple of the mesh's ckpt axis"""
    mesh: Annotated[MeshFlag, default_is("every device on the ckpt axis")] = MeshConfig()
    """device mesh"""
    probe: Annotated[ProbeConfig, NO_PREFIX] = ProbeConfig()
    load_workers: Annotated[int | None, default_is(LOAD_WORKERS_DEFAULT)] = None
    """threads restoring checkpoints, at most (how many run at once follows measured restore and compute times)"""
    per_pass: PerPass = "auto"
    """checkpoints computed at once in a batch's compiled pass: N, all, or auto (1 on CPU, all elsewhere)"""
    # auto: on CPU, vmapping small per-checkpoint matmuls is slower than one at a time
    # (bench/score_throughput.py); accelerators have the memory to take the whole batch.
    progress: bool = True
    """show progress"""
    mapping: str | None = None
    """YAML mapping of someone else's Orbax params tree to canonical names (docs/mappings/)"""
    compilation_cache: Annotated[str | None, default_is(compile_cache.DEFAULT)] = None
    """directory of JAX's persistent compilation cache, or 'off' (a second scan of a shape loads its program)"""

    def __post_init__(self) -> None:
        # The Python API may spell the mesh, steps and scores as on the command line.
        if self.mesh is None or isinstance(self.mesh, str):
            object.__setattr__(self, "mesh", MeshConfig.parse(self.mesh))
        if isinstance(self.steps, str):
            object.__setattr__(self, "steps", StepSelection.parse(self.steps))
        if isinstance(self.scores, str):
            object.__setattr__(self, "scores", comma_separated(self.scores))
        elif self.scores is not None:
            object.__setattr__(self, "scores", tuple(self.scores))
        if self.per_pass is None:  # the Python API's older spelling of "all"
            object.__setattr__(self, "per_pass", "all")
        # Refused here, where the config is made (a flag, a YAML file), not later in the scan.
        _check_score_names(self.scores)
        _check_positive("--batch", self.batch)
        _check_positive("--load-workers", self.load_workers)
        if self.per_pass not in ("auto", "all"):
            _check_positive("--per-pass", self.per_pass, "a positive integer, 'auto' or 'all'")


def _check_positive(flag: str, value: object, what: str = "a positive integer") -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ScanError(f"{flag} must be {what}, got {value!r}")


def _check_score_names(scores: tuple[str, ...] | None) -> None:
    unknown = sorted(set(scores or ()) - set(registry.names()))
    if unknown:
        known = ", ".join(sorted(registry.names()))
        raise ScanError(f"--scores: unknown score names {unknown}; known: {known} (`jaxinduct scores` lists them)")


@dataclasses.dataclass
class ScanSummary:
    run: str
    probe_hash: str
    selected: int = 0
    already_done: int = 0
    scanned: int = 0
    failed: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0  # compiling the scan program (0: this process had compiled it)
    compiled_from_disk: bool = False  # the program came from JAX's persistent compilation cache
    failures: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    # Wall time of each batch, compile excluded: from the previous batch's end (waiting for
    # its restores included) to this one's results stored.
    batch_seconds: list[float] = dataclasses.field(default_factory=list)
    phase_change: str | None = None  # the run's detected phase change after this scan, described
    memory: str | None = None  # the memory plan, described: batch, per pass, peak bytes within the budget
    memory_plan: MemoryPlan | None = None

    def describe(self) -> str:
        lines = [
            f"run {self.run!r} (probe hash {self.probe_hash}): {self.selected} checkpoints selected, "
            f"{self.already_done} already in the store, {self.scanned} scanned, {self.failed} failed",
        ]
        if self.scanned or self.failed:
            computing = self.seconds - self.compile_seconds
            rate = (self.scanned + self.failed) / computing if computing > 0 else float("nan")
            compiled = "compiled before" if self.compile_seconds == 0 else f"compile {self.compile_seconds:.1f} s"
            compiled += " from the compilation cache" if self.compiled_from_disk else ""
            lines.append(f"{self.seconds:.1f} s ({compiled}, then {rate:.2f} checkpoints/s)")
            if self.memory is not None:
                lines.append(f"memory: {self.memory}")
        else:
            lines.append("nothing to scan: every selected checkpoint is already in the store")
        lines += [f"  step {step} failed: {error.splitlines()[0]}" for step, error in self.failures[:5]]
        if self.phase_change is not None:
            lines.append(f"phase change: {self.phase_change}")
        return "\n".join(lines)


def resolve_batch(batch: int | None, mesh: Mesh) -> int:
    ckpt = mesh.shape[parallel.CKPT]
    if batch is None:
        return ckpt * -(-DEFAULT_BATCH // ckpt)
    if batch < 1 or batch % ckpt:
        raise ScanError(f"--batch {batch} must be a positive multiple of the mesh's ckpt axis ({ckpt} devices)")
    return batch


def resolve_per_pass(per_pass: PerPass | None, mesh: Mesh) -> int | None:
    """score_all's checkpoints_per_pass for a --per-pass value (None: the whole batch)."""
    if per_pass == "auto":
        return 1 if parallel.platform(mesh) == "cpu" else None
    if per_pass is None or per_pass == "all":
        return None
    _check_positive("--per-pass", per_pass, "a positive integer, 'auto' or 'all'")
    return per_pass


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
    """(hash, JSON) identifying the results (`jaxinduct.results.identity`): the probes, which
    scores are kept and, for a source read through a mapping, the mapping's digest."""
    config = dataclasses.asdict(probes.config)
    return identity_record(config, probes.config_hash(), scores, registry.SCORES_VERSION, mapping_digest)


def checkpoint_scores(results: ScoreResults, row: int, step: int, tokens_seen: int | None, seconds: float) -> CheckpointScores:
    """One row of the batch results, in the store's unit."""
    pick = lambda group: {name: values[row] for name, values in group.items()}  # noqa: E731
    return CheckpointScores(
        step=step,
        tokens_seen=tokens_seen,
        seconds=seconds,
        head=pick(results.head),
        pair=pick(results.pair),
        model={name: float(value) for name, value in pick(results.model).items()},
        curve={**pick(results.curve), **pick(results.head_curve)},
    )


def plan_memory(plan: _Prepared, options: ScanConfig) -> MemoryPlan:
    """The batch and checkpoints per pass to scan with (`jaxinduct.engine.memory`): --batch
    checked against the memory there is, or the largest batch up to the default that fits.

    One checkpoint is read first for its stored dtypes and bytes (the scan reads it again in
    its batch); when it cannot be read, float32 is assumed, the larger.
    """
    spec, mesh = plan.spec, plan.mesh
    first = restore(plan.source, plan.todo[0]).checkpoint
    weights = first.weights if first is not None else zero_weights(spec)
    dtypes = {name: np.asarray(getattr(weights, name)).dtype for name in expected_shapes(spec)}
    shardings = parallel.weight_shardings(spec, mesh)
    seconds: list[float] = []

    def compile_for(batch: int, per_pass: int | None) -> ScoreProgram:
        abstract = Weights(spec=spec, **{
            name: jax.ShapeDtypeStruct((batch, *shape), dtypes[name], sharding=shardings[name])
            for name, shape in expected_shapes(spec).items()
        })  # fmt: skip
        program = compile_score_all(abstract, plan.probes, mesh=mesh, scores=options.scores,
                                    checkpoints_per_pass=per_pass, valid=np.ones(batch, bool))  # fmt: skip
        seconds.append(program.compile_seconds)
        return program

    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    budget = memory_budget(local)
    batch, ckpt, nbytes = plan.batch, mesh.shape[parallel.CKPT], checkpoint_nbytes(weights)
    if options.batch is None:  # the default batch: no bigger than the work (2 checkpoints are not padded to 8) ...
        batch = min(batch, ckpt * max(1, -(-len(plan.todo) // ckpt)))
        if budget.device_bytes is None:  # ... and on CPU, CPU_BATCH_BYTES per device
            batch = min(batch, ckpt * max(1, CPU_BATCH_BYTES // max(nbytes, 1)))
    settings = dict(
        step=ckpt, per_pass=plan.per_pass, per_pass_given=options.per_pass != "auto",
        checkpoint_bytes=nbytes, rows_for=lambda b: len(parallel.local_rows(mesh, b)),
        budget=budget, local_devices=len(local), head_devices=mesh.shape[parallel.HEAD],
        ahead=budget.device_bytes is not None or nbytes <= CPU_PREFETCH_BYTES,
    )  # fmt: skip
    memory = plan_batch(compile_for, batch=batch, batch_given=options.batch is not None, **settings)
    if jax.process_count() > 1:  # every process must run the same program: the smallest batch planned
        smallest = int(np.min(multihost_utils.process_allgather(np.array(memory.batch))))
        if smallest != memory.batch:
            memory = plan_batch(compile_for, batch=smallest, batch_given=True, **settings)
    return dataclasses.replace(memory, compile_seconds=sum(seconds))


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
    per_pass: int | None = None
    memory: MemoryPlan | None = None  # planned once the checkpoints to scan are known


def _probe_config_for(options: ScanConfig) -> ProbeConfig:
    # Ablation is the one costly group: compute it only when asked for (or by default).
    if options.scores and not any(score.family == registry.Family.ABLATION for score in registry.select(options.scores)):
        return dataclasses.replace(options.probe, ablation=False)
    return options.probe


def prepare(options: ScanConfig) -> tuple[_Prepared, Callable[[], ResultStore | None]]:
    """Validate every option before the store is touched; return the plan and a store opener."""
    source = open_source(options.source, mapping=options.mapping)  # refuses a source with no committed step
    compile_cache.enable(options.compilation_cache)
    mesh = parallel.make_mesh(options.mesh)
    batch = resolve_batch(options.batch, mesh)
    resolve_load_workers(options.load_workers, mesh)
    dataset = load_dataset(options.dataset)
    available = source.steps()
    spec = source.spec(available[0])  # each listing of a large directory costs: list once
    selected = options.steps.select(available)
    parallel.check_head_axis(spec, mesh)
    probes = make_probes(spec, _probe_config_for(options), dataset=dataset)
    mapping = getattr(source, "mapping", None)  # a corrected mapping must not read as already scanned
    probe_hash, probe_json = probe_identity(probes, options.scores, None if mapping is None else mapping.digest())
    run = options.run or Path(options.source).expanduser().resolve().name

    def open_store() -> ResultStore | None:
        return ResultStore.open(options.store) if jax.process_index() == 0 else None

    per_pass = resolve_per_pass(options.per_pass, mesh)
    plan = _Prepared(source, spec, run, selected, len(selected), 0, probes, probe_hash, probe_json, mesh, batch, per_pass)
    return plan, open_store


def scan(
    options: ScanConfig,
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
            done = store.done_steps(plan.run, plan.probe_hash)
            todo = [s for s in plan.todo if s not in done and s not in skip_steps]
        plan.todo = broadcast_steps(todo)
        plan.already_done = plan.selected - len(plan.todo)
        if plan.todo:  # a batch that cannot fit is refused here, before the store is written
            plan.memory = plan_memory(plan, options)
            plan.batch, plan.per_pass = plan.memory.batch, plan.memory.per_pass
        if store is not None:
            store.ensure_run(plan.run, plan.source.description, json.dumps(plan.spec.to_dict(), sort_keys=True))
            store.record_probe_config(plan.probe_hash, plan.probe_json)
        summary = _run_batches(plan, store, options, on_batch)
        if store is not None:
            # After the batches, in its own transaction: a kill before it leaves the previous
            # detection in place, and the next scan (or watch poll) redoes it.
            # With the run's own verdict threshold, as every reader detects it (`results.run_view`).
            detection = DetectionConfig(formed_prefix=plan.probes.config.thresholds.prefix_matching)
            found = update_phase_change(store, plan.run, plan.probe_hash, detection)
            summary.phase_change = "none found" if found is None else found.describe()
        return summary
    finally:
        plan.source.close()
        if store is not None:
            store.close()


def _run_batches(
    plan: _Prepared, store: ResultStore | None, options: ScanConfig, on_batch: Callable[[list[int]], None] | None
) -> ScanSummary:
    summary = ScanSummary(plan.run, plan.probe_hash, plan.selected, plan.already_done)
    per_pass = plan.per_pass
    if plan.memory is not None:  # the planner compiled the program: its compile time is the scan's
        summary.compile_seconds = plan.memory.compile_seconds
        summary.compiled_from_disk = plan.memory.program.from_disk
        summary.memory, summary.memory_plan = plan.memory.describe(), plan.memory
    rows = parallel.local_rows(plan.mesh, plan.batch)
    like = abstract_weights(plan.spec)  # a padding row's shapes and dtypes: float32 until a checkpoint is read
    shardings = parallel.weight_shardings(plan.spec, plan.mesh)
    progress = _Progress(len(plan.todo), enabled=options.progress and jax.process_index() == 0)
    started = time.perf_counter()
    workers = resolve_load_workers(options.load_workers, plan.mesh)
    writer = _BatchWriter(store, on_batch)
    try:
        gate = RestoreGate(workers)  # concurrent restores: from measured times after each batch
        batch_start = time.perf_counter()
        ahead = plan.memory is None or plan.memory.ahead
        for steps, restored in prefetched(plan.source, batches(plan.todo, plan.batch), rows, workers, gate, ahead=ahead):
            loaded = {r: got.checkpoint for r, got in restored.items() if got.checkpoint is not None}
            if loaded:  # padding rows in the run's own dtypes, so they do not widen a float16 stack
                # Shapes and dtypes only: holding the checkpoint itself would keep it in memory
                # through the next batch (2.8 GB at Pythia-1.4B's size).
                like = shapes_and_dtypes(next(iter(loaded.values())).weights)
            padding = host_zeros(like) if len(loaded) < len(rows) else None
            ok = parallel.gather_flags(np.array([r in loaded for r in rows], bool), plan.batch)
            placed = parallel.place_batch([loaded[r].weights if r in loaded else padding for r in rows], plan.spec,
                                          shardings, plan.batch)  # fmt: skip
            tokens_seen = {r: checkpoint.tokens_seen for r, checkpoint in loaded.items()}
            # Drop the host copies (the prefetcher shares this dict): from here on only the placed
            # batch and the next batch's restores are held, as the memory plan counts them.
            for r, got in restored.items():
                restored[r] = dataclasses.replace(got, checkpoint=None)
            del loaded, padding
            # Memoised by shape and dtype: compiled for the first batch, and again only for a
            # batch whose dtypes differ (a trajectory saved in float32 at step 0, float16 later).
            program = compile_score_all(
                placed, plan.probes, mesh=plan.mesh, scores=options.scores, checkpoints_per_pass=per_pass, valid=ok
            )
            compiling = program.compile_seconds
            summary.compile_seconds += compiling
            summary.compiled_from_disk |= program.from_disk
            compute_start = time.perf_counter()
            # Rows without a checkpoint (padding, failed restores) are skipped, not scored.
            results = parallel.gather_results(program(placed, ok))
            del placed
            compute = time.perf_counter() - compute_start
            restore_times = [got.seconds for got in restored.values()]
            if restore_times:
                gate.set_limit(restores_needed(len(rows), sum(restore_times) / len(restore_times), compute, workers))
            records, failures = [], []
            for row, step in enumerate(steps):
                got = restored.get(row)
                if ok[row]:
                    tokens = tokens_seen.get(row)
                    seconds = (got.seconds if got is not None else 0.0) + compute / len(steps)
                    records.append(checkpoint_scores(results, row, step, tokens, seconds))
                else:
                    error = got.error if got is not None else "restore failed on another process (see its log)"
                    failures.append((step, error or "unknown error"))
            # The batch is written (one transaction) on the writer thread while the next computes.
            writer.submit(lambda store, r=records, f=failures: _write(store, plan, r, f), steps)
            summary.scanned += len(records)
            summary.failed += len(failures)
            summary.failures += failures
            now = time.perf_counter()
            summary.batch_seconds.append(now - batch_start - compiling)
            batch_start = now
            progress.update(len(steps), steps[-1])
    except BaseException:
        writer.abandon()
        raise
    writer.close()
    progress.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _write(store: ResultStore, plan: _Prepared, records: list[CheckpointScores], failures: list[tuple[int, str]]) -> None:
    store.write_batch(plan.run, plan.probe_hash, records)
    for step, error in failures:
        store.mark_failed(plan.run, plan.probe_hash, step, error)


class _BatchWriter:
    """Writes each batch into the store on one background thread, in order, overlapping the
    next batch's restore and compute.

    At most one write is in flight: `submit` first waits for the previous one, so memory
    stays bounded and a write error (a full disk) stops the scan one batch later at most.
    Each write is still one transaction: a batch is all or nothing. ``on_batch`` is called
    in the caller's thread once a batch is stored. Without a store (not process 0) nothing
    is written and ``on_batch`` is called at once.
    """

    def __init__(self, store: ResultStore | None, on_batch: Callable[[list[int]], None] | None) -> None:
        self._store, self._on_batch = store, on_batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") if store is not None else None
        self._pending: tuple[Future[None], list[int]] | None = None

    def submit(self, write: Callable[[ResultStore], None], steps: list[int]) -> None:
        self._wait()
        if self._pool is None or self._store is None:
            self._done(steps)
            return
        self._pending = (self._pool.submit(write, self._store), steps)

    def _wait(self) -> None:
        if self._pending is not None:
            future, steps = self._pending
            self._pending = None
            future.result()  # the writer's exception, if any, is raised here
            self._done(steps)

    def _done(self, steps: list[int]) -> None:
        if self._on_batch is not None:
            self._on_batch(steps)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """After an error elsewhere: let the write in flight finish (or roll back) on its own."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


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
