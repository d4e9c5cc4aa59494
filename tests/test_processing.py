"""Weight processing changes how the weights look, never what the model computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinduct.model.forward import forward
from jaxinduct.model.processing import process_weights
from jaxinduct.model.weights import ModelSpec, init_random_weights

forward = jax.jit(forward, static_argnames=("return_patterns",))

ARCHITECTURES = {
    "gpt2-like": dict(positional="learned", norm="layernorm", d_mlp=24),
    "pythia-like": dict(positional="rotary", rotary_dim=4, norm="layernorm", d_mlp=24, parallel_attn_mlp=True, activation="gelu"),
    "attn-only-ln": dict(positional="learned", norm="layernorm"),
    "rmsnorm-mlp": dict(positional="rotary", norm="rmsnorm", d_mlp=24, activation="silu"),
    "shortformer-ln": dict(positional="shortformer", norm="layernorm", d_mlp=24),
    "no-norm": dict(positional="learned", norm="none", d_mlp=24, activation="relu"),
}


def spec_for(name):
    return ModelSpec(d_vocab=19, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=10, **ARCHITECTURES[name])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_processing_preserves_patterns_and_log_probs(name):
    spec = spec_for(name)
    weights = init_random_weights(spec, 5)
    processed = process_weights(weights)
    assert processed.spec == spec
    tokens = jax.random.randint(jax.random.key(0), (10,), 0, spec.d_vocab)
    clean = forward(weights, tokens, return_patterns=True)
    after = forward(processed, tokens, return_patterns=True)
    np.testing.assert_allclose(after.patterns, clean.patterns, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.nn.log_softmax(after.logits), jax.nn.log_softmax(clean.logits), rtol=1e-5, atol=1e-5
    )
    # Logits move only by a constant per position (the centred unembedding).
    shift = np.asarray(after.logits - clean.logits)
    np.testing.assert_allclose(shift, shift[:, :1] * np.ones_like(shift), atol=1e-5)


def test_processed_weights_have_the_documented_form():
    spec = spec_for("gpt2-like")
    processed = process_weights(init_random_weights(spec, 6))
    zero = dict(atol=1e-6)
    np.testing.assert_allclose(processed.ln1_w, 1.0)
    np.testing.assert_allclose(processed.ln1_b, 0.0)
    np.testing.assert_allclose(processed.ln_final_w, 1.0)
    np.testing.assert_allclose(processed.b_V, 0.0)
    np.testing.assert_allclose(processed.W_U.mean(axis=-1), 0.0, **zero)  # centred unembedding
    np.testing.assert_allclose(processed.W_E.mean(axis=-1), 0.0, **zero)  # centred writing weights
    np.testing.assert_allclose(processed.W_O.mean(axis=-1), 0.0, **zero)
    np.testing.assert_allclose(processed.W_out.mean(axis=-1), 0.0, **zero)
    np.testing.assert_allclose(processed.W_Q.mean(axis=-2), 0.0, **zero)  # centred reading weights
    np.testing.assert_allclose(processed.W_in.mean(axis=-2), 0.0, **zero)


def test_fold_by_hand_on_one_head():
    """ln1 scale and bias folded into W_Q, worked out explicitly for a 1-layer model."""
    spec = ModelSpec(d_vocab=7, d_model=4, n_layers=1, n_heads=1, d_head=2, n_ctx=5, positional="none")
    weights = init_random_weights(spec, 7)
    processed = process_weights(weights, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    W_Q = np.asarray(weights.W_Q[0, 0], np.float64)
    w, b = np.asarray(weights.ln1_w[0], np.float64), np.asarray(weights.ln1_b[0], np.float64)
    folded = np.diag(w) @ W_Q
    folded -= folded.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(processed.W_Q[0, 0], folded, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(processed.b_Q[0, 0], np.asarray(weights.b_Q[0, 0]) + b @ W_Q, rtol=1e-6, atol=1e-6)


def test_shortformer_keeps_ln1_unfolded():
    spec = spec_for("shortformer-ln")
    weights = init_random_weights(spec, 8)
    processed = process_weights(weights)
    np.testing.assert_array_equal(processed.ln1_w, weights.ln1_w)
    np.testing.assert_array_equal(processed.W_pos, weights.W_pos)
    np.testing.assert_allclose(processed.ln2_w, 1.0)
