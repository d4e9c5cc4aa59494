"""Hugging Face model directories (config.json + safetensors) into canonical `Weights`.

No torch at run time and nothing is ever unpickled: tensors are read with
``safetensors`` (numpy framework) from ``model.safetensors``, or from the shards that
``model.safetensors.index.json`` lists. A directory holding only pickle-based weights
(``pytorch_model.bin``, ``*.pt``, ...) is refused, because loading a pickle can run
arbitrary code. Every tensor is checked against the shape ``config.json`` implies
before it is used, and returned as numpy in its stored dtype: float16 and bfloat16 (an
ml_dtypes type) stay half the bytes of float32 on the host and in transfer, and the scan
program widens them where it computes (`jaxinduct.model.weights.widened`); float64 is
narrowed to float32, the precision every score is computed in.

Layouts, with the tensor names transformers 5.24 writes (D = d_model, H = heads,
E = d_head, V = vocabulary, M = d_mlp):

GPT-2 (``model_type: gpt2``). Names carry a ``transformer.`` prefix when saved from
``GPT2LMHeadModel`` and none when saved from ``GPT2Model`` (as the Hub's ``gpt2`` is);
both are read. Projections are ``Conv1D`` layers, stored ``[in, out]``
(``y = x @ W + b``), i.e. already in TransformerLens orientation:

- ``wte.weight [V, D]`` -> W_E; ``wpe.weight [n_positions, D]`` -> W_pos;
- ``h.{i}.attn.c_attn.weight [D, 3D]``: columns ``[Q | K | V]``, each ``H*E`` wide
  with the heads contiguous -> split, then ``[D, H, E]`` -> ``[H, D, E]``; the bias
  ``[3D]`` likewise;
- ``h.{i}.attn.c_proj.weight [D, D]``: rows are ``(head, e)`` -> W_O ``[H, E, D]``;
- ``h.{i}.mlp.c_fc.weight [D, M]`` -> W_in; ``h.{i}.mlp.c_proj.weight [M, D]`` -> W_out;
- ``h.{i}.ln_1``, ``h.{i}.ln_2``, ``ln_f`` -> ln1, ln2, ln_final;
- the unembedding is tied to ``wte`` (W_U = wte.T, b_U = 0), unless
  ``tie_word_embeddings`` is false: then ``lm_head.weight [V, D]`` (an ``nn.Linear``,
  out x in, no bias) is saved and W_U is its transpose.

GPT-NeoX (``model_type: gpt_neox``: Pythia and kin). Projections are ``nn.Linear``,
stored ``[out, in]``, so every matrix is transposed:

- ``gpt_neox.embed_in.weight [V, D]`` -> W_E; ``embed_out.weight [V, D]`` -> W_U = its
  transpose, b_U = 0 (``embed_in`` again when ``tie_word_embeddings`` is true);
- ``gpt_neox.layers.{i}.attention.query_key_value.weight [3D, D]``: the output rows
  are interleaved per head, ``[H, 3, E]`` (head 0's q, k, v, then head 1's, ...),
  not ``[3, H, E]`` as in GPT-2; its bias ``[3D]`` likewise;
- ``attention.dense.weight [D, D]`` -> W_O = its transpose viewed ``[H, E, D]``;
- ``mlp.dense_h_to_4h.weight [M, D]`` -> W_in = transpose;
  ``mlp.dense_4h_to_h.weight [D, M]`` -> W_out = transpose;
- ``input_layernorm``, ``post_attention_layernorm``, ``gpt_neox.final_layer_norm``;
- attention biases are absent when ``attention_bias`` is false (zeros then);
- rotary on the first ``int(d_head * partial_rotary_factor)`` dims of each query and
  key, halves rotated against each other (what `jaxinduct.model.forward` implements);
  ``use_parallel_residual`` selects ``x + attn(ln1 x) + mlp(ln2 x)``.

Buffers that older checkpoints also hold (GPT-2 ``attn.bias``/``attn.masked_bias``,
NeoX ``rotary_emb.inv_freq``) are not weights and are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxinduct.errors import JaxInductError, SpecError
from jaxinduct.model.weights import Activation, ModelSpec, Weights, make_weights

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weight files that are (or may be) pickles: refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox")

# HF activation names -> ours. gelu_pytorch_tanh is the same tanh approximation as gelu_new.
ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation.GELU,
    "gelu_new": Activation.GELU_NEW,
    "gelu_pytorch_tanh": Activation.GELU_NEW,
    "relu": Activation.RELU,
    "silu": Activation.SILU,
}

# transformers 5.24's class defaults for the fields a saved config.json may omit.
GPT2_DEFAULTS: dict[str, Any] = {
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}
NEOX_DEFAULTS: dict[str, Any] = {
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "attention_bias": True,
    "bos_token_id": 0,
}
# GPTNeoXConfig's own fallbacks when neither rope_parameters nor the transformers-4 names say.
NEOX_DEFAULT_ROTARY_FACTOR = 0.25
NEOX_DEFAULT_ROTARY_BASE = 10000.0

RESAVE_HINT = "re-save the model with save_pretrained(dir, safe_serialization=True)"


class HFImportError(JaxInductError):
    """A Hugging Face model directory cannot be imported (names the file, the tensor and the fix)."""


# ---------------------------------------------------------------------------------------------
# config.json -> ModelSpec


def read_hf_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory."""
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise HFImportError(f"{model_dir}: not a directory; point at a model directory written by save_pretrained")
    if not path.is_file():
        raise HFImportError(
            f"{path}: no {CONFIG_FILE}; point at a directory written by save_pretrained "
            f"(it holds {CONFIG_FILE} and {SAFETENSORS_FILE})"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFImportError(f"{path}: cannot be read as JSON ({e}); restore it from the model's source") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path}: holds a JSON {type(config).__name__}, expected an object of config fields")
    return config


def spec_from_hf_config(config: Mapping[str, Any], *, source: str | os.PathLike[str] = CONFIG_FILE) -> ModelSpec:
    """The ModelSpec a Hugging Face config describes. ``source`` names the file in errors."""
    model_type = config.get("model_type")
    builder = _SPEC_BUILDERS.get(model_type) if isinstance(model_type, str) else None
    if builder is None:
        raise HFImportError(
            f"{source}: model_type {model_type!r} is not supported; supported model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (check that {CONFIG_FILE} belongs to a GPT-2 or GPT-NeoX/Pythia model)"
        )
    try:
        return builder(config, str(source))
    except SpecError as e:
        raise HFImportError(f"{source}: describes a model jaxinduct cannot represent: {e}") from None


def _gpt2_spec(config: Mapping[str, Any], source: str) -> ModelSpec:
    c = {**GPT2_DEFAULTS, **config}
    # Both change the attention logits' scale in ways the canonical forward pass does not model.
    if not c["scale_attn_weights"]:
        raise HFImportError(f"{source}: scale_attn_weights is false (unscaled attention logits): not supported")
    if c["scale_attn_by_inverse_layer_idx"]:
        raise HFImportError(f"{source}: scale_attn_by_inverse_layer_idx is true, which is not supported")
    d_model = _positive_int(c, "n_embd", source)
    n_heads = _divisor(c, "n_head", d_model, "n_embd", source)
    d_vocab = _positive_int(c, "vocab_size", source)
    n_inner = c["n_inner"]
    return ModelSpec(
        d_vocab=d_vocab,
        d_model=d_model,
        n_layers=_positive_int(c, "n_layer", source),
        n_heads=n_heads,
        d_head=d_model // n_heads,
        n_ctx=_positive_int(c, "n_positions", source),
        d_mlp=4 * d_model if n_inner is None else _positive_int(c, "n_inner", source),
        positional="learned",
        norm="layernorm",
        norm_eps=_positive_number(c, "layer_norm_epsilon", source),
        activation=_activation(c, "activation_function", source),
        bos_token_id=_bos_token_id(c, d_vocab),
    )


def _neox_spec(config: Mapping[str, Any], source: str) -> ModelSpec:
    c = {**NEOX_DEFAULTS, **config}
    d_model = _positive_int(c, "hidden_size", source)
    n_heads = _divisor(c, "num_attention_heads", d_model, "hidden_size", source)
    d_head = d_model // n_heads
    d_vocab = _positive_int(c, "vocab_size", source)
    factor, base = _neox_rotary(c, source)
    parallel = c["use_parallel_residual"]
    if not isinstance(parallel, bool):
        raise HFImportError(f"{source}: use_parallel_residual must be true or false, got {parallel!r}")
    return ModelSpec(
        d_vocab=d_vocab,
        d_model=d_model,
        n_layers=_positive_int(c, "num_hidden_layers", source),
        n_heads=n_heads,
        d_head=d_head,
        n_ctx=_positive_int(c, "max_position_embeddings", source),
        d_mlp=_positive_int(c, "intermediate_size", source),
        positional="rotary",
        rotary_dim=int(d_head * factor),  # truncation, as transformers computes rotary_ndims
        rotary_base=base,
        norm="layernorm",
        norm_eps=_positive_number(c, "layer_norm_eps", source),
        parallel_attn_mlp=parallel,
        activation=_activation(c, "hidden_act", source),
        bos_token_id=_bos_token_id(c, d_vocab),
    )


def _neox_rotary(c: Mapping[str, Any], source: str) -> tuple[float, float]:
    """(partial_rotary_factor, rope base), resolved as transformers 5.24's GPTNeoXConfig does.

    transformers 5 writes ``rope_parameters: {rope_type, rope_theta, partial_rotary_factor}``;
    transformers 4 (and Pythia's configs on the Hub) wrote top-level ``rotary_pct`` and
    ``rotary_emb_base``, next to a ``rope_scaling`` that is usually null. The dict wins,
    the transformers-4 names fill what it lacks, then the defaults 0.25 and 10000.
    """
    params = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise HFImportError(f"{source}: rope_parameters must be one flat object of rotary settings, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise HFImportError(
            f"{source}: rope_type {rope_type!r} (scaled rotary) is not supported; only the default rotary embedding is"
        )
    resolved = {
        "partial_rotary_factor": params.get("partial_rotary_factor", c.get("rotary_pct", NEOX_DEFAULT_ROTARY_FACTOR)),
        "rope_theta": params.get("rope_theta", c.get("rotary_emb_base", NEOX_DEFAULT_ROTARY_BASE)),
    }
    for name, value in resolved.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise HFImportError(f"{source}: {name} must be a positive number, got {value!r}")
        # transformers 5.24 ignores these two names at the top level of a gpt_neox config;
        # if one disagrees with what it does use, the file is ambiguous, so ask rather than guess.
        stray = c.get(name)
        if stray is not None and stray != value:
            raise HFImportError(
                f"{source}: top-level {name}={stray!r} contradicts the value transformers uses ({value!r}, from "
                f"rope_parameters, rotary_pct/rotary_emb_base or the default); put the intended value in "
                f"rope_parameters.{name} and remove the top-level field"
            )
    factor, base = resolved["partial_rotary_factor"], resolved["rope_theta"]
    if factor > 1:
        raise HFImportError(f"{source}: partial_rotary_factor must be at most 1, got {factor}")
    return float(factor), float(base)


_SPEC_BUILDERS: dict[str, Callable[[Mapping[str, Any], str], ModelSpec]] = {
    "gpt2": _gpt2_spec,
    "gpt_neox": _neox_spec,
}


def _positive_int(c: Mapping[str, Any], key: str, source: str) -> int:
    value = c.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "is missing" if key not in c else f"must be a positive integer, got {value!r}"
        raise HFImportError(f"{source}: field {key} {what}; fix {CONFIG_FILE}")
    return value


def _divisor(c: Mapping[str, Any], key: str, total: int, total_key: str, source: str) -> int:
    value = _positive_int(c, key, source)
    if total % value:
        raise HFImportError(f"{source}: {total_key}={total} is not divisible by {key}={value}; fix {CONFIG_FILE}")
    return value


def _positive_number(c: Mapping[str, Any], key: str, source: str) -> float:
    value = c.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HFImportError(f"{source}: field {key} must be a positive number, got {value!r}; fix {CONFIG_FILE}")
    return float(value)


def _activation(c: Mapping[str, Any], key: str, source: str) -> Activation:
    name = c.get(key)
    if name not in ACTIVATIONS:
        raise HFImportError(
            f"{source}: {key} {name!r} is not supported; supported activations are {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def _bos_token_id(c: Mapping[str, Any], d_vocab: int) -> int | None:
    # GPT2Config writes its default 50256 whatever the vocabulary (transformers only warns):
    # an id outside the vocabulary can never be embedded, so it names no usable BOS token.
    value = c.get("bos_token_id")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < d_vocab:
        return None
    return value


# ---------------------------------------------------------------------------------------------
# safetensors files


@dataclasses.dataclass(frozen=True)
class _TensorFiles:
    """Where each tensor of a checkpoint lives, and a checked reader for them (stored dtype)."""

    location: dict[str, Path]  # tensor name -> the safetensors file holding it
    listing: Path  # the file that lists the tensors (model.safetensors or the index)
    config_path: Path

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` in its stored dtype (float64 as float32), after checking it has the
        shape config.json implies."""
        if name not in self.location:
            raise HFImportError(
                f"{self.listing}: no tensor {name!r}, which the model that {self.config_path} describes needs; "
                f"the checkpoint is incomplete or {CONFIG_FILE} belongs to another model: {RESAVE_HINT}, "
                f"or fix {CONFIG_FILE}"
            )
        path = self.location[name]
        try:
            with safe_open(str(path), framework="np") as f:
                if name not in f.keys():
                    raise HFImportError(
                        f"{path}: no tensor {name!r}, though {self.listing} lists it there; the shards do not "
                        f"match their index: {RESAVE_HINT}"
                    )
                meta = f.get_slice(name)
                found, dtype = tuple(meta.get_shape()), meta.get_dtype()
                if found != shape:
                    raise HFImportError(
                        f"{path}: tensor {name!r} has shape {found}, but {self.config_path} implies {shape}; "
                        f"{CONFIG_FILE} does not describe these weights: fix it, or pair the weights with their own "
                        f"{CONFIG_FILE}"
                    )
                # safetensors' numpy reader refuses BF16: read its raw bits as ml_dtypes' bfloat16.
                array = _read_bf16(path, name) if dtype == "BF16" else f.get_tensor(name)
        except SafetensorError as e:
            raise HFImportError(f"{path}: not a readable safetensors file ({e}); {RESAVE_HINT}") from None
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16):
            raise HFImportError(f"{path}: tensor {name!r} has dtype {dtype}, expected floating point weights")
        return array.astype(np.float32) if array.dtype.itemsize > 4 else array


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """A BF16 tensor as an ml_dtypes bfloat16 array (numpy has no bfloat16 of its own)."""
    # safetensors layout: little-endian u64 header size, JSON header, then the data buffer.
    with path.open("rb") as fh:
        (header_size,) = struct.unpack("<Q", fh.read(8))
        entry = json.loads(fh.read(header_size))[name]
    start, end = entry["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + header_size + start)
    return raw.view(ml_dtypes.bfloat16).reshape(entry["shape"])


def _open_tensor_files(model_dir: Path, config_path: Path) -> _TensorFiles:
    # transformers' own order: a single model.safetensors before a sharded index.
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="np") as f:
                names = list(f.keys())
        except SafetensorError as e:
            raise HFImportError(f"{single}: not a readable safetensors file ({e}); {RESAVE_HINT}") from None
        return _TensorFiles({n: single for n in names}, single, config_path)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        return _TensorFiles(_read_index(index), index, config_path)
    pickles = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise HFImportError(
            f"{model_dir}: holds only pickle-based weights ({', '.join(pickles)}) and no {SAFETENSORS_FILE}; "
            "jaxinduct refuses to unpickle them, since loading a pickle can run arbitrary code. Convert them once, "
            "in an environment where you trust the file: load the model with transformers "
            "(AutoModelForCausalLM.from_pretrained(dir)) and save_pretrained(dir, safe_serialization=True), "
            f"which writes {SAFETENSORS_FILE}"
        )
    raise HFImportError(
        f"{model_dir}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; point at a directory written by "
        "save_pretrained(dir, safe_serialization=True)"
    )


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFImportError(f"{index}: not a safetensors index with a weight_map ({e!r}); {RESAVE_HINT}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFImportError(f"{index}: weight_map must map tensor names to shard file names; {RESAVE_HINT}")
    location = {}
    for name, shard in weight_map.items():
        path = index.parent / shard
        # Shards sit next to their index; a path that leaves the directory is not one.
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise HFImportError(f"{index}: tensor {name!r} maps to {shard!r}, not a .safetensors file beside the index")
        if not path.is_file():
            raise HFImportError(f"{index}: lists shard {shard} (for tensor {name!r}), which is missing; {RESAVE_HINT}")
        location[name] = path
    return location


# ---------------------------------------------------------------------------------------------
# Tensors -> canonical arrays


def load_hf_weights(model_dir: str | os.PathLike[str]) -> Weights:
    """Canonical numpy Weights from a Hugging Face GPT-2 or GPT-NeoX model directory, each
    tensor in its stored dtype (module doc); the zero biases the format leaves out in W_E's."""
    model_dir = Path(model_dir)
    config = read_hf_config(model_dir)
    config_path = model_dir / CONFIG_FILE
    spec = spec_from_hf_config(config, source=config_path)
    files = _open_tensor_files(model_dir, config_path)
    convert = _gpt2_arrays if config["model_type"] == "gpt2" else _neox_arrays
    return make_weights(spec, convert(files, spec, config))


Arrays = dict[str, np.ndarray]


def _gpt2_arrays(files: _TensorFiles, spec: ModelSpec, config: Mapping[str, Any]) -> Arrays:
    D, V = spec.d_model, spec.d_vocab
    # GPT2LMHeadModel saves "transformer.wte.weight", a bare GPT2Model "wte.weight".
    p = "" if "transformer.wte.weight" not in files and "wte.weight" in files else "transformer."
    W_E = files.read(f"{p}wte.weight", (V, D))
    if config.get("tie_word_embeddings", GPT2_DEFAULTS["tie_word_embeddings"]):
        W_U = W_E.T.copy()
    else:
        W_U = files.read("lm_head.weight", (V, D)).T.copy()
    layers = _stacked_layers(spec.n_layers, lambda i: _gpt2_layer(files, spec, f"{p}h.{i}."))
    return {
        "W_E": W_E,
        "W_pos": files.read(f"{p}wpe.weight", (spec.n_ctx, D)),
        "ln_final_w": files.read(f"{p}ln_f.weight", (D,)),
        "ln_final_b": files.read(f"{p}ln_f.bias", (D,)),
        "W_U": W_U,
        "b_U": np.zeros(V, W_E.dtype),
        **layers,
    }


def _gpt2_layer(files: _TensorFiles, spec: ModelSpec, p: str) -> Arrays:
    D, H, E = spec.d_model, spec.n_heads, spec.d_head
    assert spec.d_mlp is not None
    M = spec.d_mlp
    # Conv1D is [in, out]; the 3D output columns are [Q | K | V], each H heads of E.
    qkv = files.read(f"{p}attn.c_attn.weight", (D, 3 * D)).reshape(D, 3, H, E).transpose(1, 2, 0, 3)
    qkv_b = files.read(f"{p}attn.c_attn.bias", (3 * D,)).reshape(3, H, E)
    return {
        "W_Q": qkv[0], "W_K": qkv[1], "W_V": qkv[2],
        "b_Q": qkv_b[0], "b_K": qkv_b[1], "b_V": qkv_b[2],
        # c_proj's input rows are the concatenated heads' outputs: (head, e).
        "W_O": files.read(f"{p}attn.c_proj.weight", (D, D)).reshape(H, E, D),
        "b_O": files.read(f"{p}attn.c_proj.bias", (D,)),
        "ln1_w": files.read(f"{p}ln_1.weight", (D,)),
        "ln1_b": files.read(f"{p}ln_1.bias", (D,)),
        "ln2_w": files.read(f"{p}ln_2.weight", (D,)),
        "ln2_b": files.read(f"{p}ln_2.bias", (D,)),
        "W_in": files.read(f"{p}mlp.c_fc.weight", (D, M)),
        "b_in": files.read(f"{p}mlp.c_fc.bias", (M,)),
        "W_out": files.read(f"{p}mlp.c_proj.weight", (M, D)),
        "b_out": files.read(f"{p}mlp.c_proj.bias", (D,)),
    }  # fmt: skip


def _neox_arrays(files: _TensorFiles, spec: ModelSpec, config: Mapping[str, Any]) -> Arrays:
    D, V = spec.d_model, spec.d_vocab
    # GPTNeoXForCausalLM saves "gpt_neox.embed_in.weight", a bare GPTNeoXModel "embed_in.weight".
    p = "" if "gpt_neox.embed_in.weight" not in files and "embed_in.weight" in files else "gpt_neox."
    W_E = files.read(f"{p}embed_in.weight", (V, D))
    tied = config.get("tie_word_embeddings", NEOX_DEFAULTS["tie_word_embeddings"])
    W_U = (W_E if tied else files.read("embed_out.weight", (V, D))).T.copy()  # nn.Linear: [V, D]
    with_bias = bool(config.get("attention_bias", NEOX_DEFAULTS["attention_bias"]))
    layers = _stacked_layers(spec.n_layers, lambda i: _neox_layer(files, spec, f"{p}layers.{i}.", with_bias))
    return {
        "W_E": W_E,
        "ln_final_w": files.read(f"{p}final_layer_norm.weight", (D,)),
        "ln_final_b": files.read(f"{p}final_layer_norm.bias", (D,)),
        "W_U": W_U,
        "b_U": np.zeros(V, W_E.dtype),
        **layers,
    }


def _neox_layer(files: _TensorFiles, spec: ModelSpec, p: str, with_bias: bool) -> Arrays:
    D, H, E = spec.d_model, spec.n_heads, spec.d_head
    assert spec.d_mlp is not None
    M = spec.d_mlp
    # nn.Linear is [out, in]; the 3D output rows are per head (q, k, v): [H, 3, E, D].
    qkv = files.read(f"{p}attention.query_key_value.weight", (3 * D, D)).reshape(H, 3, E, D).transpose(1, 0, 3, 2)
    if with_bias:
        qkv_b = files.read(f"{p}attention.query_key_value.bias", (3 * D,)).reshape(H, 3, E).transpose(1, 0, 2)
        b_O = files.read(f"{p}attention.dense.bias", (D,))
    else:
        dtype = qkv.dtype
        qkv_b, b_O = np.zeros((3, H, E), dtype), np.zeros(D, dtype)
    return {
        "W_Q": qkv[0], "W_K": qkv[1], "W_V": qkv[2],
        "b_Q": qkv_b[0], "b_K": qkv_b[1], "b_V": qkv_b[2],
        # dense's input columns are the concatenated heads' outputs: (head, e).
        "W_O": files.read(f"{p}attention.dense.weight", (D, D)).T.reshape(H, E, D),
        "b_O": b_O,
        "ln1_w": files.read(f"{p}input_layernorm.weight", (D,)),
        "ln1_b": files.read(f"{p}input_layernorm.bias", (D,)),
        "ln2_w": files.read(f"{p}post_attention_layernorm.weight", (D,)),
        "ln2_b": files.read(f"{p}post_attention_layernorm.bias", (D,)),
        "W_in": files.read(f"{p}mlp.dense_h_to_4h.weight", (M, D)).T,
        "b_in": files.read(f"{p}mlp.dense_h_to_4h.bias", (M,)),
        "W_out": files.read(f"{p}mlp.dense_4h_to_h.weight", (D, M)).T,
        "b_out": files.read(f"{p}mlp.dense_4h_to_h.bias", (D,)),
    }  # fmt: skip


def _stacked_layers(n_layers: int, read_layer: Callable[[int], Arrays]) -> Arrays:
    """Each layer's arrays written into one array per name with a leading layer axis, a layer
    at a time: reading holds the stacked checkpoint and one layer, never every layer twice
    (which at Pythia-1.4B's size was 5.6 GB for a 2.8 GB checkpoint)."""
    stacked: Arrays = {}
    for i in range(n_layers):
        for name, array in read_layer(i).items():
            if name not in stacked:
                stacked[name] = np.empty((n_layers, *array.shape), array.dtype)
            stacked[name][i] = array
    return stacked
