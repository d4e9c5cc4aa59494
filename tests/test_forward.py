"""The forward pass against two independent computations, for every architectural variant.

1. The NNX reference model's own apply (flax layers, fused projections,
   jax.nn.dot_product_attention, complex rotary), on the same weights.
2. A float64 numpy reference that loops over heads and positions (tests/reference.py).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinduct.model import forward as forward_module
from jaxinduct.errors import SpecError
from jaxinduct.model.forward import forward
from jaxinduct.model.nnx import model_from_weights
from jaxinduct.model.weights import ModelSpec, init_random_weights
from tests.reference import reference_forward

POSITIONAL = [("none", None), ("learned", None), ("shortformer", None), ("rotary", 8), ("rotary", 4)]
NORMS = ["none", "layernorm", "rmsnorm"]
BLOCKS = [("attn_only", None, False), ("mlp", 24, False), ("parallel", 24, True)]
ACTIVATIONS = ["gelu_new", "gelu", "relu", "silu"]

# A pairwise covering design: every (positional, norm), (positional, block) and (norm, block)
# combination appears at least once, in 15 cases instead of the 45 of the full product.
VARIANTS = [
    pytest.param(
        index, pos, rotary_dim, norm, BLOCKS[(i + j) % 3], id=f"{pos}{rotary_dim or ''}-{norm}-{BLOCKS[(i + j) % 3][0]}"
    )
    for index, ((i, (pos, rotary_dim)), (j, norm)) in enumerate(
        itertools.product(enumerate(POSITIONAL), enumerate(NORMS))
    )
]
SEQ = 9

# Jitted once per (spec, shapes): eager calls would re-trace the layer scan every time.
forward = jax.jit(forward, static_argnames=("return_patterns", "return_head_outputs"))


def make_spec(pos, rotary_dim, norm, block, index=0):
    _, d_mlp, parallel = block
    return ModelSpec(
        d_vocab=23, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=12, d_mlp=d_mlp,
        positional=pos, rotary_dim=rotary_dim, norm=norm, parallel_attn_mlp=parallel,
        activation=ACTIVATIONS[index % len(ACTIVATIONS)], rotary_base=100.0,
    )  # fmt: skip


def tokens_for(spec, seed=0, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, spec.d_vocab)


# The two real architectures the importers target, spelled out.
GPT2_LIKE = dict(positional="learned", norm="layernorm", d_mlp=24, parallel_attn_mlp=False, activation="gelu_new")
PYTHIA_LIKE = dict(
    positional="rotary", rotary_dim=2, norm="layernorm", d_mlp=24, parallel_attn_mlp=True, activation="gelu"
)  # rotary_pct = 0.25 of d_head 8


def check_against_independent_implementations(spec, seed):
    weights = init_random_weights(spec, seed)
    tokens = tokens_for(spec, seed=seed)

    out = jax.jit(jax.vmap(lambda t: forward(weights, t, return_patterns=True)))(tokens)
    nnx_logits = nnx.jit(lambda model, t: model(t))(model_from_weights(weights), tokens)
    np.testing.assert_allclose(out.logits, nnx_logits, rtol=1e-5, atol=1e-5)

    for b in range(tokens.shape[0]):
        ref_logits, ref_patterns = reference_forward(weights, tokens[b])
        np.testing.assert_allclose(out.logits[b], ref_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.patterns[b], ref_patterns, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index,pos,rotary_dim,norm,block", VARIANTS)
def test_forward_matches_nnx_model_and_dense_reference(index, pos, rotary_dim, norm, block):
    check_against_independent_implementations(make_spec(pos, rotary_dim, norm, block, index), index)


@pytest.mark.parametrize("fields", [GPT2_LIKE, PYTHIA_LIKE], ids=["gpt2-like", "pythia-like"])
def test_importer_architectures_match_independent_implementations(fields):
    spec = ModelSpec(d_vocab=23, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=12, rotary_base=100.0, **fields)
    check_against_independent_implementations(spec, 99)


def test_rotary_matches_the_hugging_face_gpt_neox_formulation():
    """Patterns of a 1-layer rotary model against HF's rotate_half / cat(freqs, freqs) form."""
    spec = ModelSpec(
        d_vocab=23, d_model=16, n_layers=1, n_heads=2, d_head=8, n_ctx=12, positional="rotary", rotary_dim=4,
        norm="none", rotary_base=10000.0,
    )  # fmt: skip
    weights = init_random_weights(spec, 11)
    tokens = tokens_for(spec, seed=11)[0]
    patterns = forward(weights, tokens, return_patterns=True).patterns[0]

    x = np.asarray(weights.W_E, np.float64)[np.asarray(tokens)]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 4, 2) / 4))  # HF: arange(0, dim, 2) / dim
    freqs = np.outer(np.arange(SEQ), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)  # HF: cat((freqs, freqs), dim=-1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rotate_half(t):
        return np.concatenate([-t[..., 2:], t[..., :2]], axis=-1)

    def apply_rotary(t):  # HF: rotary on [..., :rotary_ndims], the rest passed through
        rot, rest = t[..., :4], t[..., 4:]
        return np.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1)

    for head in range(2):
        q = apply_rotary(x @ np.asarray(weights.W_Q[0, head]) + np.asarray(weights.b_Q[0, head]))
        k = apply_rotary(x @ np.asarray(weights.W_K[0, head]) + np.asarray(weights.b_K[0, head]))
        scores = q @ k.T / np.sqrt(8) + np.triu(np.full((SEQ, SEQ), -np.inf), k=1)
        expected = np.exp(scores - scores.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(patterns[head], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b[0])
def test_head_outputs_and_final_scale_match_the_reference(norm, block):
    spec = make_spec("learned", None, norm, block)
    weights = init_random_weights(spec, 5)
    tokens = tokens_for(spec, seed=5, batch=1)[0]
    out = forward(weights, tokens, return_head_outputs=True)
    internals = {}
    reference_forward(weights, tokens, internals=internals)
    np.testing.assert_allclose(out.head_outputs, internals["head_outputs"], rtol=1e-5, atol=1e-6)
    x = internals["final_residual"]
    if norm == "layernorm":
        x = x - x.mean(axis=-1, keepdims=True)
    expected_scale = np.ones(len(x)) if norm == "none" else 1 / np.sqrt((x**2).mean(axis=-1) + spec.norm_eps)
    np.testing.assert_allclose(out.final_scale, expected_scale, rtol=1e-5)
    assert out.patterns is None  # only what was asked for


def test_patterns_are_causal_rows_summing_to_one():
    spec = make_spec("learned", None, "layernorm", BLOCKS[1])
    weights = init_random_weights(spec, 1)
    patterns = forward(weights, tokens_for(spec)[0], return_patterns=True).patterns
    assert patterns.shape == (2, 2, SEQ, SEQ)
    np.testing.assert_allclose(patterns.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.abs(jnp.triu(patterns, k=1)).max()) == 0.0


def test_reduced_patterns_equal_the_same_reduction_of_the_reference_patterns():
    # reduce_patterns runs inside the layer loop and the patterns themselves are never
    # returned: each layer's summary must come from that layer's own pattern.
    spec = make_spec("shortformer", None, "layernorm", BLOCKS[2])
    weights = init_random_weights(spec, 3)
    tokens = tokens_for(spec)[0]

    def summarise(pattern):  # [head, seq, kv_seq] -> attention on BOS, and one back
        return pattern[:, :, 0].mean(-1), jnp.diagonal(pattern, offset=-1, axis1=-2, axis2=-1)

    out = jax.jit(lambda w, t: forward_module.forward(w, t, reduce_patterns=summarise))(weights, tokens)
    assert out.patterns is None
    on_first, one_back = out.pattern_summaries
    _, ref_patterns = reference_forward(weights, tokens)
    assert on_first.shape == (2, 2) and one_back.shape == (2, 2, SEQ - 1)
    np.testing.assert_allclose(on_first, ref_patterns[:, :, :, 0].mean(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one_back, np.diagonal(ref_patterns, offset=-1, axis1=-2, axis2=-1), rtol=1e-5, atol=1e-5)


def test_no_patterns_unless_asked():
    spec = make_spec("rotary", 8, "rmsnorm", BLOCKS[0])
    weights = init_random_weights(spec, 2)
    assert forward(weights, tokens_for(spec)[0]).patterns is None


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b[0])
def test_head_mask_equals_removing_the_head_from_the_weights(block):
    spec = make_spec("learned", None, "layernorm", block)
    weights = init_random_weights(spec, 3)
    tokens = tokens_for(spec)[0]
    mask = jnp.ones((2, 2)).at[0, 1].set(0.0).at[1, 0].set(0.0)
    masked = forward(weights, tokens, head_mask=mask).logits
    W_O = weights.W_O.at[0, 1].set(0.0).at[1, 0].set(0.0)
    removed = forward(type(weights)(**{**weights.arrays(), "W_O": W_O}, spec=spec), tokens).logits
    np.testing.assert_allclose(masked, removed, rtol=1e-5, atol=1e-5)
    # A mask of ones changes nothing; the masked run does differ from the clean one.
    np.testing.assert_allclose(forward(weights, tokens, head_mask=jnp.ones((2, 2))).logits,
                               forward(weights, tokens).logits, rtol=1e-6, atol=1e-6)  # fmt: skip
    assert float(jnp.abs(masked - forward(weights, tokens).logits).max()) > 1e-3


def test_frozen_patterns_match_the_reference_and_preserve_clean_patterns():
    spec = make_spec("shortformer", None, "layernorm", BLOCKS[1])
    weights = init_random_weights(spec, 4)
    tokens = tokens_for(spec)[0]
    clean = forward(weights, tokens, return_patterns=True)
    # Freezing the clean patterns reproduces the clean run.
    refrozen = forward(weights, tokens, frozen_patterns=clean.patterns)
    np.testing.assert_allclose(refrozen.logits, clean.logits, rtol=1e-5, atol=1e-5)
    # Pattern-preserving ablation of a layer-0 head: downstream heads keep their clean patterns.
    mask = jnp.ones((2, 2)).at[0, 0].set(0.0)
    preserved = forward(weights, tokens, head_mask=mask, frozen_patterns=clean.patterns)
    ref_logits, _ = reference_forward(weights, tokens, head_mask=mask, frozen_patterns=clean.patterns)
    np.testing.assert_allclose(preserved.logits, ref_logits, rtol=1e-5, atol=1e-5)
    # Full ablation lets layer 1's patterns move, so it differs from pattern-preserving ablation.
    full = forward(weights, tokens, head_mask=mask, return_patterns=True)
    assert float(jnp.abs(full.patterns[1] - clean.patterns[1]).max()) > 1e-4
    assert float(jnp.abs(full.logits - preserved.logits).max()) > 1e-4


def test_vmapped_forward_equals_a_loop():
    spec = make_spec("rotary", 4, "layernorm", BLOCKS[2])
    weights = init_random_weights(spec, 5)
    tokens = tokens_for(spec, batch=4)
    batched = jax.vmap(lambda t: forward(weights, t).logits)(tokens)
    for b in range(4):
        np.testing.assert_allclose(batched[b], forward(weights, tokens[b]).logits, rtol=1e-6, atol=1e-6)


def test_sequence_longer_than_learned_context_is_an_error():
    spec = make_spec("learned", None, "layernorm", BLOCKS[0])
    weights = init_random_weights(spec, 6)
    with pytest.raises(SpecError, match="exceeds the model's context n_ctx=12"):
        forward(weights, jnp.zeros(13, jnp.int32))
    with pytest.raises(SpecError, match="one sequence"):
        forward(weights, jnp.zeros((2, 5), jnp.int32))


def test_bfloat16_weights_run_in_float32():
    spec = make_spec("learned", None, "layernorm", BLOCKS[1])
    half = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), init_random_weights(spec, 7))
    tokens = tokens_for(spec)[0]
    logits = forward(half, tokens).logits
    assert logits.dtype == jnp.float32
    # bfloat16 values are exact in float64: the reference sees the same numbers.
    ref_logits, _ = reference_forward(half, tokens)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_out_of_range_token_ids_give_nan_instead_of_a_wrong_row():
    spec = make_spec("learned", None, "layernorm", BLOCKS[0])
    weights = init_random_weights(spec, 8)
    assert np.isfinite(np.asarray(forward(weights, jnp.array([0, 22, 5])).logits)).all()
    for bad in (23, -1):
        assert np.isnan(np.asarray(forward(weights, jnp.array([0, bad, 5])).logits)).all()


def test_mask_and_pattern_shapes_are_checked():
    spec = make_spec("learned", None, "layernorm", BLOCKS[0])
    weights = init_random_weights(spec, 9)
    tokens = jnp.zeros(5, jnp.int32)
    with pytest.raises(SpecError, match=r"head_mask has shape \(2, 3\), expected \[layer, head\] = \(2, 2\)"):
        forward(weights, tokens, head_mask=jnp.ones((2, 3)))
    with pytest.raises(SpecError, match=r"frozen_patterns has shape \(2, 2, 4, 4\)"):
        forward(weights, tokens, frozen_patterns=jnp.ones((2, 2, 4, 4)))
