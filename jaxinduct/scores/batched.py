"""The one place where score kernels are batched over examples, heads, layers and checkpoints."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxinduct.forward import forward
from jaxinduct.scores.compat import DetectionPattern, ErrorMeasure, detection_pattern, pattern_similarity
from jaxinduct.scores.empirical import prefix_matching
from jaxinduct.scores.mechanistic import composition_score
from jaxinduct.weights import Weights

# prefix_matching over heads (axis 0 of the pattern), then layers, then examples.
_per_head = jax.vmap(prefix_matching, in_axes=(0, None))
_per_layer = jax.vmap(_per_head, in_axes=(0, None))
_per_example = jax.vmap(_per_layer, in_axes=(0, 0))


def _checkpoint_prefix_matching(weights: Weights, tokens: Int[Array, "batch seq"]) -> Float[Array, "layer head"]:
    patterns = jax.vmap(lambda t: forward(weights, t, return_patterns=True).patterns)(tokens)
    # Mean of per-example means: equal to the mean over all queries when every example has
    # the same number of repeated tokens, as every repeated-random-token probe does.
    return _per_example(patterns, tokens).mean(axis=0)


head_prefix_matching = jax.jit(_checkpoint_prefix_matching)
head_prefix_matching.__doc__ = "prefix_matching of every head of one checkpoint: [layer, head]."

stacked_prefix_matching = jax.jit(jax.vmap(_checkpoint_prefix_matching, in_axes=(0, None)))
stacked_prefix_matching.__doc__ = "prefix_matching for ckpt-stacked Weights in one pass: [ckpt, layer, head]."


# --- TransformerLens-compatible scores ------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("kind", "exclude_bos", "exclude_current_token", "error_measure"))
def detect_head(
    weights: Weights,
    tokens: Int[Array, "batch seq"],
    kind: DetectionPattern,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = ErrorMeasure.MUL,
) -> Float[Array, "layer head"]:
    """transformer_lens.head_detector.detect_head for every head, averaged over the sequences."""
    similarity = functools.partial(
        pattern_similarity,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
        error_measure=ErrorMeasure(error_measure),
    )
    per_head = jax.vmap(jax.vmap(similarity, in_axes=(0, None)), in_axes=(0, None))  # over layer, head

    def one_sequence(seq_tokens):
        patterns = forward(weights, seq_tokens, return_patterns=True).patterns
        return per_head(patterns, detection_pattern(DetectionPattern(kind), seq_tokens))

    return jax.vmap(one_sequence)(tokens).mean(axis=0)


def _all_pairs(score: Callable[..., Array], left: tuple[Array, Array], right: tuple[Array, Array]) -> Array:
    """score(earlier head's factors, later head's factors) for every (l1, h1, l2, h2)."""
    over_dst = jax.vmap(jax.vmap(score, in_axes=(None, None, 0, 0)), in_axes=(None, None, 0, 0))
    over_src = jax.vmap(jax.vmap(over_dst, in_axes=(0, 0, None, None)), in_axes=(0, 0, None, None))
    return over_src(*left, *right)


@functools.partial(jax.jit, static_argnames=("mode",))
def all_composition_scores(weights: Weights, mode: str) -> Float[Array, "layer head layer head"]:
    """HookedTransformer.all_composition_scores: [l1, h1, l2, h2], zero unless l1 < l2.

    mode "Q", "K" or "V": an earlier head's OV circuit against a later head's QK
    circuit, its transpose, or its OV circuit. No baseline is subtracted. Pass
    processed weights (`process_weights`) to match TransformerLens's defaults.
    """
    ov = (weights.W_V, weights.W_O)
    right = {
        "Q": (weights.W_Q, jnp.swapaxes(weights.W_K, -1, -2)),
        "K": (weights.W_K, jnp.swapaxes(weights.W_Q, -1, -2)),
        "V": ov,
    }
    if mode not in right:
        raise ValueError(f"composition mode must be 'Q', 'K' or 'V', got {mode!r}")
    scores = _all_pairs(composition_score, ov, right[mode])
    n_layers = weights.spec.n_layers
    earlier = jnp.arange(n_layers)[:, None, None, None] < jnp.arange(n_layers)[None, None, :, None]
    return jnp.where(earlier, scores, 0.0)
