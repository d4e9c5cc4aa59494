"""`jaxinduct bench`: what the scan program achieves on the devices present, against what they can do.

For people benchmarking accelerators (and for us, at the real shapes of DESIGN.md
"Scale"), on whatever devices JAX sees:

1. the device's float32 matmul peak (at HIGHEST precision, as the scan program runs its
   products) and its memory bandwidth, measured here;
2. each part of the scan program (the registry's score families) and the whole of it,
   compiled ahead of time for a batch of random checkpoints of the chosen shape: seconds,
   matmul FLOPs and bytes per checkpoint (counted from the compiled program,
   `jaxinduct.engine.cost`), the share of peak and bandwidth that makes, checkpoints per
   second and compile time;
3. the engine: a synthetic Orbax trajectory of that shape is written, then the bare load
   of one checkpoint, and a real `scan` of the trajectory at steady state, as a ratio to
   max(bare load, kernels alone): the engine's overhead (1.0 is perfect overlap).

Parts share intermediates (the repeated probe's forward serves the empirical scores and
the induction loss), so their seconds do not add up to the whole program's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinduct import parallel
from jaxinduct.checkpoints.hf_weights import spec_from_hf_config
from jaxinduct.engine import compile_cache
from jaxinduct.engine.cost import ProgramCost, compiled_cost
from jaxinduct.engine.scan import MeshFlag, ScanConfig, resolve_per_pass, scan
from jaxinduct.errors import JaxInductError
from jaxinduct.flags import NO_PREFIX, CommaSeparated, PerPass, default_is
from jaxinduct.model.weights import ModelSpec, Weights, init_random_weights
from jaxinduct.parallel import MeshConfig
from jaxinduct.scores import registry
from jaxinduct.scores.batched import compile_score_all
from jaxinduct.scores.probes import ProbeConfig, make_probes

# The GPT-NeoX shapes of the Pythia suite (DESIGN.md "Scale"): layers, heads, d_model;
# d_mlp is 4 d_model, the vocabulary 50304, rotary on a quarter of each head.
SHAPES: dict[str, tuple[int, int, int]] = {
    "pythia-70m": (6, 8, 512),
    "pythia-160m": (12, 12, 768),
    "pythia-410m": (24, 16, 1024),
    "pythia-1.4b": (24, 16, 2048),
    "pythia-6.9b": (32, 32, 4096),
    "pythia-12b": (36, 40, 5120),
}
PYTHIA_VOCAB = 50304


class BenchError(JaxInductError):
    """A bench option that cannot be honoured."""


def pythia_config(shape: str = "pythia-70m", **overrides: int | None) -> dict[str, Any]:
    """The Hugging Face config.json of a Pythia-shaped GPT-NeoX, with sizes overridden
    (layers, heads, d_model, d_mlp, vocab; None keeps the shape's)."""
    if shape not in SHAPES:
        raise BenchError(f"--shape {shape!r}: known shapes are {', '.join(SHAPES)} (or give --layers/--heads/--d-model)")
    layers, heads, d_model = SHAPES[shape]
    layers = overrides.get("layers") or layers
    heads = overrides.get("heads") or heads
    d_model = overrides.get("d_model") or d_model
    return {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": d_model,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": overrides.get("d_mlp") or 4 * d_model,
        "vocab_size": overrides.get("vocab") or PYTHIA_VOCAB, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False,
    }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Measure the scan program on the devices present: matmul peak, bandwidth, each part's
    seconds, FLOPs, bytes and share of peak per checkpoint, and the engine's overhead."""

    shape: str = "pythia-70m"
    """model shape: pythia-70m, pythia-160m, pythia-410m, pythia-1.4b, pythia-6.9b, pythia-12b"""
    layers: Annotated[int | None, default_is("the shape's")] = None
    heads: Annotated[int | None, default_is("the shape's")] = None
    d_model: Annotated[int | None, default_is("the shape's")] = None
    d_mlp: Annotated[int | None, default_is("4 x d_model")] = None
    vocab: Annotated[int | None, default_is(str(PYTHIA_VOCAB))] = None
    scores: Annotated[CommaSeparated, default_is("every score")] = None
    """the selection the whole program and the engine compute (parts stay whole families)"""
    probe: Annotated[ProbeConfig, NO_PREFIX] = ProbeConfig()
    batch: Annotated[int | None, default_is("one checkpoint per device of the mesh's ckpt axis")] = None
    """checkpoints per compiled call"""
    mesh: Annotated[MeshFlag, default_is("every device on the ckpt axis")] = MeshConfig()
    per_pass: PerPass = "auto"
    """checkpoints computed at once in a call, as `scan --per-pass`"""
    runs: int = 3
    """timed calls per part after a warm-up (the fastest is reported)"""
    parts: bool = True
    """time each score family apart, besides the whole program"""
    engine: bool = True
    """also write a synthetic trajectory and time the scan engine on it"""
    trajectory: int = 4
    """checkpoints of the synthetic trajectory (the first batch compiles; the rest are timed)"""
    dir: Annotated[str | None, default_is("a temporary directory, removed after")] = None
    """where to write (and keep) the synthetic trajectory; one already there is reused"""
    json: bool = False
    """print one JSON object instead of tables"""
    compilation_cache: Annotated[str | None, default_is(compile_cache.DEFAULT)] = None
    """as `scan --compilation-cache` (the engine's scan uses it)"""

    def __post_init__(self) -> None:
        if isinstance(self.mesh, str) or self.mesh is None:
            object.__setattr__(self, "mesh", MeshConfig.parse(self.mesh))
        for name in ("runs", "trajectory", "batch", "layers", "heads", "d_model", "d_mlp", "vocab"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise BenchError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        pythia_config(self.shape)  # an unknown shape fails here

    def spec(self) -> ModelSpec:
        sizes = dict(layers=self.layers, heads=self.heads, d_model=self.d_model, d_mlp=self.d_mlp, vocab=self.vocab)
        try:
            return spec_from_hf_config(pythia_config(self.shape, **sizes), source=f"--shape {self.shape}")
        except JaxInductError as e:
            raise BenchError(str(e)) from None


# --- what the devices can do ------------------------------------------------------------------


def _best_seconds(run: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(run())  # warm-up (and compile)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: jax.Device, repeats: int = 10) -> float:
    """FLOP/s of a square float32 matmul at HIGHEST precision on one device (the best of ``repeats``)."""
    n = 2048 if device.platform == "cpu" else 8192
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32)), device)
    product = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    return 2.0 * n**3 / _best_seconds(lambda: product(a), repeats)


def memory_bandwidth(device: jax.Device, repeats: int = 5) -> float:
    """Bytes/s of a streaming read-modify-write (x * 2 + 1) over an array far beyond the caches."""
    n = (256 if device.platform == "cpu" else 2048) * 2**20 // 4
    x = jax.device_put(jnp.ones((n,), jnp.float32), device)
    stream = jax.jit(lambda v: v * 2.0 + 1.0)
    return 2.0 * n * 4 / _best_seconds(lambda: stream(x), repeats)


# --- the scan program, part by part -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartResult:
    name: str
    scores: tuple[str, ...]
    seconds_per_checkpoint: float
    flops_per_checkpoint: float
    bytes_per_checkpoint: float
    eigenproblems_per_checkpoint: float
    compile_seconds: float
    compiled_from_disk: bool  # a persistent-cache hit: compile_seconds is a load
    share_of_peak: float
    share_of_bandwidth: float

    @property
    def checkpoints_per_second(self) -> float:
        return 1.0 / self.seconds_per_checkpoint if self.seconds_per_checkpoint > 0 else math.inf


def _parts(config: BenchConfig) -> list[tuple[str, tuple[str, ...] | None]]:
    whole = ("whole program" if config.scores is None else "selection", config.scores)
    if not config.parts:
        return [whole]
    families = []
    for family in registry.Family:
        if family == registry.Family.VERDICTS:  # derived from the others' scores
            continue
        names = tuple(dict.fromkeys(s.name for s in registry.scores() if s.family == family))
        if names:
            families.append((family.value, names))
    return [*families, whole]


def _random_batch(spec: ModelSpec, batch: int, mesh: Any) -> Weights:
    shardings = parallel.weight_shardings(spec, mesh)
    rows = parallel.local_rows(mesh, batch)
    local = [jax.tree.map(np.asarray, init_random_weights(spec, seed=row)) for row in rows]
    return parallel.place_batch(local, spec, shardings, batch)


def time_parts(config: BenchConfig, spec: ModelSpec, mesh: Any, peak: float, bandwidth: float) -> list[PartResult]:
    """Each part compiled ahead of time and timed on one batch of random checkpoints."""
    batch = _resolve_batch(config, mesh)
    per_pass = resolve_per_pass(config.per_pass, mesh)
    weights = _random_batch(spec, batch, mesh)
    probes = make_probes(spec, config.probe)
    devices = mesh.devices.size
    # CPU "devices" share one machine's cores, and one device's measurement already used them all.
    machines = 1 if mesh.devices.flat[0].platform == "cpu" else devices
    results = []
    for name, scores in _parts(config):
        program = compile_score_all(weights, probes, mesh=mesh, checkpoints_per_pass=per_pass, scores=scores)
        if not jax.tree.leaves(program.compiled.out_info):
            continue  # nothing this part computes without a dataset (ablation, icl_score)
        # Each device runs the same partitioned program on its share of the batch.
        cost: ProgramCost = compiled_cost(program.compiled).times(devices).per(batch)
        seconds = _best_seconds(lambda: program(weights), config.runs) / batch
        results.append(PartResult(
            name=name, scores=tuple(scores or registry.names()), seconds_per_checkpoint=seconds,
            flops_per_checkpoint=cost.flops, bytes_per_checkpoint=cost.bytes_accessed,
            eigenproblems_per_checkpoint=cost.eigenproblems, compile_seconds=program.compile_seconds,
            compiled_from_disk=program.from_disk,
            share_of_peak=cost.flops / seconds / (peak * machines),
            share_of_bandwidth=cost.bytes_accessed / seconds / (bandwidth * machines),
        ))  # fmt: skip
    return results


def _resolve_batch(config: BenchConfig, mesh: Any) -> int:
    ckpt = mesh.shape[parallel.CKPT]
    batch = config.batch or ckpt
    if batch % ckpt:
        raise BenchError(f"--batch {batch} must be a multiple of the mesh's ckpt axis ({ckpt} devices)")
    return batch


# --- the engine -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EngineResult:
    checkpoints: int
    bare_load_seconds: float  # one checkpoint restored to host memory, nothing else running
    kernels_seconds: float  # the whole program alone, per checkpoint (from the parts)
    scan_seconds: float  # per checkpoint, steady state (compile and first batch excluded)
    compile_seconds: float
    compiled_from_disk: bool
    directory: str

    @property
    def overhead(self) -> float:
        """scan / max(bare load, kernels): 1.0 when load and compute overlap perfectly."""
        return self.scan_seconds / max(self.bare_load_seconds, self.kernels_seconds)


def write_trajectory(directory: Path, spec: ModelSpec, n: int) -> list[int]:
    """N random checkpoints of ``spec`` as a canonical Orbax trajectory (steps 0, 1000, ...); reused if there."""
    from jaxinduct.checkpoints.layout import committed_steps, save_canonical_step, writer_lock, writer_manager

    steps = [1000 * i for i in range(n)]
    directory.mkdir(parents=True, exist_ok=True)
    have = set(committed_steps(directory)) if any(directory.iterdir()) else set()
    missing = [s for s in steps if s not in have]
    if missing:
        with writer_lock(directory):
            manager = writer_manager(directory)
            try:
                for step in missing:
                    save_canonical_step(manager, step, init_random_weights(spec, seed=step))
                manager.wait_until_finished()
            finally:
                manager.close()
    return steps


def time_engine(config: BenchConfig, spec: ModelSpec, mesh: Any, kernels_seconds: float, directory: Path) -> EngineResult:
    from jaxinduct.checkpoints import open_source

    batch = _resolve_batch(config, mesh)
    n = max(config.trajectory, 2 * batch)  # a compiling batch and at least one steady one
    steps = write_trajectory(directory, spec, n)
    source = open_source(str(directory))
    try:
        loads = []
        for step in steps[: min(3, n)]:
            start = time.perf_counter()
            source.load(step)
            loads.append(time.perf_counter() - start)
    finally:
        source.close()
    with tempfile.TemporaryDirectory() as work:
        summary = scan(ScanConfig(
            source=str(directory), store=str(Path(work) / "bench.sqlite"), scores=config.scores, probe=config.probe, batch=batch, mesh=config.mesh, per_pass=config.per_pass,
            progress=False, compilation_cache=config.compilation_cache,
        ))  # fmt: skip
    if summary.failed:
        raise BenchError(f"the bench's scan failed on {summary.failed} checkpoints: {summary.failures[:1]}")
    steady = summary.batch_seconds[1:]
    return EngineResult(
        checkpoints=n,
        bare_load_seconds=min(loads),
        kernels_seconds=kernels_seconds,
        scan_seconds=sum(steady) / (len(steady) * batch),
        compile_seconds=summary.compile_seconds,
        compiled_from_disk=summary.compiled_from_disk,
        directory=str(directory),
    )


# --- the command ------------------------------------------------------------------------------


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Every measurement of the bench, as the JSON object `--json` prints."""
    compile_cache.enable(config.compilation_cache)
    spec = config.spec()
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_head_axis(spec, mesh)
    device = mesh.devices.flat[0]
    peak, bandwidth = matmul_peak(device), memory_bandwidth(device)
    parts = time_parts(config, spec, mesh, peak, bandwidth)
    whole = parts[-1]
    engine = None
    if config.engine:
        if config.dir is not None:
            engine = time_engine(config, spec, mesh, whole.seconds_per_checkpoint, Path(config.dir).expanduser())
        else:
            with tempfile.TemporaryDirectory(prefix="jaxinduct-bench-") as tmp:
                engine = time_engine(config, spec, mesh, whole.seconds_per_checkpoint, Path(tmp))
    return {
        "device": {"platform": device.platform, "kind": device.device_kind, "count": int(mesh.devices.size),
                   "mesh": dict(mesh.shape), "jax": jax.__version__},
        "matmul_peak_flops_per_second": peak,
        "memory_bandwidth_bytes_per_second": bandwidth,
        "shape": {"name": config.shape, **spec.to_dict(), "parameters": _parameters(spec)},
        "probe": {"examples": config.probe.n_examples, "sequence": 1 + config.probe.block_len * config.probe.n_repeats},
        "batch": _resolve_batch(config, mesh),
        "parts": [{**dataclasses.asdict(p), "checkpoints_per_second": p.checkpoints_per_second} for p in parts],
        "engine": None if engine is None else {**dataclasses.asdict(engine), "overhead": engine.overhead},
    }  # fmt: skip


def _parameters(spec: ModelSpec) -> int:
    from jaxinduct.model.weights import expected_shapes

    return int(sum(math.prod(shape) for shape in expected_shapes(spec).values()))


def render(report: dict[str, Any]) -> str:
    device, shape = report["device"], report["shape"]
    peak, bandwidth = report["matmul_peak_flops_per_second"], report["memory_bandwidth_bytes_per_second"]
    lines = [
        f"devices: {device['count']} x {device['kind']} ({device['platform']}, mesh {device['mesh']}, jax {device['jax']})",
        f"per device: matmul peak {peak / 1e9:.0f} GFLOP/s (float32, HIGHEST precision), memory bandwidth {bandwidth / 1e9:.1f} GB/s",
        f"shape {shape['name']}: {shape['n_layers']} layers x {shape['n_heads']} heads, d_model {shape['d_model']}, "
        f"d_mlp {shape['d_mlp']}, vocabulary {shape['d_vocab']} ({shape['parameters'] / 1e6:.1f}M parameters); "
        f"probe {report['probe']['examples']} x {report['probe']['sequence']} tokens; {report['batch']} checkpoint(s) per call",
        "",
        f"{'part':16s} {'s/ckpt':>8s} {'ckpt/s':>8s} {'GFLOP/ckpt':>11s} {'GFLOP/s':>8s} {'of peak':>8s} "
        f"{'GB/ckpt':>8s} {'of bw':>6s} {'eig/ckpt':>9s} {'compile s':>9s}",
    ]  # fmt: skip
    for p in report["parts"]:
        lines.append(
            f"{p['name']:16s} {p['seconds_per_checkpoint']:8.3f} {p['checkpoints_per_second']:8.2f} "
            f"{p['flops_per_checkpoint'] / 1e9:11.1f} {p['flops_per_checkpoint'] / p['seconds_per_checkpoint'] / 1e9:8.0f} "
            f"{p['share_of_peak']:8.0%} {p['bytes_per_checkpoint'] / 1e9:8.2f} {p['share_of_bandwidth']:6.0%} "
            f"{p['eigenproblems_per_checkpoint']:9.0f} {p['compile_seconds']:9.1f}{' (cache)' if p['compiled_from_disk'] else ''}"
        )
    lines.append("(FLOPs: matrix products only; bytes: what each compiled unit reads and writes; both counted from "
                 "the compiled program, loops multiplied out; the bytes assume nothing stays in cache, so their share "
                 "can pass 100%. Parts share work, so they do not add up. "
                 "(cache): loaded from JAX's persistent compilation cache.)")  # fmt: skip
    engine = report["engine"]
    if engine is not None:
        lines += [
            "",
            f"engine, {engine['checkpoints']} synthetic checkpoints ({engine['directory']}): scan {engine['scan_seconds']:.3f} "
            f"s/ckpt at steady state; bare load {engine['bare_load_seconds']:.3f} s, kernels alone "
            f"{engine['kernels_seconds']:.3f} s -> overhead {engine['overhead']:.2f} x max(load, kernels); "
            f"compile {engine['compile_seconds']:.1f} s"
            f"{' (from the compilation cache)' if engine['compiled_from_disk'] else ' (0: compiled earlier in this process)' if engine['compile_seconds'] == 0 else ''}",
        ]  # fmt: skip
    return "\n".join(lines)


def bench_main(config: BenchConfig) -> int:
    report = run_bench(config)
    if jax.process_index() == 0:
        print(json.dumps(report, indent=2) if config.json else render(report))
        sys.stdout.flush()
    return 0
