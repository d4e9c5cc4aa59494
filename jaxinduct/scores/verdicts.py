"""Induction-head verdicts of one checkpoint: 0/1 per head [layer, head].

Thresholds come from ``ProbeConfig.thresholds`` (`VerdictThresholds`) and are strict
(score > threshold). A comparison with NaN is false: a head whose score is undefined
never passes. Each verdict pulls in the scores it reads (`Checkpoint.of`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxinduct.scores.context import Checkpoint
from jaxinduct.scores.empirical import copying_heads, prefix_matching_heads, previous_token_heads
from jaxinduct.scores.mechanistic import induction_qk_positivity_heads, ov_copying_heads


def _behaves(ck: Checkpoint) -> Bool[Array, "layer head"]:
    """prefix_matching > thresholds.prefix_matching and copying > thresholds.copying."""
    thresholds = ck.config.thresholds
    return (ck.of(prefix_matching_heads) > thresholds.prefix_matching) & (ck.of(copying_heads) > thresholds.copying)


def _has_mechanism(ck: Checkpoint) -> Bool[Array, "layer head"]:
    """ov_copying > thresholds.ov_copying, induction_qk_positivity (per head) > thresholds.induction_qk,
    and some head of a strictly earlier layer with previous_token > thresholds.previous_token."""
    thresholds = ck.config.thresholds
    is_previous = ck.of(previous_token_heads) > thresholds.previous_token  # [layer, head]
    any_previous = jnp.any(is_previous, axis=1)  # [layer]
    # An upstream previous-token head: one in a strictly earlier layer.
    upstream = (jnp.cumsum(any_previous) - any_previous) > 0
    return (
        (ck.of(ov_copying_heads) > thresholds.ov_copying)
        & (ck.of(induction_qk_positivity_heads) > thresholds.induction_qk)
        & upstream[:, None]
    )


def induction_behaviour(ck: Checkpoint) -> Float[Array, "layer head"]:
    """1 where the head behaves as an induction head: it prefix-matches and copies (`_behaves`)."""
    return ck.of(_behaves).astype(ck.dtype)


def induction_mechanism(ck: Checkpoint) -> Float[Array, "layer head"]:
    """1 where the head has Olsson's K-composition mechanism (`_has_mechanism`): a copying OV circuit,
    a positive induction QK term and a previous-token head upstream."""
    return ck.of(_has_mechanism).astype(ck.dtype)


def induction_verdicts_agree(ck: Checkpoint) -> Float[Array, "layer head"]:
    """1 where induction_behaviour equals induction_mechanism."""
    return (ck.of(_behaves) == ck.of(_has_mechanism)).astype(ck.dtype)
