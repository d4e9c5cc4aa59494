"""The one place where score kernels are batched over examples, heads, layers and checkpoints."""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int

from jaxinduct.forward import forward
from jaxinduct.scores.empirical import prefix_matching
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
