"""The NNX reference model's layout <-> canonical Weights, live and through Orbax."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxinduct.errors import SpecError
from jaxinduct.model.nnx import (
    Transformer,
    model_from_weights,
    model_to_weights,
    nnx_params_to_weights,
    weights_to_nnx_params,
)
from jaxinduct.model.weights import ModelSpec, init_random_weights

SPECS = {
    "attn-only-learned": ModelSpec(d_vocab=13, d_model=8, n_layers=2, n_heads=2, d_head=4, n_ctx=7),
    "neox": ModelSpec(
        d_vocab=13, d_model=8, n_layers=3, n_heads=2, d_head=4, n_ctx=7, d_mlp=12, positional="rotary",
        rotary_dim=2, parallel_attn_mlp=True, activation="gelu",
    ),  # fmt: skip
    "rms-shortformer": ModelSpec(
        d_vocab=13, d_model=8, n_layers=1, n_heads=4, d_head=2, n_ctx=7, d_mlp=12, positional="shortformer", norm="rmsnorm"
    ),
    "no-norm": ModelSpec(d_vocab=13, d_model=8, n_layers=2, n_heads=2, d_head=4, n_ctx=7, norm="none", positional="none"),
}


def assert_same_weights(a, b):
    assert a.spec == b.spec
    assert sorted(a.arrays()) == sorted(b.arrays())
    for name, arr in a.arrays().items():
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(getattr(b, name)), err_msg=name)


@pytest.mark.parametrize("name", SPECS)
def test_weights_to_model_and_back_is_lossless(name):
    weights = init_random_weights(SPECS[name], 3)
    assert_same_weights(model_to_weights(model_from_weights(weights)), weights)


@pytest.mark.parametrize("name", SPECS)
def test_model_params_to_weights_and_back_is_lossless(name):
    model = Transformer(SPECS[name], rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    back = weights_to_nnx_params(nnx_params_to_weights(SPECS[name], params))
    flat_a = nnx.traversals.flatten_mapping(params)
    flat_b = nnx.traversals.flatten_mapping(back)
    assert sorted(flat_a) == sorted(flat_b)
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])


def test_layout_survives_an_orbax_round_trip(tmp_path):
    spec = SPECS["neox"]
    weights = init_random_weights(spec, 4)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(7, args=ocp.args.StandardSave(weights_to_nnx_params(weights)))
    with ocp.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(7, args=ocp.args.StandardRestore())
    # Orbax hands list entries back under string keys; the converter accepts both.
    assert set(restored["blocks"]) == {"0", "1", "2"}
    assert_same_weights(nnx_params_to_weights(spec, restored), weights)


def test_missing_params_are_named():
    spec = SPECS["attn-only-learned"]
    params = weights_to_nnx_params(init_random_weights(spec, 0))
    del params["blocks"][1]["attn"]["key"]
    with pytest.raises(SpecError, match="nnx params lack attn/key"):
        nnx_params_to_weights(spec, params)
    del params["blocks"][1]
    with pytest.raises(SpecError, match="no block 1"):
        nnx_params_to_weights(spec, params)


def test_model_rejects_sequences_longer_than_its_context():
    model = Transformer(SPECS["attn-only-learned"], rngs=nnx.Rngs(0))
    with pytest.raises(SpecError, match="exceeds"):
        model(jnp.zeros((1, 8), jnp.int32))
