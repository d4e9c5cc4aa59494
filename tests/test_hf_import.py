"""Hugging Face importer: jaxinduct's forward pass on imported weights against transformers' own.

Every model is built offline from a small config, given random values in *every* parameter
(HF initialises biases to zero and norm scales to one, which would hide a bias or norm
layout mistake), saved with ``save_pretrained(dir, safe_serialization=True)`` and reloaded
by transformers from that directory, so both sides read the same files.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
)

from jaxinduct.errors import JaxInductError
from jaxinduct.model.forward import forward
from jaxinduct.checkpoints.hf_weights import HFImportError, load_hf_weights, read_hf_config, spec_from_hf_config
from jaxinduct.model.weights import ModelSpec, stack_weights
from jaxinduct.scores.batched import score_all
from jaxinduct.scores.probes import ProbeConfig, make_probes

SEQ = 12
BATCH = 2

# Jitted once per spec: eager calls would re-trace the layer scan every time.
forward = jax.jit(forward, static_argnames=("return_patterns",))


def gpt2_config(**overrides):
    return GPT2Config(**{**dict(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32), **overrides})


def neox_config(**overrides):
    base = dict(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, rotary_pct=0.25, use_parallel_residual=True,
    )  # fmt: skip
    return GPTNeoXConfig(**{**base, **overrides})


def randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters are listed once
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(0.3 * noise)
            elif name.endswith("weight"):  # only norms have 1-d weights
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def save_model(directory: Path, config, seed: int = 0) -> Path:
    model_cls = GPT2LMHeadModel if isinstance(config, GPT2Config) else GPTNeoXForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize(model, seed)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def assert_matches_transformers(model_dir: Path, seed: int) -> None:
    weights = load_hf_weights(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = np.random.default_rng(seed).integers(0, weights.spec.d_vocab, size=(BATCH, SEQ))
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens), output_attentions=True)
    for b in range(BATCH):
        ours = forward(weights, jnp.asarray(tokens[b]), return_patterns=True)
        hf_patterns = np.stack([layer[b].numpy() for layer in out.attentions])
        np.testing.assert_allclose(ours.logits, out.logits[b].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours.patterns, hf_patterns, atol=1e-4, rtol=0)
    # The comparison is not vacuous: patterns are far from uniform and logits far from zero.
    assert np.abs(np.diff(hf_patterns[:, :, -1, :], axis=-1)).max() > 0.05
    assert np.abs(out.logits.numpy()).max() > 0.5


PARITY_CASES = [
    pytest.param(
        gpt2_config(),
        # GPT2Config's default bos_token_id 50256 lies outside this vocabulary: no usable BOS.
        dict(d_vocab=50, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=32, d_mlp=64, positional="learned",
             norm_eps=1e-5, activation="gelu_new", bos_token_id=None),
        id="gpt2-tied",
    ),
    pytest.param(
        gpt2_config(n_layer=3, n_head=4, vocab_size=40, n_positions=16, n_inner=24, activation_function="relu",
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, layer_norm_epsilon=1e-4),
        dict(d_vocab=40, d_model=16, n_layers=3, n_heads=4, d_head=4, n_ctx=16, d_mlp=24, positional="learned",
             norm_eps=1e-4, activation="relu", bos_token_id=1),
        id="gpt2-untied-relu",
    ),
    pytest.param(
        neox_config(),  # Pythia's shape: rotary on a quarter of each head, parallel residual
        dict(d_vocab=50, d_model=32, n_layers=2, n_heads=2, d_head=16, n_ctx=32, d_mlp=48, positional="rotary",
             rotary_dim=4, rotary_base=10000.0, parallel_attn_mlp=True, activation="gelu", bos_token_id=0),
        id="neox-rotary0.25-parallel",
    ),
    pytest.param(
        neox_config(num_attention_heads=4, rotary_pct=1.0, rotary_emb_base=100, use_parallel_residual=False,
                    tie_word_embeddings=True, attention_bias=False, hidden_act="gelu_new"),
        dict(d_vocab=50, d_model=32, n_layers=2, n_heads=4, d_head=8, n_ctx=32, d_mlp=48, positional="rotary",
             rotary_dim=8, rotary_base=100.0, parallel_attn_mlp=False, activation="gelu_new", bos_token_id=0),
        id="neox-rotary1.0-sequential-tied-nobias",
    ),
]  # fmt: skip


@pytest.mark.parametrize("config,spec_fields", PARITY_CASES)
def test_imported_weights_reproduce_transformers_logits_and_patterns(tmp_path, config, spec_fields):
    model_dir = save_model(tmp_path / "model", config, seed=1)
    assert spec_from_hf_config(read_hf_config(model_dir)) == ModelSpec(**spec_fields)
    weights = load_hf_weights(model_dir)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in weights.arrays().values())
    assert_matches_transformers(model_dir, seed=2)


def test_transformers4_style_neox_config_as_on_the_hub(tmp_path):
    """Pythia's config.json on the Hub spells the rotary settings rotary_pct / rotary_emb_base."""
    model_dir = save_model(tmp_path / "model", neox_config(rotary_pct=0.5, rotary_emb_base=100), seed=3)
    edit_config(model_dir, rope_parameters=..., rope_scaling=None, rotary_pct=0.5, rotary_emb_base=100)
    spec = load_hf_weights(model_dir).spec
    assert (spec.rotary_dim, spec.rotary_base) == (8, 100.0)
    assert_matches_transformers(model_dir, seed=4)


NEOX_ROTARY_VARIANTS = [
    pytest.param({"rope_parameters": {"rope_type": "default", "rope_theta": 500, "partial_rotary_factor": 0.5}},
                 (8, 500.0), id="transformers5-rope_parameters"),
    pytest.param({"rotary_pct": 0.5, "rotary_emb_base": 500, "rope_scaling": None}, (8, 500.0), id="transformers4"),
    pytest.param({"rope_parameters": {"rope_type": "default", "rope_theta": 500}, "rotary_pct": 1.0},
                 (16, 500.0), id="mixed"),
    pytest.param({}, (4, 10000.0), id="defaults-quarter"),  # GPTNeoXConfig's default is 0.25, not 1
    pytest.param({"rotary_pct": 0.3}, (4, 10000.0), id="truncated"),  # int(16 * 0.3)
]  # fmt: skip


@pytest.mark.parametrize("fields,expected", NEOX_ROTARY_VARIANTS)
def test_neox_rotary_fields_resolve_as_transformers_resolves_them(tmp_path, fields, expected):
    config = {
        "model_type": "gpt_neox", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 48, "max_position_embeddings": 32, **fields,
    }  # fmt: skip
    spec = spec_from_hf_config(config)
    assert (spec.rotary_dim, spec.rotary_base) == expected
    (tmp_path / "config.json").write_text(json.dumps(config))
    rope = AutoConfig.from_pretrained(tmp_path).rope_parameters
    assert (int(16 * rope["partial_rotary_factor"]), float(rope["rope_theta"])) == expected


def test_gpt2_names_without_the_transformer_prefix(tmp_path):
    """The Hub's gpt2 was saved from GPT2Model: "h.0.attn.c_attn.weight", not "transformer.h.0...."."""
    model_dir = save_model(tmp_path / "model", gpt2_config(), seed=5)
    prefixed = load_hf_weights(model_dir)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    assert "transformer.h.0.attn.c_attn.weight" in tensors  # what transformers 5.24 writes
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    bare = load_hf_weights(model_dir)
    for name, array in prefixed.arrays().items():
        np.testing.assert_array_equal(getattr(bare, name), array, err_msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_checkpoints_stay_half_and_widen_exactly(tmp_path, dtype):
    config = neox_config()
    full_dir = save_model(tmp_path / "full", config, seed=6)
    model = GPTNeoXForCausalLM.from_pretrained(full_dir, dtype=torch.float32).to(dtype)
    model.save_pretrained(tmp_path / "half", safe_serialization=True)
    full, half = load_hf_weights(full_dir), load_hf_weights(tmp_path / "half")
    stored = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.float16: np.dtype(np.float16)}[dtype]
    for name, array in full.arrays().items():
        rounded = torch.from_numpy(np.ascontiguousarray(array)).to(dtype).float().numpy()
        assert getattr(half, name).dtype == stored, name  # half the bytes on the host
        np.testing.assert_array_equal(getattr(half, name).astype(np.float32), rounded, err_msg=name)
    # Scored as stored, widened inside the program: the scores of the float32 widening, to float32
    # rounding (XLA may fuse the widening into the first products, which reorders a sum).
    probes = make_probes(half.spec, ProbeConfig(n_examples=4, block_len=6))
    widened = jax.tree.map(lambda x: np.asarray(x, np.float32), half)
    as_stored = score_all(stack_weights([half, half]), probes)
    as_float32 = score_all(stack_weights([widened, widened]), probes)
    for kind in ("head", "pair", "model"):
        for name, values in getattr(as_float32, kind).items():
            np.testing.assert_allclose(getattr(as_stored, kind)[name], values, rtol=1e-6, atol=1e-6, err_msg=name)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    config = neox_config()
    single_dir = save_model(tmp_path / "single", config, seed=7)
    model = GPTNeoXForCausalLM.from_pretrained(single_dir, dtype=torch.float32)
    sharded_dir = tmp_path / "sharded"
    model.save_pretrained(sharded_dir, safe_serialization=True, max_shard_size="4KB")
    assert not (sharded_dir / "model.safetensors").exists()
    assert len(list(sharded_dir.glob("model-*-of-*.safetensors"))) > 2
    single, sharded = load_hf_weights(single_dir), load_hf_weights(sharded_dir)
    for name, array in single.arrays().items():
        np.testing.assert_array_equal(getattr(sharded, name), array, err_msg=name)

    # A tensor the index does not list is reported against the index file.
    index_path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(HFImportError, match=r"model\.safetensors\.index\.json: no tensor 'gpt_neox\.layers\.1\.mlp"):
        load_hf_weights(sharded_dir)


def test_reading_needs_neither_torch_nor_transformers(tmp_path):
    model_dir = save_model(tmp_path / "model", neox_config(), seed=8)
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"  # any import now fails
        "from jaxinduct.checkpoints.hf_weights import load_hf_weights\n"
        f"print(load_hf_weights({str(model_dir)!r}).spec.rotary_dim)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"


# --- errors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("gpt2") / "model", gpt2_config(), seed=9)


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    target.mkdir()
    for f in model_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_missing_tensor_names_the_file_and_the_tensor(gpt2_dir, tmp_path):
    model_dir = copy_of(gpt2_dir, tmp_path)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["transformer.h.1.ln_2.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(HFImportError) as err:
        load_hf_weights(model_dir)
    message = str(err.value)
    assert str(path) in message and "'transformer.h.1.ln_2.weight'" in message
    assert "save_pretrained(dir, safe_serialization=True)" in message


@pytest.mark.parametrize(
    "config,change,tensor,found,expected",
    [
        (gpt2_config(), {"vocab_size": 60}, "transformer.wte.weight", (50, 16), (60, 16)),
        (neox_config(), {"intermediate_size": 40}, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight", (48, 32), (40, 32)),
    ],
    ids=["gpt2-vocab", "neox-mlp"],
)
def test_shape_contradicting_config_names_tensor_and_both_shapes(tmp_path, config, change, tensor, found, expected):
    model_dir = save_model(tmp_path / "model", config)
    edit_config(model_dir, **change)
    with pytest.raises(HFImportError) as err:
        load_hf_weights(model_dir)
    message = str(err.value)
    assert str(model_dir / "model.safetensors") in message and f"{tensor!r}" in message
    assert f"shape {found}" in message and f"implies {expected}" in message and "config.json" in message


def test_unknown_model_type_names_config_and_supported_types(gpt2_dir, tmp_path):
    model_dir = copy_of(gpt2_dir, tmp_path)
    edit_config(model_dir, model_type="llama")
    with pytest.raises(HFImportError, match=r"config\.json: model_type 'llama' is not supported.*gpt2, gpt_neox"):
        load_hf_weights(model_dir)
    with pytest.raises(HFImportError, match=r"config\.json: model_type None"):
        spec_from_hf_config({"vocab_size": 3})


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_only_directory_is_refused_without_unpickling(gpt2_dir, tmp_path):
    model_dir = copy_of(gpt2_dir, tmp_path)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(HFImportError) as err:
        load_hf_weights(model_dir)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "refuses to unpickle" in message
    assert "save_pretrained(dir, safe_serialization=True)" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"activation_function": "quick_gelu"}, r"activation_function 'quick_gelu' is not supported.*gelu_new"),
        ({"n_embd": 15}, r"n_embd=15 is not divisible by n_head=2"),
        ({"n_layer": ...}, r"field n_layer is missing; fix config\.json"),
        ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx is true"),
    ],
    ids=["activation", "heads", "missing-field", "attn-scaling"],
)
def test_unsupported_gpt2_configs_name_the_field(gpt2_dir, tmp_path, change, pattern):
    model_dir = copy_of(gpt2_dir, tmp_path)
    edit_config(model_dir, **change)
    with pytest.raises(HFImportError, match=r"config\.json: .*" + pattern):
        load_hf_weights(model_dir)


@pytest.mark.parametrize(
    "fields,pattern",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, r"rope_type 'linear' .* not supported"),
        ({"rope_theta": 500}, r"top-level rope_theta=500 contradicts the value transformers uses \(10000\.0"),
        ({"rotary_pct": 0.1}, r"cannot represent: rotary_dim must be even"),  # int(16 * 0.1) = 1
    ],
    ids=["scaled-rope", "ambiguous-theta", "odd-rotary-dim"],
)
def test_unsupported_neox_rotary_configs(fields, pattern):
    config = {
        "model_type": "gpt_neox", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 48, "max_position_embeddings": 32, **fields,
    }  # fmt: skip
    with pytest.raises(HFImportError, match=pattern):
        spec_from_hf_config(config)


def test_missing_or_unreadable_files(gpt2_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HFImportError, match=r"no config\.json; point at a directory written by save_pretrained"):
        load_hf_weights(empty)
    (empty / "config.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(HFImportError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_hf_weights(empty)
    (empty / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(HFImportError, match=r"model\.safetensors: not a readable safetensors file"):
        load_hf_weights(empty)
    assert issubclass(HFImportError, JaxInductError)
