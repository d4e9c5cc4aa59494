"""Declarative mappings from someone else's checkpoint tree to canonical weights.

A mapping is a small YAML file that tells jaxinduct where the canonical tensors of
`jaxinduct.model.weights.Weights` live in the params tree of an Orbax checkpoint written by
other code (Flax linen or NNX state, or any plain dict of arrays), so that such a
trajectory can be scanned with ``jaxinduct scan DIR --mapping FILE`` and no Python.
See ``docs/mappings/`` for shipped examples.

Schema::

    spec:                  # a ModelSpec (jaxinduct.model.weights.ModelSpec.from_dict): required
      d_vocab: 50304
      d_model: 768
      n_layers: 12
      n_heads: 12
      d_head: 64
      n_ctx: 1024
      d_mlp: 3072          # leave out (or null) for an attention-only model
      positional: learned  # none | learned | shortformer | rotary
      norm: layernorm      # none | layernorm | rmsnorm
      norm_eps: 1.0e-6     # PyYAML reads 1e-6 (no dot) as text; it is accepted and converted
    item: params           # the Orbax item holding the tree (default "params"); a tree saved
                           # with a bare `CheckpointManager.save(step, args=StandardSave(tree))`
                           # is the item "default", and its paths are those of `tree`: when
                           # `tree` is the whole linen `variables`, they start with "params/"
    tensors:               # canonical name -> where it is and how to turn it into canonical layout
      W_E: params/embed/embedding            # a path alone: read as is
      W_Q:
        path: params/blocks_{layer}/attn/query/kernel
        transpose: true    # optional: true (2-D transpose) or an axes permutation [1, 0, 2]
        split_heads: in    # optional: in  [d_model, H*E] -> [H, d_model, E]
                           #           out [H*E, d_model] -> [H, E, d_model]
                           #           bias [H*E]         -> [H, E]
      b_U: {zeros: true}   # a bias the model does not have (b_*, and ln*_b of a bias-free LayerNorm)

Paths are "/"-separated keys (list indices as numbers) of the item's tree. Per-layer
tensors (W_Q ... b_O, ln1_*, ln2_*, W_in ... b_out) put ``{layer}`` in their path and
are read once per layer and stacked; a per-layer path without ``{layer}`` names a tensor
already stacked on a leading layer axis (e.g. from ``nn.scan``), and the transforms are
applied to each layer's slice. ``transpose`` is applied after reading, before
``split_heads``. Every tensor the spec needs (`jaxinduct.model.weights.expected_shapes`) must be
mapped; each result must have exactly the expected shape. Validation is strict: unknown
or duplicate keys, ``zeros`` other than ``true`` (or on a tensor that is not a bias) and a
``transpose`` other than ``true`` or a list of axis numbers are errors.

The parsed mapping (spec, item and rules; not the YAML's formatting or comments) is part
of the results' identity (`jaxinduct.engine.scan.probe_identity`): rescanning into the same store
with a corrected mapping scans every checkpoint again, under a new probe hash.

What a mapping cannot express today (convert such checkpoints with Python instead,
e.g. `jaxinduct.model.weights.make_weights` and a canonical trajectory):

* ``{layer}`` is replaced by 0, 1, ..., n_layers - 1, unpadded: layers numbered from 1
  (``h_1``), zero-padded (``layer_01``) or named otherwise cannot be matched;
* no slicing or concatenation: a fused QKV kernel (one ``Dense(3 * H * E)``) or a fused
  gate/up projection cannot be split into W_Q/W_K/W_V; each canonical tensor must be one
  leaf (or one leaf per layer);
* a stacked (``nn.scan``) tensor must have the layer axis first (``[n_layers, ...]``);
  ``transpose`` and ``split_heads`` apply to each layer's slice only;
* no other arithmetic (scaling, folding, dtype-specific handling) and one Orbax item only.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinduct.checkpoints.layout import PARAMS
from jaxinduct.errors import JaxInductError, SpecError
from jaxinduct.model.weights import ARRAY_FIELDS, LAYER_FIELDS, ModelSpec, Weights, expected_shapes, make_weights

DEFAULT_ITEM = PARAMS  # a mapping reads the item jaxinduct itself saves params in, unless told otherwise
LAYER = "{layer}"
_SPLITS = ("in", "out", "bias")
_RULE_KEYS = {"path", "transpose", "split_heads", "zeros"}
_TOP_KEYS = {"spec", "item", "tensors"}
# ModelSpec fields that are floats: YAML 1.1 (PyYAML) reads "1e-6" as a string.
_FLOAT_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.type in ("float", float))


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

    def digest(self) -> str:
        """sha256 of the parsed mapping (spec, item, rules) as canonical JSON; the file's
        name, formatting and comments do not enter it."""
        record = {
            "spec": self.spec.to_dict(),
            "item": self.item,
            "tensors": {
                name: {
                    "path": rule.path,
                    "transpose": list(rule.transpose) if isinstance(rule.transpose, tuple) else rule.transpose,
                    "split_heads": rule.split_heads,
                    "zeros": rule.zeros,
                }
                for name, rule in self.tensors.items()
            },
        }
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _strict_loader() -> type:
    """A yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: SafeLoader reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}; each key may appear only once", key_node.start_mark,
                    )  # fmt: skip
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def load_mapping(path: str | os.PathLike) -> Mapping:
    """Read and validate a mapping YAML against its own spec (no checkpoint needed)."""
    import yaml

    file = Path(path).expanduser()
    try:
        with file.open(encoding="utf-8") as stream:  # a stream, so that YAML's messages name the file
            data = yaml.load(stream, Loader=_strict_loader())  # noqa: S506 (a SafeLoader)
    except OSError as e:
        raise MappingError(f"mapping file {file} cannot be read: {e}; give the path of a YAML mapping file") from e
    except UnicodeDecodeError as e:
        raise MappingError(f"mapping file {file} is not UTF-8 text ({e}); give the path of a YAML mapping file") from e
    except yaml.YAMLError as e:
        raise MappingError(f"mapping file {file} is not valid YAML: {e}") from e
    return parse_mapping(data, file=str(file))


def parse_mapping(data: Any, *, file: str = "<mapping>") -> Mapping:
    where = f"mapping {file}"
    if not isinstance(data, dict):
        raise MappingError(f"{where}: expected a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(data) - _TOP_KEYS, key=str)
    if unknown:
        raise MappingError(f"{where}: unknown keys {unknown}; known keys are {sorted(_TOP_KEYS)}")
    if not isinstance(data.get("spec"), dict):
        raise MappingError(f"{where}: needs a 'spec:' section (a ModelSpec: d_vocab, d_model, n_layers, ...)")
    spec_data = dict(data["spec"])
    for name in _FLOAT_SPEC_FIELDS:
        value = spec_data.get(name)
        if isinstance(value, str):
            try:
                spec_data[name] = float(value)
            except ValueError:
                raise MappingError(f"{where}: spec.{name} must be a number, got {value!r}; write e.g. 1.0e-6") from None
    try:
        spec = ModelSpec.from_dict(spec_data)
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
            f"{where}: required canonical tensors {missing} are not mapped (use '{{zeros: true}}' for biases the model lacks)"
        )
    return Mapping(spec=spec, item=item, tensors=rules, file=file)


def _may_be_zeros(name: str) -> bool:
    """Biases, which a model may lack: b_* and the layer norms' ln*_b."""
    return name.startswith("b_") or (name.startswith("ln") and name.endswith("_b"))


def _is_permutation(value: Any) -> bool:
    """A non-empty list of ints (not bools or floats) holding 0 .. n-1 once each."""
    return (
        isinstance(value, list) and bool(value) and all(type(i) is int for i in value)
        and sorted(value) == list(range(len(value)))
    )  # fmt: skip


def _parse_rule(name: str, value: Any, where: str) -> TensorRule:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise MappingError(f"{where}: tensor {name}: expected a path or a dict with keys {sorted(_RULE_KEYS)}")
    unknown = sorted(set(value) - _RULE_KEYS, key=str)
    if unknown:
        raise MappingError(f"{where}: tensor {name}: unknown keys {unknown}; known keys are {sorted(_RULE_KEYS)}")
    if "zeros" in value:
        zeros = value["zeros"]
        if zeros is not True:
            raise MappingError(
                f"{where}: tensor {name}: 'zeros' must be the boolean true, got {zeros!r}; "
                "to read the tensor from the checkpoint, give its 'path' and leave 'zeros' out"
            )
        others = sorted(set(value) - {"zeros"})
        if others:
            raise MappingError(f"{where}: tensor {name}: 'zeros: true' takes no path or transforms; remove {others}")
        if not _may_be_zeros(name):
            raise MappingError(
                f"{where}: tensor {name}: 'zeros: true' is only for biases a model may lack (b_*, ln*_b); "
                f"{name} must be read from the checkpoint: give its 'path'"
            )
        return TensorRule(name, None, zeros=True)
    path = value.get("path")
    if not isinstance(path, str) or not path.strip("/"):
        raise MappingError(f"{where}: tensor {name}: needs a 'path' (a string such as 'params/embed/embedding')")
    if LAYER in path and name not in LAYER_FIELDS:
        raise MappingError(f"{where}: tensor {name} is not per-layer, but its path {path!r} has {LAYER}")
    transpose: tuple[int, ...] | bool | None = None
    if "transpose" in value:
        given = value["transpose"]
        if given is True:
            transpose = True
        elif _is_permutation(given):
            transpose = tuple(given)
        else:
            raise MappingError(
                f"{where}: tensor {name}: 'transpose' must be true (a 2-D transpose) or a permutation of the "
                f"tensor's axes as a list of integers such as [1, 0, 2], got {given!r}; leave it out for no transpose"
            )
    split = value.get("split_heads")
    if split is not None and split not in _SPLITS:
        raise MappingError(f"{where}: tensor {name}: 'split_heads' must be one of {list(_SPLITS)}, got {split!r}")
    return TensorRule(name, path.strip("/"), transpose=transpose, split_heads=split)


# --- applying a mapping -------------------------------------------------------------------------


def _path(keys: tuple) -> str:
    """A tree path as "a/0/b", whether list indices were saved as ints or as strings."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def flatten_tree(tree: Any) -> dict[str, Any]:
    """A nested tree's leaves by "a/0/b" path: the path spelling of mappings and of the
    sources' shape checks."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path(keys): leaf for keys, leaf in flat}


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
    n_layers = mapping.spec.n_layers
    prefix = f"{where}: {mapping.file}"

    def leaf_shape(rule: TensorRule, path: str, layer: int | None = None) -> tuple[int, ...]:
        if path not in shapes:
            raise _not_found(mapping, rule, path, shapes, where, layer=layer)
        return tuple(shapes[path])

    for name, rule in mapping.tensors.items():
        if rule.zeros:
            continue
        assert rule.path is not None
        if rule.layered_path:
            paths = _layer_paths(rule, n_layers)
            per = [leaf_shape(rule, p, i) for i, p in enumerate(paths)]
            for i, s in enumerate(per):
                if s != per[0]:
                    raise MappingError(
                        f"{prefix}: tensor {name}: layer {i}'s leaf {paths[i]!r} has shape {s}, but layer 0's "
                        f"({paths[0]!r}) has shape {per[0]}; every layer's leaf must have the same shape"
                    )
            shape = (n_layers, *_shape_after(mapping, rule, per[0], where))
        elif rule.per_layer:
            stacked = leaf_shape(rule, rule.path)
            if not stacked or stacked[0] != n_layers:
                found = "is a scalar" if not stacked else f"has shape {stacked}, whose first axis is {stacked[0]}"
                raise MappingError(
                    f"{prefix}: tensor {name}: path {rule.path!r} has no {LAYER}, so it must hold every layer stacked "
                    f"on its first axis ([n_layers={n_layers}, ...]), but it {found}; put {LAYER} in the path for "
                    "one leaf per layer (a layer axis that is not first cannot be mapped)"
                )
            shape = (stacked[0], *_shape_after(mapping, rule, stacked[1:], where))
        else:
            shape = _shape_after(mapping, rule, leaf_shape(rule, rule.path), where)
        if shape != wanted[name]:
            raise MappingError(
                f"{prefix}: tensor {name} (from {rule.path!r}) has shape {shape} after the mapping's "
                f"transforms, but the spec needs {wanted[name]}"
            )


def _shape_after(mapping: Mapping, rule: TensorRule, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    try:
        struct = jax.eval_shape(lambda x: _transform(x, rule, mapping.spec.n_heads), jax.ShapeDtypeStruct(shape, jnp.float32))
    except (ValueError, TypeError) as e:
        raise MappingError(f"{where}: {mapping.file}: tensor {rule.name} (from {rule.path!r}, shape {shape}): {e}") from e
    return tuple(struct.shape)


def close_paths(path: str, available: Any, n: int = 8) -> list[str]:
    """Paths of ``available`` that ``path`` probably meant: those ending with its last
    components (the most that any path shares), then similar spellings (difflib)."""
    paths = sorted(available)
    parts = path.split("/")
    by_tail: list[str] = []
    for k in range(len(parts), 1, -1):  # two components at least; "kernel" alone matches too much
        by_tail = [p for p in paths if p.split("/")[-k:] == parts[-k:]]
        if by_tail:
            break
    close = difflib.get_close_matches(path, paths, n=n, cutoff=0.6)
    last = [p for p in paths if p.split("/")[-1] == parts[-1]] if len(parts) == 1 else []
    return list(dict.fromkeys(by_tail + close + last))[:n]


def _not_found(
    mapping: Mapping, rule: TensorRule, path: str, available: Any, where: str, *, layer: int | None = None
) -> MappingError:
    shown = sorted(available)
    suggestions = close_paths(path, shown)
    if suggestions:
        hint = f"did you mean one of {suggestions}? (the item has {len(shown)} paths)"
    else:
        more = f" ... ({len(shown)} in all)" if len(shown) > 12 else ""
        hint = f"no path is close; its paths are {shown[:12]}{more}"
    if layer:  # layer 0 was found
        hint += f"; layer 0 was found, so does the checkpoint have fewer than n_layers={mapping.spec.n_layers} layers?"
    return MappingError(
        f"{where}: {mapping.file}: tensor {rule.name}: path {path!r} not found in item {mapping.item!r}; {hint}"
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
        assert rule.path is not None
        if rule.layered_path:
            parts = [np.asarray(flat[p], np.float32) for p in _layer_paths(rule, spec.n_layers)]
        elif rule.per_layer:
            parts = list(np.asarray(flat[rule.path], np.float32))
        else:
            arrays[name] = np.ascontiguousarray(_transform(np.asarray(flat[rule.path], np.float32), rule, spec.n_heads))
            continue
        arrays[name] = np.stack([_transform(p, rule, spec.n_heads) for p in parts])
    return make_weights(spec, arrays)
