"""Canonical Weights and ModelSpec: validation, pytree behaviour, stacking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinduct.errors import SpecError
from jaxinduct.model.weights import (
    ModelSpec,
    NormKind,
    PositionalScheme,
    Weights,
    expected_shapes,
    init_random_weights,
    make_weights,
    stack_weights,
    unstack_weights,
)

SPEC = ModelSpec(d_vocab=11, d_model=8, n_layers=3, n_heads=2, d_head=4, n_ctx=6, d_mlp=16)


def test_spec_is_hashable_and_round_trips_through_dict():
    spec = ModelSpec(d_vocab=5, d_model=4, n_layers=1, n_heads=1, d_head=4, n_ctx=3, positional="rotary", rotary_dim=2)
    assert spec.positional is PositionalScheme.ROTARY and spec.norm is NormKind.LAYERNORM
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert hash(ModelSpec.from_dict(spec.to_dict())) == hash(spec)
    # Equal specs serialise identically (run ids and store keys hash the dict).
    as_int = ModelSpec(d_vocab=5, d_model=4, n_layers=1, n_heads=1, d_head=4, n_ctx=3, rotary_base=10000, norm_eps=1)
    as_float = ModelSpec(d_vocab=5, d_model=4, n_layers=1, n_heads=1, d_head=4, n_ctx=3, rotary_base=10000.0, norm_eps=1.0)
    assert as_int.to_dict() == as_float.to_dict() and isinstance(as_int.rotary_base, float)
    # Rotary defaults to the full head width.
    full = ModelSpec(d_vocab=5, d_model=4, n_layers=1, n_heads=1, d_head=4, n_ctx=3, positional="rotary")
    assert full.rotary_dim == 4


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(d_model=0), "d_model must be a positive integer"),
        (dict(positional="rotary", rotary_dim=3), "rotary_dim must be even"),
        (dict(positional="rotary", rotary_dim=6), r"rotary_dim must be even and in \[2, d_head=4\]"),
        (dict(rotary_dim=2), "rotary_dim is set but the positional scheme is 'learned'"),
        (dict(d_mlp=None, parallel_attn_mlp=True), "parallel_attn_mlp needs an MLP"),
        (dict(bos_token_id=11), "bos_token_id 11 is outside the vocabulary"),
        (dict(positional="alibi"), "positional must be one of none, learned, shortformer, rotary; got 'alibi'"),
        (dict(norm="layer_norm"), "norm must be one of none, layernorm, rmsnorm"),
        (dict(d_mlp=16.5), "d_mlp must be an integer or None"),
        (dict(norm_eps=0), "norm_eps must be a positive number"),
        (dict(n_heads=True), "n_heads must be a positive integer"),
    ],
)
def test_invalid_specs_are_rejected_with_a_clear_message(fields, message):
    base = dict(d_vocab=11, d_model=8, n_layers=3, n_heads=2, d_head=4, n_ctx=6, d_mlp=16)
    with pytest.raises(SpecError, match=message):
        ModelSpec(**{**base, **fields})


def test_unknown_spec_fields_are_named():
    with pytest.raises(SpecError, match=r"unknown ModelSpec fields \['n_kv_heads'\]"):
        ModelSpec.from_dict({**SPEC.to_dict(), "n_kv_heads": 2})


def test_expected_shapes_follow_the_architecture():
    rms_attn_only = ModelSpec(d_vocab=11, d_model=8, n_layers=3, n_heads=2, d_head=4, n_ctx=6, norm="rmsnorm", positional="none")
    shapes = expected_shapes(rms_attn_only)
    assert shapes["W_Q"] == (3, 2, 8, 4) and shapes["W_O"] == (3, 2, 4, 8)
    assert "ln1_w" in shapes and "ln1_b" not in shapes and "ln2_w" not in shapes
    assert "W_pos" not in shapes and "W_in" not in shapes
    full = expected_shapes(SPEC)
    assert full["W_pos"] == (6, 8) and full["W_in"] == (3, 8, 16) and full["ln2_b"] == (3, 8)


def test_make_weights_names_the_offending_tensor():
    arrays = init_random_weights(SPEC, 0).arrays()
    with pytest.raises(SpecError, match=r"missing tensors \['W_K'\]"):
        make_weights(SPEC, {k: v for k, v in arrays.items() if k != "W_K"})
    with pytest.raises(SpecError, match=r"tensor W_O has shape \(3, 2, 8, 4\), expected \(3, 2, 4, 8\)"):
        make_weights(SPEC, {**arrays, "W_O": jnp.zeros((3, 2, 8, 4))})
    no_mlp = ModelSpec(d_vocab=11, d_model=8, n_layers=3, n_heads=2, d_head=4, n_ctx=6)
    with pytest.raises(SpecError, match=r"tensors \['W_in', 'W_out', 'b_in', 'b_out'\] are given but"):
        make_weights(no_mlp, {k: v for k, v in arrays.items() if not k.startswith("ln2")})
    with pytest.raises(SpecError, match=r"unknown tensor names \['W_gate'\]"):
        make_weights(SPEC, {**arrays, "W_gate": jnp.zeros(3)})


def test_weights_are_a_pytree_with_a_static_spec():
    weights = init_random_weights(SPEC, 1)
    leaves, treedef = jax.tree_util.tree_flatten(weights)
    assert len(leaves) == len(expected_shapes(SPEC))
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.spec == SPEC
    # jit specialises on the spec instead of tracing it.
    total = jax.jit(lambda w: w.W_Q.sum() * w.spec.n_heads)(weights)
    np.testing.assert_allclose(total, np.asarray(weights.W_Q).sum() * 2, rtol=1e-6)
    with pytest.raises(AttributeError):
        weights.W_Q = None  # frozen


def test_stack_and_unstack_are_inverse():
    checkpoints = [init_random_weights(SPEC, seed) for seed in range(4)]
    stacked = stack_weights(checkpoints)
    assert stacked.W_Q.shape == (4, 3, 2, 8, 4) and stacked.spec == SPEC
    for original, back in zip(checkpoints, unstack_weights(stacked)):
        for name, arr in original.arrays().items():
            np.testing.assert_array_equal(arr, getattr(back, name))
    other = ModelSpec(d_vocab=11, d_model=8, n_layers=3, n_heads=2, d_head=4, n_ctx=7, d_mlp=16)
    with pytest.raises(SpecError, match="checkpoint 1 has spec"):
        stack_weights([checkpoints[0], init_random_weights(other, 0)])


def test_make_weights_accepts_a_ckpt_axis():
    stacked = stack_weights([init_random_weights(SPEC, s) for s in range(2)])
    again = make_weights(SPEC, stacked.arrays(), batch_dims=1)
    assert isinstance(again, Weights) and again.W_E.shape == (2, 11, 8)
    with pytest.raises(SpecError, match="leading dims"):
        make_weights(SPEC, {**stacked.arrays(), "W_E": jnp.zeros((3, 11, 8))}, batch_dims=1)
