"""Declarative mappings from someone else's checkpoint tree to canonical weights.

A mapping is a small YAML file that tells jaxinduct where the canonical tensors of
`jaxinduct.weights.Weights` live in the params tree of an Orbax checkpoint written by
other code (Flax linen or NNX state, or any plain dict of arrays), so that such a
trajectory can be scanned with ``jaxinduct scan DIR --mapping FILE`` and no Python.
See ``docs/mappings/`` for shipped examples.

Schema::

    spec:                  # a ModelSpec (jaxinduct.weights.ModelSpec.from_dict): required
      d_vocab: 50304
      d_model: 768
      n_layers: 12
      n_heads: 12
      d_head: 64
      n_ctx: 1024
      d_mlp: 3072          # leave out (or null) for an attention-only model
      positional: learned  # none | learned | shortformer | rotary
      norm: layernorm      # none | layernorm | rmsnorm
    item: params           # the Orbax item holding the tree (default "params"); a tree saved
                           # with a bare `CheckpointManager.save(step, args=StandardSave(tree))`
                           # is stored under the item "default"
    tensors:               # canonical name -> where it is and how to turn it into canonical layout
      W_E: params/embed/embedding            # a path alone: read as is
      W_Q:
        path: params/blocks_{layer}/attn/query/kernel
        transpose: true    # optional: true (2-D transpose) or an axes permutation [1, 0, 2]
        split_heads: in    # optional: in  [d_model, H*E] -> [H, d_model, E]
                           #           out [H*E, d_model] -> [H, E, d_model]
                           #           bias [H*E]         -> [H, E]
      b_U: {zeros: true}   # a tensor the model does not have (e.g. no biases)

Paths are "/"-separated keys (list indices as numbers) of the item's tree. Per-layer
tensors (W_Q ... b_O, ln1_*, ln2_*, W_in ... b_out) put ``{layer}`` in their path and
are read once per layer and stacked; a per-layer path without ``{layer}`` names a tensor
already stacked on a leading layer axis (e.g. from ``nn.scan``), and the transforms are
applied to each layer's slice. ``transpose`` is applied after reading, before
``split_heads``. Every tensor the spec needs (`jaxinduct.weights.expected_shapes`) must be
mapped; each result must have exactly the expected shape.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinduct.errors import JaxInductError, SpecError
from jaxinduct.weights import ARRAY_FIELDS, LAYER_FIELDS, ModelSpec, Weights, expected_shapes, make_weights

DEFAULT_ITEM = "params"
LAYER = "{layer}"
_SPLITS = ("in", "out", "bias")
_RULE_KEYS = {"path", "transpose", "split_heads", "zeros"}
_TOP_KEYS = {"spec", "item", "tensors"}


class MappingError(JaxInductError, ValueError):
    """A mapping file is malformed, or does not fit the checkpoint it is applied to."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    name: str  # canonical name
    path: str | None  # None for zeros
    transpose: tuple[int, ...] | bool | None = None
    split_heads: str | None = None
    zeros: bool = False

    @property
    def per_layer(self) -> bool:
        return self.name in LAYER_FIELDS

    @property
    def layered_path(self) -> bool:
        return self.path is not None and LAYER in self.path


@dataclasses.dataclass(frozen=True)
class Mapping:
    spec: ModelSpec
    item: str
    tensors: dict[str, TensorRule]
    file: str  # where it was read from (for messages)


def load_mapping(path: str | os.PathLike) -> Mapping:
    """Read and validate a mapping YAML against its own spec (no checkpoint needed)."""
    import yaml

    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as e:
        raise MappingError(f"mapping file {file} cannot be read: {e}") from e
    except yaml.YAMLError as e:
        raise MappingError(f"mapping file {file} is not valid YAML: {e}") from e
    return parse_mapping(data, file=str(file))


def parse_mapping(data: Any, *, file: str = "<mapping>") -> Mapping:
    where = f"mapping {file}"
    if not isinstance(data, dict):
        raise MappingError(f"{where}: expected a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise MappingError(f"{where}: unknown keys {unknown}; known keys are {sorted(_TOP_KEYS)}")
    if not isinstance(data.get("spec"), dict):
        raise MappingError(f"{where}: needs a 'spec:' section (a ModelSpec: d_vocab, d_model, n_layers, ...)")
    try:
        spec = ModelSpec.from_dict(data["spec"])
    except (SpecError, TypeError) as e:
        raise MappingError(f"{where}: bad spec: {e}") from e
    item = data.get("item", DEFAULT_ITEM)
    if not isinstance(item, str) or not item:
        raise MappingError(f"{where}: 'item' must be an Orbax item name such as 'params' or 'default'")
    tensors = data.get("tensors")
    if not isinstance(tensors, dict):
        raise MappingError(f"{where}: needs a 'tensors:' section mapping canonical names to checkpoint paths")
    wanted = expected_shapes(spec)
    rules: dict[str, TensorRule] = {}
    for name, value in tensors.items():
        if name not in ARRAY_FIELDS:
            raise MappingError(f"{where}: unknown canonical tensor {name!r}; canonical names are {list(ARRAY_FIELDS)}")
        if name not in wanted:
            raise MappingError(f"{where}: tensor {name} is mapped, but a model of this spec has no {name}")
        rules[name] = _parse_rule(name, value, where)
    missing = [n for n in wanted if n not in rules]
    if missing:
        raise MappingError(
            f"{where}: required canonical tensors {missing} are not mapped (use '{{zeros: true}}' for ones the model lacks)"
        )
    return Mapping(spec=spec, item=item, tensors=rules, file=file)


def _parse_rule(name: str, value: Any, where: str) -> TensorRule:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise MappingError(f"{where}: tensor {name}: expected a path or a dict with keys {sorted(_RULE_KEYS)}")
    unknown = sorted(set(value) - _RULE_KEYS)
    if unknown:
        raise MappingError(f"{where}: tensor {name}: unknown keys {unknown}; known keys are {sorted(_RULE_KEYS)}")
    if value.get("zeros"):
        if set(value) - {"zeros"}:
            raise MappingError(f"{where}: tensor {name}: 'zeros: true' takes no path or transforms")
        return TensorRule(name, None, zeros=True)
    path = value.get("path")
    if not isinstance(path, str) or not path.strip("/"):
        raise MappingError(f"{where}: tensor {name}: needs a 'path' (or 'zeros: true')")
    if LAYER in path and name not in LAYER_FIELDS:
        raise MappingError(f"{where}: tensor {name} is not per-layer, but its path {path!r} has {LAYER}")
    transpose = value.get("transpose")
    if transpose is not None and not isinstance(transpose, bool):
        if not isinstance(transpose, list) or sorted(transpose) != list(range(len(transpose))):
            raise MappingError(f"{where}: tensor {name}: 'transpose' must be true or an axes permutation like [1, 0, 2]")
        transpose = tuple(transpose)
    split = value.get("split_heads")
    if split is not None and split not in _SPLITS:
        raise MappingError(f"{where}: tensor {name}: 'split_heads' must be one of {list(_SPLITS)}, got {split!r}")
    return TensorRule(name, path.strip("/"), transpose=transpose or None, split_heads=split)


# --- applying a mapping -------------------------------------------------------------------------


def flatten_tree(tree: Any) -> dict[str, Any]:
    """A nested tree's leaves by "a/0/b" path."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys): leaf for keys, leaf in flat}


def _transform(x: Any, rule: TensorRule, n_heads: int) -> Any:
    """One tensor (one layer's) into canonical layout; array methods only (numpy or traced)."""
    if rule.transpose is True:
        if x.ndim != 2:
            raise ValueError(f"'transpose: true' needs a 2-D tensor, got shape {tuple(x.shape)}")
        x = x.T
    elif rule.transpose:
        x = x.transpose(rule.transpose)
    if rule.split_heads is None:
        return x
    last = x.shape[-1] if rule.split_heads in ("in", "bias") else x.shape[0]
    expected_ndim = 1 if rule.split_heads == "bias" else 2
    if x.ndim != expected_ndim or last % n_heads:
        raise ValueError(
            f"'split_heads: {rule.split_heads}' needs a {expected_ndim}-D tensor whose "
            f"{'last' if rule.split_heads != 'out' else 'first'} axis is a multiple of n_heads={n_heads}, "
            f"got shape {tuple(x.shape)}"
        )
    if rule.split_heads == "in":  # [D, H*E] -> [H, D, E]
        return x.reshape(x.shape[0], n_heads, last // n_heads).transpose(1, 0, 2)
    if rule.split_heads == "out":  # [H*E, D] -> [H, E, D]
        return x.reshape(n_heads, last // n_heads, x.shape[1])
    return x.reshape(n_heads, last // n_heads)  # bias [H*E] -> [H, E]


def _layer_paths(rule: TensorRule, n_layers: int) -> list[str]:
    assert rule.path is not None
    return [rule.path.replace(LAYER, str(i)) for i in range(n_layers)]


def check_shapes(mapping: Mapping, shapes: dict[str, tuple[int, ...]], *, where: str) -> None:
    """Check a mapping against a checkpoint's tensor shapes by path (metadata only)."""
    wanted = expected_shapes(mapping.spec)

    def leaf_shape(rule: TensorRule, path: str) -> tuple[int, ...]:
        if path not in shapes:
            raise _not_found(mapping, rule, path, shapes, where)
        return tuple(shapes[path])

    for name, rule in mapping.tensors.items():
        if rule.zeros:
            continue
        if rule.layered_path:
            per = [leaf_shape(rule, p) for p in _layer_paths(rule, mapping.spec.n_layers)]
            out = [_shape_after(mapping, rule, s, where) for s in per]
            shape = (len(out), *out[0]) if len(set(out)) == 1 else None
        elif rule.per_layer:
            stacked = leaf_shape(rule, rule.path)
            shape = (stacked[0], *_shape_after(mapping, rule, stacked[1:], where)) if stacked else None
        else:
            shape = _shape_after(mapping, rule, leaf_shape(rule, rule.path), where)
        if shape != wanted[name]:
            raise MappingError(
                f"{where}: {mapping.file}: tensor {name} (from {rule.path!r}) has shape {shape} after the mapping's "
                f"transforms, but the spec needs {wanted[name]}"
            )


def _shape_after(mapping: Mapping, rule: TensorRule, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    try:
        struct = jax.eval_shape(lambda x: _transform(x, rule, mapping.spec.n_heads), jax.ShapeDtypeStruct(shape, jnp.float32))
    except (ValueError, TypeError) as e:
        raise MappingError(f"{where}: {mapping.file}: tensor {rule.name} (from {rule.path!r}, shape {shape}): {e}") from e
    return tuple(struct.shape)


def _not_found(mapping: Mapping, rule: TensorRule, path: str, available: Any, where: str) -> MappingError:
    shown = sorted(available)
    more = f" ... ({len(shown)} in all)" if len(shown) > 12 else ""
    return MappingError(
        f"{where}: {mapping.file}: tensor {rule.name}: path {path!r} not found in item {mapping.item!r}; "
        f"its paths are {shown[:12]}{more}"
    )


def apply_mapping(mapping: Mapping, tree: Any, *, where: str = "checkpoint") -> Weights:
    """Canonical host Weights from a restored params tree (``where`` names the step in errors)."""
    flat = flatten_tree(tree)
    check_shapes(mapping, {k: tuple(np.shape(v)) for k, v in flat.items()}, where=where)
    spec, wanted = mapping.spec, expected_shapes(mapping.spec)
    arrays: dict[str, np.ndarray] = {}
    for name, rule in mapping.tensors.items():
        if rule.zeros:
            arrays[name] = np.zeros(wanted[name], np.float32)
            continue
        if rule.layered_path:
            parts = [np.asarray(flat[p], np.float32) for p in _layer_paths(rule, spec.n_layers)]
        elif rule.per_layer:
            parts = list(np.asarray(flat[rule.path], np.float32))
        else:
            arrays[name] = np.ascontiguousarray(_transform(np.asarray(flat[rule.path], np.float32), rule, spec.n_heads))
            continue
        arrays[name] = np.stack([_transform(p, rule, spec.n_heads) for p in parts])
    return make_weights(spec, arrays)
