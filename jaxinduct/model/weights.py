"""Canonical weights: the one representation every source is converted into.

`Weights` is a frozen pytree dataclass whose array leaves use TransformerLens
names and layouts with the layers stacked on a leading ``layer`` axis. Everything
that is not an array (sizes, positional scheme, norm, activation, ...) lives in
`ModelSpec`, a hashable static field, so that `jax.jit` specialises on it instead
of tracing it. A stack of checkpoints is the same type with one more leading
``ckpt`` axis on every leaf (see `stack_weights`).

Leaves that an architecture does not have are ``None`` (an empty pytree node), so
that e.g. a rotary model has ``W_pos=None`` and an attention-only model has
``W_in=None``. Attention biases are always present (zeros when the source has
none) so that every imported model goes through the same forward pass.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxinduct.errors import SpecError


class PositionalScheme(enum.StrEnum):
    """How a model knows positions.

    none: no positional information (causal masking alone).
    learned: W_pos added to the residual stream after the embedding (GPT-2).
    shortformer: W_pos added to the (normalised) query and key inputs of every
        attention layer, never to the residual stream or the values.
    rotary: rotary embeddings on the first ``rotary_dim`` dimensions of each
        query and key, GPT-NeoX style (halves rotated, not adjacent pairs).
    """

    NONE = "none"
    LEARNED = "learned"
    SHORTFORMER = "shortformer"
    ROTARY = "rotary"


class NormKind(enum.StrEnum):
    NONE = "none"
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


class Activation(enum.StrEnum):
    """MLP nonlinearities. gelu_new is the tanh approximation (GPT-2); gelu is exact."""

    GELU = "gelu"
    GELU_NEW = "gelu_new"
    RELU = "relu"
    SILU = "silu"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of an architecture. Hashable; never traced."""

    d_vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    n_ctx: int
    d_mlp: int | None = None  # None: attention-only
    positional: PositionalScheme = PositionalScheme.LEARNED
    rotary_dim: int | None = None  # rotary only; defaults to d_head
    rotary_base: float = 10000.0
    norm: NormKind = NormKind.LAYERNORM
    norm_eps: float = 1e-5
    parallel_attn_mlp: bool = False  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
    activation: Activation = Activation.GELU_NEW
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        # Coerce strings (from JSON, YAML, the CLI) into the enums, and numbers into one type,
        # so that specs that compare equal also serialise (and hash into run ids) identically.
        for name, kind in (("positional", PositionalScheme), ("norm", NormKind), ("activation", Activation)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                allowed = ", ".join(k.value for k in kind)
                raise SpecError(f"ModelSpec.{name} must be one of {allowed}; got {getattr(self, name)!r}") from None
        for name in ("d_vocab", "d_model", "n_layers", "n_heads", "d_head", "n_ctx"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise SpecError(f"ModelSpec.{name} must be a positive integer, got {value!r}")
        for name in ("d_mlp", "rotary_dim", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise SpecError(f"ModelSpec.{name} must be an integer or None, got {value!r}")
        for name in ("rotary_base", "norm_eps"):
            value = getattr(self, name)
            if _is_int(value) or isinstance(value, float):
                object.__setattr__(self, name, float(value))
            if not isinstance(getattr(self, name), float) or not getattr(self, name) > 0:
                raise SpecError(f"ModelSpec.{name} must be a positive number, got {value!r}")
        if self.d_mlp is not None and self.d_mlp < 1:
            raise SpecError(f"ModelSpec.d_mlp must be a positive integer or None, got {self.d_mlp!r}")
        if self.positional == PositionalScheme.ROTARY:
            rotary_dim = self.d_head if self.rotary_dim is None else self.rotary_dim
            if rotary_dim < 2 or rotary_dim > self.d_head or rotary_dim % 2:
                raise SpecError(
                    f"rotary_dim must be even and in [2, d_head={self.d_head}], got {rotary_dim}"
                )
            object.__setattr__(self, "rotary_dim", rotary_dim)
        elif self.rotary_dim is not None:
            raise SpecError(f"rotary_dim is set but the positional scheme is {self.positional.value!r}")
        if self.parallel_attn_mlp and self.d_mlp is None:
            raise SpecError("parallel_attn_mlp needs an MLP (d_mlp is None)")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.d_vocab:
            raise SpecError(f"bos_token_id {self.bos_token_id} is outside the vocabulary [0, {self.d_vocab})")

    @property
    def attn_only(self) -> bool:
        return self.d_mlp is None

    @property
    def has_pos_embed(self) -> bool:
        return self.positional in (PositionalScheme.LEARNED, PositionalScheme.SHORTFORMER)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (v.value if isinstance(v, enum.Enum) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown ModelSpec fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)



def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _leaf(axes: str, *, default_none: bool = True) -> Any:
    """A leaf and its logical axis names (one checkpoint), as in its annotation.

    The names are jaxinduct's axis vocabulary (`jaxinduct.parallel`): placement derives
    every sharding from them, and a leading ``layer`` axis marks the leaves the forward
    pass scans over.
    """
    names = tuple(axes.split())
    metadata = {"axes": names, "per_layer": names[:1] == ("layer",)}
    return dataclasses.field(default=None, metadata=metadata) if default_none else dataclasses.field(metadata=metadata)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    """One checkpoint (or a ckpt-stacked batch of them) in TransformerLens layout.

    Shapes below are for one checkpoint; a stack adds a leading ``ckpt`` axis.
    """

    W_E: Float[Array, "d_vocab d_model"] = _leaf("d_vocab d_model", default_none=False)
    W_U: Float[Array, "d_model d_vocab"] = _leaf("d_model d_vocab", default_none=False)
    b_U: Float[Array, " d_vocab"] = _leaf("d_vocab", default_none=False)
    # Attention: always present (zero biases where a source has none).
    W_Q: Float[Array, "layer head d_model d_head"] = _leaf("layer head d_model d_head")
    W_K: Float[Array, "layer head d_model d_head"] = _leaf("layer head d_model d_head")
    W_V: Float[Array, "layer head d_model d_head"] = _leaf("layer head d_model d_head")
    W_O: Float[Array, "layer head d_head d_model"] = _leaf("layer head d_head d_model")
    b_Q: Float[Array, "layer head d_head"] = _leaf("layer head d_head")
    b_K: Float[Array, "layer head d_head"] = _leaf("layer head d_head")
    b_V: Float[Array, "layer head d_head"] = _leaf("layer head d_head")
    b_O: Float[Array, "layer d_model"] = _leaf("layer d_model")
    W_pos: Float[Array, "n_ctx d_model"] | None = _leaf("n_ctx d_model")
    # Norm scales (w) and biases (b). None when spec.norm is none; biases None for rmsnorm.
    ln1_w: Float[Array, "layer d_model"] | None = _leaf("layer d_model")
    ln1_b: Float[Array, "layer d_model"] | None = _leaf("layer d_model")
    ln2_w: Float[Array, "layer d_model"] | None = _leaf("layer d_model")
    ln2_b: Float[Array, "layer d_model"] | None = _leaf("layer d_model")
    ln_final_w: Float[Array, " d_model"] | None = _leaf("d_model")
    ln_final_b: Float[Array, " d_model"] | None = _leaf("d_model")
    # MLP; None for attention-only models.
    W_in: Float[Array, "layer d_model d_mlp"] | None = _leaf("layer d_model d_mlp")
    b_in: Float[Array, "layer d_mlp"] | None = _leaf("layer d_mlp")
    W_out: Float[Array, "layer d_mlp d_model"] | None = _leaf("layer d_mlp d_model")
    b_out: Float[Array, "layer d_model"] | None = _leaf("layer d_model")
    spec: ModelSpec = dataclasses.field(kw_only=True, metadata=dict(static=True))

    def arrays(self) -> dict[str, Array]:
        """The present array leaves by canonical name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "spec" and getattr(self, f.name) is not None
        }


ARRAY_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Weights) if f.name != "spec")
LAYER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Weights) if f.metadata.get("per_layer"))
# Logical axis names of every leaf of one checkpoint (the field metadata), for placement.
LEAF_AXES: dict[str, tuple[str, ...]] = {f.name: f.metadata["axes"] for f in dataclasses.fields(Weights) if "axes" in f.metadata}


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every leaf that a model of this spec has (one checkpoint)."""
    L, H, D, E, V = spec.n_layers, spec.n_heads, spec.d_model, spec.d_head, spec.d_vocab
    shapes: dict[str, tuple[int, ...]] = {
        "W_E": (V, D),
        "W_Q": (L, H, D, E),
        "W_K": (L, H, D, E),
        "W_V": (L, H, D, E),
        "W_O": (L, H, E, D),
        "b_Q": (L, H, E),
        "b_K": (L, H, E),
        "b_V": (L, H, E),
        "b_O": (L, D),
        "W_U": (D, V),
        "b_U": (V,),
    }
    if spec.has_pos_embed:
        shapes["W_pos"] = (spec.n_ctx, D)
    if spec.norm != NormKind.NONE:
        shapes["ln1_w"] = (L, D)
        shapes["ln_final_w"] = (D,)
        if spec.norm == NormKind.LAYERNORM:
            shapes["ln1_b"] = (L, D)
            shapes["ln_final_b"] = (D,)
        if not spec.attn_only:
            shapes["ln2_w"] = (L, D)
            if spec.norm == NormKind.LAYERNORM:
                shapes["ln2_b"] = (L, D)
    if not spec.attn_only:
        assert spec.d_mlp is not None
        shapes["W_in"] = (L, D, spec.d_mlp)
        shapes["b_in"] = (L, spec.d_mlp)
        shapes["W_out"] = (L, spec.d_mlp, D)
        shapes["b_out"] = (L, D)
    return shapes


def make_weights(spec: ModelSpec, arrays: dict[str, Any], *, batch_dims: int = 0) -> Weights:
    """Build Weights from named arrays, checking that names and shapes match the spec.

    ``batch_dims`` leading axes (e.g. 1 for a ckpt stack) are allowed on every leaf
    and must agree across leaves. Errors name the offending tensor.
    """
    wanted = expected_shapes(spec)
    missing = sorted(set(wanted) - set(arrays))
    if missing:
        raise SpecError(f"weights are missing tensors {missing} that a {_describe(spec)} model needs")
    extra = sorted(k for k in arrays if k not in wanted and arrays[k] is not None)
    if extra:
        unknown = [k for k in extra if k not in ARRAY_FIELDS]
        if unknown:
            raise SpecError(f"unknown tensor names {unknown}; canonical names are {list(ARRAY_FIELDS)}")
        raise SpecError(f"tensors {extra} are given but a {_describe(spec)} model has no such weights")
    lead: tuple[int, ...] | None = None
    for name, shape in wanted.items():
        got = tuple(np.shape(arrays[name]))
        if len(got) != len(shape) + batch_dims or got[batch_dims:] != shape:
            raise SpecError(f"tensor {name} has shape {got}, expected {('...',) * batch_dims + shape}")
        if lead is None:
            lead = got[:batch_dims]
        elif got[:batch_dims] != lead:
            raise SpecError(f"tensor {name} has leading dims {got[:batch_dims]}, others have {lead}")
    return Weights(spec=spec, **{k: arrays[k] for k in wanted})


def _describe(spec: ModelSpec) -> str:
    parts = [spec.positional.value + "-position", spec.norm.value]
    parts.append("attention-only" if spec.attn_only else "MLP")
    return ", ".join(parts)


def stack_weights(checkpoints: list[Weights]) -> Weights:
    """Stack checkpoints of one architecture on a new leading ``ckpt`` axis."""
    if not checkpoints:
        raise ValueError("stack_weights needs at least one checkpoint")
    spec = checkpoints[0].spec
    for i, w in enumerate(checkpoints):
        if w.spec != spec:
            raise SpecError(f"checkpoint {i} has spec {w.spec}, checkpoint 0 has {spec}")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *checkpoints)


def unstack_weights(stacked: Weights) -> list[Weights]:
    """Inverse of `stack_weights`."""
    n = stacked.W_E.shape[0]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)]


def init_random_weights(spec: ModelSpec, seed: int, *, scale: float = 0.5) -> Weights:
    """Random float32 Weights with every leaf the spec has (norm scales near 1).

    For tests and baselines: Gaussian entries scaled by 1/sqrt(fan-in), times ``scale``.
    Drawn on the host with numpy: eager jax.random would compile a kernel per leaf shape.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in sorted(expected_shapes(spec).items()):
        noise = rng.standard_normal(shape).astype(np.float32)
        if name.startswith("ln") and name.endswith("_w"):
            arrays[name] = 1.0 + 0.1 * noise
        elif name.startswith("b_") or name.endswith("_b"):
            arrays[name] = 0.1 * noise
        else:
            fan_in = 1 if name in ("W_E", "W_pos") else shape[-2]
            arrays[name] = (scale / np.sqrt(fan_in)) * noise
    return make_weights(spec, {k: jnp.asarray(v) for k, v in arrays.items()})


def abstract_weights(spec: ModelSpec, dtype: Any = np.float32) -> Weights:
    """Weights of ``jax.ShapeDtypeStruct`` leaves (one checkpoint): a restore or trace target."""
    return Weights(spec=spec, **{name: jax.ShapeDtypeStruct(shape, dtype) for name, shape in expected_shapes(spec).items()})


def host_zeros(structs: Any) -> Any:
    """Numpy zeros shaped like a tree of shape/dtype structs (or Orbax array metadata)."""
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), structs)


def zero_weights(spec: ModelSpec) -> Weights:
    """Weights of host float32 zeros (one checkpoint): the padding row of a batch with no checkpoint."""
    return host_zeros(abstract_weights(spec))


def shapes_and_dtypes(weights: Weights) -> Weights:
    """``weights`` as ``jax.ShapeDtypeStruct`` leaves: what a padding row copies (`host_zeros`)
    without holding the checkpoint it came from."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), weights)


def widened(weights: Weights, *, keep: tuple[str, ...] = ()) -> Weights:
    """``weights`` with every floating leaf narrower than float32 (float16, bfloat16) as float32,
    the precision every score is computed in; other leaves, and those named in ``keep``
    (widened later, where they are read), unchanged.

    Called inside the compiled scan program, so that checkpoints stay in their stored dtype
    (half the bytes) on the host, in the prefetch queue and in transfer.
    """

    def wide(x: Any) -> Any:
        narrow = jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4
        return x.astype(jnp.float32) if narrow else x

    kept = {name: getattr(weights, name) for name in keep}
    out = jax.tree_util.tree_map(wide, dataclasses.replace(weights, **dict.fromkeys(keep)))
    return dataclasses.replace(out, **kept)
