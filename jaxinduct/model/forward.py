"""The forward pass: one pure function over canonical `Weights` and one sequence.

It serves the reference model, every imported architecture and every empirical
score, so it handles every combination a `ModelSpec` can describe. It is written
for a single example (tokens ``[seq]``); callers batch it with `jax.vmap` (over
examples, head masks or checkpoints) in the places that own batching.

Conventions (TransformerLens): row vectors, attention logits
``q . k / sqrt(d_head)``, causal masking, pre-norm blocks. Positions:

- learned: ``W_pos[:seq]`` is added to the token embedding.
- shortformer: ``W_pos[:seq]`` is added to the normalised query and key inputs of
  every attention layer (after ln1), never to values or the residual stream.
- rotary: GPT-NeoX rotary on the first ``rotary_dim`` dims of each query and key,
  rotating the two halves of that slice against each other.

Matmuls run at HIGHEST precision: this is an analysis tool, and on GPUs the
default float32 matmul precision (TF32) moves scores in the third decimal.
"""

from __future__ import annotations

import dataclasses

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxinduct.errors import SpecError
from jaxinduct.model.weights import LAYER_FIELDS, Activation, ModelSpec, NormKind, PositionalScheme, Weights

_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


# One layer's slice of the per-layer Weights leaves (None where the architecture lacks one).
LayerParams = dict[str, Array | None]
Residual = Float[Array, "seq d_model"]
Pattern = Float[Array, "head seq kv_seq"]
HeadMask = Float[Array, " head"]


class ForwardOutput(NamedTuple):
    logits: Float[Array, "seq d_vocab"]
    # The final norm's output, what the unembedding reads: `unembed` of a slice of it gives
    # the logits of those positions alone (a score that reads a few positions' logits need
    # not pay for the whole [seq, d_vocab] product; XLA drops what no score reads).
    final: Float[Array, "seq d_model"] | None = None
    # The attention pattern each head used (the frozen one where patterns were frozen).
    patterns: Float[Array, "layer head seq kv_seq"] | None = None
    # Each head's write into the residual stream (z W_O, without the layer's b_O).
    head_outputs: Float[Array, "layer head seq d_model"] | None = None  # or what reduce_head_outputs made of them
    # The final norm's normalising factor per position, 1 / sqrt(var + eps) (1 without a
    # norm): with it, a component's direct effect on the logits is linear in its output.
    final_scale: Float[Array, " seq"] | None = None
    # reduce_patterns(pattern) of every layer, stacked on a leading layer axis.
    pattern_summaries: Any = None


def forward(
    weights: Weights,
    tokens: Int[Array, " seq"],
    *,
    head_mask: Float[Array, "layer head"] | None = None,
    frozen_patterns: Float[Array, "layer head seq kv_seq"] | None = None,
    return_patterns: bool = False,
    return_head_outputs: bool = False,
    reduce_patterns: Callable[[Pattern], Any] | None = None,
    reduce_head_outputs: Callable[[Float[Array, "head seq d_model"]], Any] | None = None,
) -> ForwardOutput:
    """Logits (and optionally every layer's attention patterns) for one sequence.

    head_mask: multiplies each head's output (its z before W_O); 0 removes the head
        from the residual stream, exactly as zeroing its W_O would.
    frozen_patterns: if given, every head uses these patterns instead of computing
        its own (pattern-preserving ablation: run clean, then ablate with the
        clean patterns frozen).
    return_head_outputs: also return every head's output and the final norm's scale,
        for direct-logit-attribution scores (empirical copying).
    reduce_patterns: a function of one layer's patterns [head, seq, kv_seq], applied
        inside the layer loop; its results come back stacked over layers. Scores that
        only need a summary of each pattern use it: the full patterns of every layer are
        never stored, which on CPU halves the cost of a pattern-scoring pass.
    reduce_head_outputs: likewise for one layer's head outputs [head, seq, d_model] (with
        return_head_outputs): ``head_outputs`` then holds its results, stacked over layers.
        Every layer's outputs of every example would be [layer, head, seq, d_model] each
        (a gigabyte per 32 examples at Pythia-410M's size).
    """
    spec = weights.spec
    _check_shapes(spec, tokens, head_mask, frozen_patterns)
    seq = tokens.shape[0]
    dtype = jnp.promote_types(weights.W_E.dtype, jnp.float32)
    # Per-layer weights are widened inside the layer loop, one layer at a time: a float16
    # checkpoint never has all its layers in float32 at once (Pythia-1.4B's MLPs alone would
    # be 3.2 GB).
    layers = {name: getattr(weights, name) for name in LAYER_FIELDS}
    weights = jax.tree_util.tree_map(lambda a: a.astype(dtype), dataclasses.replace(weights, **dict.fromkeys(LAYER_FIELDS)))

    # An out-of-range id becomes a NaN embedding (and NaN logits for the whole sequence, since
    # masked keys still multiply their values by 0) instead of silently reading the nearest
    # row, so a vocabulary mismatch cannot produce plausible wrong scores.
    in_vocab = (tokens >= 0) & (tokens < spec.d_vocab)
    residual = jnp.where(in_vocab[:, None], weights.W_E[jnp.clip(tokens, 0, spec.d_vocab - 1)], jnp.nan)
    pos_embed = weights.W_pos[:seq] if spec.has_pos_embed else None
    if spec.positional == PositionalScheme.LEARNED:
        residual = residual + pos_embed
    qk_offset = pos_embed if spec.positional == PositionalScheme.SHORTFORMER else None


    def step(x, per_layer):
        params, mask, frozen = per_layer
        params = {name: None if v is None else v.astype(dtype) for name, v in params.items()}
        x, pattern, head_out = _block(spec, params, x, qk_offset, mask, frozen, return_head_outputs)
        summary = None if reduce_patterns is None else reduce_patterns(pattern)
        if reduce_head_outputs is not None and head_out is not None:
            head_out = reduce_head_outputs(head_out)
        return x, (pattern if return_patterns else None, head_out, summary)

    residual, (patterns, head_outputs, summaries) = jax.lax.scan(
        step, residual, (layers, head_mask, frozen_patterns)
    )
    final = _norm(spec, residual, weights.ln_final_w, weights.ln_final_b)
    final_scale = _norm_scale(spec, residual) if return_head_outputs else None
    return ForwardOutput(
        logits=unembed(weights, final), final=final, patterns=patterns, head_outputs=head_outputs,
        final_scale=final_scale, pattern_summaries=summaries,
    )  # fmt: skip


def unembed(weights: Weights, final: Float[Array, "*position d_model"]) -> Float[Array, "*position d_vocab"]:
    """Logits of the final norm's output (`ForwardOutput.final`) at any positions."""
    dtype = jnp.promote_types(weights.W_E.dtype, jnp.float32)
    return _einsum("...d,dv->...v", final, weights.W_U.astype(dtype)) + weights.b_U.astype(dtype)


def _check_shapes(spec: ModelSpec, tokens: Array, head_mask: Array | None, frozen: Array | None) -> None:
    # Shapes are static under jit, so these checks cost nothing and beat an einsum error.
    if tokens.ndim != 1:
        raise SpecError(f"forward takes one sequence [seq]; got tokens of shape {tokens.shape} (vmap for batches)")
    seq = tokens.shape[0]
    if spec.has_pos_embed and seq > spec.n_ctx:
        raise SpecError(f"sequence of length {seq} exceeds the model's context n_ctx={spec.n_ctx}")
    if head_mask is not None and head_mask.shape != (spec.n_layers, spec.n_heads):
        raise SpecError(f"head_mask has shape {head_mask.shape}, expected [layer, head] = {(spec.n_layers, spec.n_heads)}")
    expected = (spec.n_layers, spec.n_heads, seq, seq)
    if frozen is not None and frozen.shape != expected:
        raise SpecError(f"frozen_patterns has shape {frozen.shape}, expected [layer, head, seq, kv_seq] = {expected}")


HeadOutputs = Float[Array, "head seq d_model"]


def _block(
    spec: ModelSpec,
    p: LayerParams,
    x: Residual,
    qk_offset: Residual | None,
    mask: HeadMask | None,
    frozen: Pattern | None,
    per_head: bool,
) -> tuple[Residual, Pattern, HeadOutputs | None]:
    attn_in = _norm(spec, x, p["ln1_w"], p["ln1_b"])
    attn_out, pattern, head_out = _attention(spec, p, attn_in, qk_offset, mask, frozen, per_head)
    if spec.attn_only:
        return x + attn_out, pattern, head_out
    if spec.parallel_attn_mlp:
        return x + attn_out + _mlp(spec, p, _norm(spec, x, p["ln2_w"], p["ln2_b"])), pattern, head_out
    x = x + attn_out
    return x + _mlp(spec, p, _norm(spec, x, p["ln2_w"], p["ln2_b"])), pattern, head_out


def _attention(
    spec: ModelSpec,
    p: LayerParams,
    x: Residual,
    qk_offset: Residual | None,
    mask: HeadMask | None,
    frozen: Pattern | None,
    per_head: bool,
) -> tuple[Residual, Pattern, HeadOutputs | None]:
    qk_in = x if qk_offset is None else x + qk_offset
    q = _einsum("sd,hde->she", qk_in, p["W_Q"]) + p["b_Q"]
    k = _einsum("sd,hde->she", qk_in, p["W_K"]) + p["b_K"]
    v = _einsum("sd,hde->she", x, p["W_V"]) + p["b_V"]
    if spec.positional == PositionalScheme.ROTARY:
        q, k = _rotary(spec, q), _rotary(spec, k)
    scores = _einsum("she,khe->hsk", q, k) / jnp.sqrt(jnp.asarray(spec.d_head, q.dtype))
    seq = x.shape[0]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    pattern = jax.nn.softmax(scores, axis=-1)
    if frozen is not None:
        pattern = frozen.astype(pattern.dtype)
    z = _einsum("hsk,khe->she", pattern, v)
    if mask is not None:
        z = z * mask.astype(z.dtype)[None, :, None]
    out = _einsum("she,hed->sd", z, p["W_O"]) + p["b_O"]
    # The layer's output is one contraction over heads either way: summing per-head outputs
    # instead costs XLA:CPU several times as much.
    return out, pattern, _einsum("she,hed->hsd", z, p["W_O"]) if per_head else None


def _rotary(spec: ModelSpec, x: Float[Array, "seq head d_head"]) -> Float[Array, "seq head d_head"]:
    rotary_dim = spec.rotary_dim
    assert rotary_dim is not None
    half = rotary_dim // 2
    inv_freq = 1.0 / (spec.rotary_base ** (jnp.arange(0, rotary_dim, 2, dtype=x.dtype) / rotary_dim))
    angles = jnp.arange(x.shape[0], dtype=x.dtype)[:, None] * inv_freq[None, :]  # [seq, half]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _mlp(spec: ModelSpec, p: LayerParams, x: Residual) -> Residual:
    hidden = _einsum("sd,dm->sm", x, p["W_in"]) + p["b_in"]
    return _einsum("sm,md->sd", activation_fn(spec.activation)(hidden), p["W_out"]) + p["b_out"]


def activation_fn(activation: Activation) -> Callable[[Array], Array]:
    return {
        Activation.GELU: functools.partial(jax.nn.gelu, approximate=False),
        Activation.GELU_NEW: functools.partial(jax.nn.gelu, approximate=True),
        Activation.RELU: jax.nn.relu,
        Activation.SILU: jax.nn.silu,
    }[activation]


def _norm_scale(spec: ModelSpec, x: Residual) -> Float[Array, " seq"]:
    """The factor a norm divides each position by (1 without a norm)."""
    if spec.norm == NormKind.NONE:
        return jnp.ones(x.shape[:1], x.dtype)
    if spec.norm == NormKind.LAYERNORM:
        x = x - x.mean(-1, keepdims=True)
    return jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + spec.norm_eps)[:, 0]


def _norm(spec: ModelSpec, x: Residual, w: Array | None, b: Array | None) -> Residual:
    if spec.norm == NormKind.NONE:
        return x
    if spec.norm == NormKind.LAYERNORM:
        x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + spec.norm_eps) * w
    return x if b is None else x + b
