"""Placement: the axis names, the device mesh, every sharding, and batches on and off the mesh.

Axis names are declared once, here, and used verbatim in jaxtyping annotations, in the
``Weights`` field metadata (`jaxinduct.model.weights.LEAF_AXES`), in PartitionSpecs and as
mesh axes. Einsum strings need single letters; they use s (seq), k (kv_seq), h (head),
d (d_model), e (d_head), m (d_mlp), v (d_vocab).

=========  ==========================================================
ckpt       checkpoints of a trajectory, stacked on a leading axis
layer      transformer blocks
head       attention heads of one layer
batch      independent examples fed to the forward pass
seq        query positions of a sequence
kv_seq     key positions of a sequence (attention patterns are [seq, kv_seq])
d_model    residual stream width
d_head     width of one head's query/key/value space
d_mlp      hidden width of an MLP block
d_vocab    vocabulary size
n_ctx      maximum context length (rows of the positional embedding)
=========  ==========================================================

The mesh has two axes, ``ckpt`` and ``head``. `AXIS_RULES` maps each logical axis to the
mesh axis it is sharded over (MaxText's logical axis rules: a new sharded axis is one
line); a logical axis it does not name is replicated. Every sharding of a weight leaf is
derived from the leaf's logical axes, never from a list of weight names.

Under ``jax.distributed`` (one process per host) each process holds the rows of a batch
that live on its own devices: `local_rows` says which, `place_batch` assembles the global
batch from process-local data and `gather_results` brings every row back to each process.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool

from jaxinduct.errors import JaxInductError
from jaxinduct.model.weights import LEAF_AXES, ModelSpec, Weights, expected_shapes, make_weights

CKPT, HEAD = "ckpt", "head"
MESH_AXES = (CKPT, HEAD)

# Logical axis -> mesh axis. A checkpoint stack's leading axis is sharded over ckpt; the
# model's wide axes (attention heads, the MLP's hidden units, the vocabulary) over the
# mesh's head axis, which is the model-parallel axis: on a mesh of N devices there, every
# per-layer matrix and the embedding and unembedding hold 1/N of their bytes per device
# (Pythia-12B is 48 GB in float32: it fits 16 GB chips only so). d_model, d_head, layers
# and positions are replicated (norms, biases and W_pos are small beside the rest).
AXIS_RULES: dict[str, str] = {CKPT: CKPT, HEAD: HEAD, "d_mlp": HEAD, "d_vocab": HEAD}


class PlacementError(JaxInductError):
    """A mesh does not fit the devices present, the model or the batch."""


# --- the mesh ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis: ``ckpt`` x ``head`` must be the number of devices present.

    ckpt None: every device not on the head axis. Written ``ckpt=N,head=M`` on the command
    line (either part may be left out).
    """

    ckpt: int | None = None
    head: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PlacementError(f"mesh {name}={value!r}: mesh axis sizes are positive integers")

    @classmethod
    def parse(cls, text: str | None) -> MeshConfig:
        """``"ckpt=N,head=M"`` (either may be left out, ckpt may be ``auto``; empty or None: the default)."""
        sizes: dict[str, int | None] = {}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            name, _, value = part.partition("=")
            name = name.strip()
            value = value.strip()
            if name == CKPT and value == "auto" and name not in sizes:
                sizes[name] = None
                continue
            if name not in MESH_AXES or not re.fullmatch(r"\d+", value) or int(value) < 1 or name in sizes:
                raise PlacementError(
                    f"--mesh {text!r}: expected 'ckpt=N,head=M' with positive integers (e.g. ckpt=4,head=2)"
                )
            sizes[name] = int(value)
        return cls(**sizes)

    def __str__(self) -> str:
        ckpt = "auto" if self.ckpt is None else str(self.ckpt)
        return f"ckpt={ckpt},head={self.head}"


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (ckpt, head) Mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    head = config.head
    ckpt = config.ckpt if config.ckpt is not None else len(devices) // head
    if ckpt < 1 or ckpt * head != len(devices):
        raise PlacementError(
            f"--mesh {str(config)!r} needs ckpt x head = {ckpt} x {head} = {ckpt * head} devices, but "
            f"{len(devices)} are present ({devices[0].platform}); choose sizes whose product is {len(devices)}"
        )
    # jax.devices() is ordered by process, so each process's devices are consecutive rows.
    return Mesh(np.array(devices).reshape(ckpt, head), MESH_AXES)


def parse_mesh(text: str | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh` from the ``ckpt=N,head=M`` text form."""
    return make_mesh(MeshConfig.parse(text), devices)


def platform(mesh: Mesh) -> str:
    """The mesh's device platform: cpu, gpu/cuda/rocm or tpu."""
    return mesh.devices.flat[0].platform


def check_head_axis(spec: ModelSpec, mesh: Mesh) -> None:
    if spec.n_heads % mesh.shape[HEAD]:
        raise PlacementError(
            f"--mesh head={mesh.shape[HEAD]} does not divide the model's {spec.n_heads} heads; "
            "use a head axis size that divides it (or 1)"
        )


# --- shardings of weights --------------------------------------------------------------------


def logical_partition(axes: Sequence[str], shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes, by `AXIS_RULES`.

    With its ``shape`` and ``mesh``, an axis whose size the mesh axis does not divide (GPT-2's
    50257-token vocabulary on 2 devices) is replicated instead: JAX places only even shards.
    """
    parts = []
    for i, axis in enumerate(axes):
        target = AXIS_RULES.get(axis)
        if target is not None and shape is not None and mesh is not None and shape[i] % mesh.shape[target]:
            target = None
        parts.append(target)
    return PartitionSpec(*parts)


def weight_shardings(spec: ModelSpec, mesh: Mesh, batch: int | None = None) -> dict[str, NamedSharding]:
    """NamedSharding per leaf of ckpt-stacked Weights, from each leaf's logical axes (an axis
    the mesh does not divide evenly replicated: `logical_partition`). ``batch``: the stack's
    ckpt size, checked the same way; None: a multiple of the ckpt axis, as the engine's are."""
    ckpt = mesh.shape[CKPT] if batch is None else batch
    return {
        name: NamedSharding(mesh, logical_partition((CKPT, *LEAF_AXES[name]), (ckpt, *shape), mesh))
        for name, shape in expected_shapes(spec).items()
    }


# --- moving batches on and off the mesh ------------------------------------------------------


def local_rows(mesh: Mesh, batch: int) -> list[int]:
    """The rows of a K-batch that live on this process's devices (contiguous, ascending)."""
    per_device = batch // mesh.shape[CKPT]
    me = jax.process_index()
    rows = [r for r in range(batch) if mesh.devices[r // per_device, 0].process_index == me]
    if rows and rows != list(range(rows[0], rows[-1] + 1)):
        raise PlacementError("this process's devices are not consecutive on the mesh's ckpt axis")
    return rows


def place_batch(local: Sequence[Weights], spec: ModelSpec, shardings: dict[str, NamedSharding], batch: int) -> Weights:
    """Assemble the global [K, ...] batch on the mesh from this process's rows (``local``: the
    rows `local_rows` names, in order).

    shardings: `weight_shardings(spec, mesh)`, computed once per scan. Each leaf keeps its
    dtype (float16 checkpoints are moved as float16; the program widens them). A device
    that holds one row gets a view of that row's host array, never a stacked copy: on the
    CPU backend the placed array then shares the restored checkpoint's memory (JAX places
    an aligned numpy array without copying), so a batch costs its checkpoints once.
    """
    first = local_rows(mesh_of_shardings(shardings), batch)[0] if local else 0
    arrays = {}
    for name, shape in expected_shapes(spec).items():
        rows = [np.asarray(getattr(w, name)) for w in local]

        def block(index: tuple[slice, ...], rows: list[np.ndarray] = rows) -> np.ndarray:
            start, stop, _ = index[0].indices(batch)
            if stop - start == 1:
                return rows[start - first][None][(slice(None), *index[1:])]
            return np.stack([rows[r - first][index[1:]] for r in range(start, stop)])

        arrays[name] = jax.make_array_from_callback((batch, *shape), shardings[name], block)
    return make_weights(spec, arrays, batch_dims=1)


def mesh_of_shardings(shardings: dict[str, NamedSharding]) -> Mesh:
    return next(iter(shardings.values())).mesh


def gather_flags(local_ok: np.ndarray, batch: int) -> np.ndarray:
    """Every process's per-row flags of a batch, on every process (host numpy)."""
    if jax.process_count() == 1:
        out = np.zeros(batch, bool)
        out[: len(local_ok)] = local_ok
        return out
    return np.asarray(multihost_utils.process_allgather(local_ok, tiled=True)).reshape(batch)


def gather_results(results: Any) -> Any:
    """Every process's rows of a pytree of results, as host numpy arrays."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, jax.device_get(results))
    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(results, tiled=True))


def broadcast_steps(steps: list[int] | None) -> list[int]:
    """Process 0's list of steps, on every process."""
    if jax.process_count() == 1:
        assert steps is not None
        return steps
    count = multihost_utils.broadcast_one_to_all(np.array(len(steps or []), np.int64))
    padded = np.zeros(int(count), np.int64)
    if steps:
        padded[:] = steps
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


# --- each device scores its own checkpoints ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointParallel:
    """How a computation over a ckpt-sharded stack is split: shard_map over ``manual`` axes."""

    mesh: Mesh
    manual: frozenset[str]


def mesh_of(weights: Weights) -> Mesh | None:
    """The mesh ``weights`` are placed on (a NamedSharding's), or None for unplaced arrays."""
    sharding = getattr(weights.W_E, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def checkpoint_parallel(mesh: Mesh | None) -> CheckpointParallel | None:
    """How each device scores its own checkpoints on ``mesh``; None when the ckpt axis has
    one device (or there is no mesh) and the computation runs as one program.

    Every mesh axis is manual unless another axis (head) has several devices on a GPU,
    where the head axis stays with the partitioner (jnp.linalg.eigvals partitions by
    gathering, which GPU collectives handle). On CPU a head axis is then replicated: each
    device scores whole checkpoints (a CPU has no memory limit that head sharding would
    lift). On TPU, whose eigenvalue host callback needs every axis manual, a head axis
    leaves the program to the partitioner.
    """
    if mesh is None or CKPT not in mesh.shape or mesh.shape[CKPT] == 1:
        return None
    if all(size == 1 for name, size in mesh.shape.items() if name != CKPT):
        return CheckpointParallel(mesh, frozenset(mesh.axis_names))
    kind = platform(mesh)
    if kind in ("gpu", "cuda", "rocm"):
        return CheckpointParallel(mesh, frozenset({CKPT}))
    if kind == "cpu":
        return CheckpointParallel(mesh, frozenset(mesh.axis_names))
    return None


def per_device(fn: Callable[..., Any], parallel: CheckpointParallel, n_sharded: int, n_replicated: int) -> Callable[..., Any]:
    """``fn`` run by each device on its own rows of the ckpt axis: no collective on that axis.

    Checkpoints are independent, but left to the SPMD partitioner the program is not:
    the eigenvalue step (a LAPACK call or a host callback, neither partitionable) and a
    chunked lax.map over a sharded axis are gathered across devices, and on jaxlib
    0.10's CPU runtime those collectives deadlock next to the rest of the program (the
    quickstart model on 2 CPU devices hangs; tests/test_cpu_runtime.py). shard_map makes
    the ckpt axis manual, so each device runs the per-checkpoint program on its slice.

    ``fn`` takes ``n_sharded`` pytrees with a leading ckpt axis, then ``n_replicated``
    pytrees that every device sees whole; its outputs have a leading ckpt axis.
    """

    def call(*args: Any) -> Any:
        specs = tuple(
            jax.tree.map(lambda _: PartitionSpec(CKPT) if i < n_sharded else PartitionSpec(), arg)
            for i, arg in enumerate(args)
        )
        assert len(args) == n_sharded + n_replicated
        mapped = jax.shard_map(
            fn, mesh=parallel.mesh, in_specs=specs, out_specs=PartitionSpec(CKPT), axis_names=parallel.manual,
            check_vma=False,
        )  # fmt: skip
        return mapped(*args)

    return functools.wraps(fn)(call)


def place_flags(valid: Array | np.ndarray, n_checkpoints: int, parallel: CheckpointParallel | None) -> Bool[Array, " ckpt"]:
    """Per-checkpoint flags as an array placed like the ckpt axis of a stack scored per device
    as ``parallel`` says (`checkpoint_parallel`); None: one program, flags on the default device."""
    if not isinstance(valid, jax.Array):
        valid = np.asarray(valid, bool)
    if valid.shape != (n_checkpoints,):
        raise ValueError(f"valid must have shape ({n_checkpoints},), one flag per checkpoint; got shape {valid.shape}")
    if isinstance(valid, jax.Array):
        return valid.astype(bool)
    if parallel is None:
        return jax.numpy.asarray(valid)
    # Host flags placed like the ckpt axis: a global array, so that it works across processes too.
    host = valid
    return jax.make_array_from_callback(host.shape, NamedSharding(parallel.mesh, PartitionSpec(CKPT)), lambda i: host[i])
