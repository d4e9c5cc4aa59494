"""Weight processing for mechanistic scores (the processing TransformerLens applies by default).

`process_weights` returns Weights of the *same* spec that compute the same function
(identical attention patterns, log-probabilities shifted by nothing; logits shifted by
a constant per position when the unembedding is centred), with these steps:

1. fold norms: each norm's scale (and LayerNorm bias) moves into the weights that read
   its output: ln1 -> W_Q, W_K, W_V (and b_Q, b_K, b_V); ln2 -> W_in (b_in);
   ln_final -> W_U (b_U). The norm keeps scale 1 and bias 0, i.e. it becomes a pure
   normalisation (TransformerLens's LNPre / RMSNormPre). For LayerNorm the reading
   weights are then centred over d_model, which changes nothing because a LayerNorm's
   output has zero mean.
2. centre writing weights (LayerNorm models only): W_E, W_pos, W_O, b_O, W_out, b_out
   lose their mean over d_model. Every reader normalises with a LayerNorm first, which
   removes that mean anyway.
3. centre the unembedding: W_U and b_U lose their mean over the vocabulary (softmax is
   shift-invariant).
4. fold value biases: sum over heads of b_V W_O moves into b_O (attention rows sum to
   1, so each head adds exactly b_V W_O), and b_V becomes 0.

Exception: with shortformer positions, W_pos is added to the query and key inputs
*after* ln1, so folding ln1 into W_Q and W_K would change how positions are read.
For shortformer models ln1 stays unfolded (its scale and bias are kept), and step 2
leaves W_pos alone (it never enters the residual stream).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxinduct.model.weights import ModelSpec, NormKind, PositionalScheme, Weights


def process_weights(
    weights: Weights,
    *,
    fold_norms: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> Weights:
    """Processed Weights of one checkpoint (see the module docstring for each step)."""
    spec = weights.spec
    # Leaves stored narrower than float32 (float16, bfloat16) are processed in float32: the
    # scan program passes them unwidened, and XLA fuses each conversion into the step reading it.
    w = {name: a.astype(jnp.promote_types(a.dtype, jnp.float32)) for name, a in weights.arrays().items()}
    layernorm = spec.norm == NormKind.LAYERNORM
    if fold_norms and spec.norm != NormKind.NONE:
        if spec.positional != PositionalScheme.SHORTFORMER:
            for name in ("Q", "K", "V"):
                w[f"W_{name}"], w[f"b_{name}"] = _fold_into_heads(
                    w[f"W_{name}"], w[f"b_{name}"], w["ln1_w"], w.get("ln1_b"), center=layernorm
                )
            w["ln1_w"], w["ln1_b"] = _identity_norm(w["ln1_w"], w.get("ln1_b"))
        if not spec.attn_only:
            w["W_in"], w["b_in"] = _fold_into_reader(w["W_in"], w["b_in"], w["ln2_w"], w.get("ln2_b"), center=layernorm)
            w["ln2_w"], w["ln2_b"] = _identity_norm(w["ln2_w"], w.get("ln2_b"))
        w["W_U"], w["b_U"] = _fold_into_reader(
            w["W_U"], w["b_U"], w["ln_final_w"], w.get("ln_final_b"), center=layernorm
        )
        w["ln_final_w"], w["ln_final_b"] = _identity_norm(w["ln_final_w"], w.get("ln_final_b"))
    if center_writing_weights and centres_writing_weights(spec):
        w["W_E"] = _center_last(w["W_E"])
        if spec.positional == PositionalScheme.LEARNED:
            w["W_pos"] = _center_last(w["W_pos"])
        w["W_O"] = _center_last(w["W_O"])
        w["b_O"] = _center_last(w["b_O"])
        if not spec.attn_only:
            w["W_out"] = _center_last(w["W_out"])
            w["b_out"] = _center_last(w["b_out"])
    if center_unembed:
        w["W_U"] = _center_last(w["W_U"])
        w["b_U"] = _center_last(w["b_U"])
    if fold_value_biases:
        w["b_O"] = w["b_O"] + jnp.einsum("lhe,lhed->ld", w["b_V"], w["W_O"])
        w["b_V"] = jnp.zeros_like(w["b_V"])
    return dataclasses.replace(weights, **w)


def centres_writing_weights(spec: ModelSpec) -> bool:
    """Whether `process_weights` centres W_E and the other writing weights (step 2): only
    LayerNorm removes the mean the centring takes out."""
    return spec.norm == NormKind.LAYERNORM


class VocabularyProducts(NamedTuple):
    """The vocabulary-sized products of processed weights, each [d_model, d_model]."""

    unembed_embed: Float[Array, "d_model d_model"]  # W_U W_E: the direct path in its d_model form
    embed_gram: Float[Array, "d_model d_model"]  # W_E^T W_E: how token embeddings overlap


def vocabulary_products(weights: Weights, processed: Weights) -> VocabularyProducts:
    """W_U W_E and W_E^T W_E of ``processed = process_weights(weights)`` (default steps).

    Centring W_E over d_model (step 2) is a right product with C = I - 11^T / d_model, so
    the products are taken with the raw W_E and centred afterwards on [d_model, d_model]:
    W_U (W_E C) = (W_U W_E) C and (W_E C)^T (W_E C) = C (W_E^T W_E) C. Equal up to
    rounding, and the products then read an operand that is a plain input: XLA:CPU fuses
    the centring into a product of two centred operands and runs it at a fifth of the
    speed (330 ms instead of 65 ms for Pythia-70M's 26 GFLOP W_U W_E).
    """
    centred = centres_writing_weights(weights.spec)
    W_E = weights.W_E.astype(processed.W_U.dtype)
    highest = jax.lax.Precision.HIGHEST
    unembed_embed = jnp.matmul(processed.W_U, W_E, precision=highest)
    embed_gram = jnp.matmul(W_E.T, W_E, precision=highest)
    if centred:
        unembed_embed = unembed_embed - unembed_embed.mean(axis=-1, keepdims=True)
        embed_gram = embed_gram - embed_gram.mean(axis=-1, keepdims=True)
        embed_gram = embed_gram - _mean_over_rows(embed_gram)
    return VocabularyProducts(unembed_embed, embed_gram)


def _fold_into_heads(
    W: Float[Array, "layer head d_model d_head"],
    b: Float[Array, "layer head d_head"],
    scale: Float[Array, "layer d_model"],
    shift: Float[Array, "layer d_model"] | None,
    *,
    center: bool,
) -> tuple[Array, Array]:
    if shift is not None:
        b = b + jnp.einsum("ld,lhde->lhe", shift, W)
    W = W * scale[:, None, :, None]
    if center:
        W = W - _mean_over_rows(W)
    return W, b


def _fold_into_reader(
    W: Float[Array, "... d_model out"],
    b: Float[Array, "... out"],
    scale: Float[Array, "... d_model"],
    shift: Float[Array, "... d_model"] | None,
    *,
    center: bool,
) -> tuple[Array, Array]:
    if shift is not None:
        b = b + jnp.einsum("...d,...do->...o", shift, W)
    W = W * scale[..., :, None]
    if center:
        W = W - _mean_over_rows(W)
    return W, b


def _mean_over_rows(W: Float[Array, "... rows cols"]) -> Float[Array, "... 1 cols"]:
    """W.mean(axis=-2, keepdims=True), as a product with a vector of 1 / rows.

    XLA:CPU reduces over a non-minor axis several times slower than it multiplies: for
    Pythia's W_U [512, 50304] the reduction took 130 ms, the product 30 ms.
    """
    rows = W.shape[-2]
    weights = jnp.full((rows,), 1.0 / rows, W.dtype)
    return jnp.einsum("r,...rc->...c", weights, W, precision=jax.lax.Precision.HIGHEST)[..., None, :]


def _identity_norm(scale: Array, shift: Array | None) -> tuple[Array, Array | None]:
    return jnp.ones_like(scale), None if shift is None else jnp.zeros_like(shift)


def _center_last(x: Array) -> Array:
    return x - x.mean(axis=-1, keepdims=True)
