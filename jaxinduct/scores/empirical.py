"""Empirical head scores: functions of one head's attention pattern on one sequence."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def prefix_matching(pattern: Float[Array, "seq kv_seq"], tokens: Int[Array, " seq"]) -> Float[Array, ""]:
    """Attention from each repeated token to the successor of its earlier occurrences.

    For every query q whose token occurred before, s_q = sum over earlier p with
    token(p) = token(q) of A[q, p + 1]; the score is the mean of s_q over those
    queries. On [BOS] + R R R R with R distinct, they are exactly the queries of
    repeats 2-4, and an ideal induction head scores 1.
    """
    same = tokens[:, None] == tokens[None, :]
    earlier = jnp.tril(jnp.ones(same.shape, dtype=bool), k=-1)
    match = same & earlier  # [q, p]
    # successor[q, k] is True when k = p + 1 for a matching p.
    successor = jnp.pad(match[:, :-1], ((0, 0), (1, 0)))
    per_query = jnp.sum(jnp.where(successor, pattern, 0.0), axis=-1)
    is_query = match.any(axis=-1)
    return jnp.sum(jnp.where(is_query, per_query, 0.0)) / jnp.maximum(is_query.sum(), 1)
