"""The one place where score kernels are batched over examples, heads, layers and checkpoints."""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int

from jaxinduct.forward import forward
from jaxinduct.scores.empirical import prefix_matching
from jaxinduct.weights import Weights


def _patterns(weights: Weights, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch layer head seq kv_seq"]:
    return jax.vmap(lambda t: forward(weights, t, return_patterns=True).patterns)(tokens)


# prefix_matching over heads (axis 0 of the pattern), then layers, then examples.
_per_head = jax.vmap(prefix_matching, in_axes=(0, None))
_per_layer = jax.vmap(_per_head, in_axes=(0, None))
_per_example = jax.vmap(_per_layer, in_axes=(0, 0))


@jax.jit
def head_prefix_matching(weights: Weights, tokens: Int[Array, "batch seq"]) -> Float[Array, "layer head"]:
    """prefix_matching of every head of one checkpoint, averaged over the examples."""
    return _per_example(_patterns(weights, tokens), tokens).mean(axis=0)


@jax.jit
def stacked_prefix_matching(weights: Weights, tokens: Int[Array, "batch seq"]) -> Float[Array, "ckpt layer head"]:
    """head_prefix_matching for a ckpt-stacked Weights, in one pass."""
    return jax.vmap(lambda w: _per_example(_patterns(w, tokens), tokens).mean(axis=0))(weights)
