"""Empirical head scores: functions of one head's attention pattern on one sequence."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def _earlier_occurrences(tokens: Int[Array, " seq"]) -> Bool[Array, "seq kv_seq"]:
    """match[q, p]: p < q and token(p) = token(q)."""
    same = tokens[:, None] == tokens[None, :]
    return same & jnp.tril(jnp.ones(same.shape, dtype=bool), k=-1)


def _mean_over_repeated_queries(
    pattern: Float[Array, "seq kv_seq"], target: Bool[Array, "seq kv_seq"], is_query: Bool[Array, " seq"]
) -> Float[Array, ""]:
    """Mean over queries with an earlier occurrence of the attention they put on ``target``."""
    per_query = jnp.sum(jnp.where(target, pattern, 0.0), axis=-1)
    return jnp.sum(jnp.where(is_query, per_query, 0.0)) / jnp.maximum(is_query.sum(), 1)


def prefix_matching(pattern: Float[Array, "seq kv_seq"], tokens: Int[Array, " seq"]) -> Float[Array, ""]:
    """Attention from each repeated token to the successor of its earlier occurrences.

    For every query q whose token occurred before, s_q = sum over earlier p with
    token(p) = token(q) of A[q, p + 1]; the score is the mean of s_q over those
    queries. On [BOS] + R R R R with R distinct, they are exactly the queries of
    repeats 2-4, and an ideal induction head scores 1.
    """
    match = _earlier_occurrences(tokens)
    successor = jnp.pad(match[:, :-1], ((0, 0), (1, 0)))  # successor[q, k]: k = p + 1 for a match p
    return _mean_over_repeated_queries(pattern, successor, match.any(axis=-1))


def duplicate_token(pattern: Float[Array, "seq kv_seq"], tokens: Int[Array, " seq"]) -> Float[Array, ""]:
    """Attention from each repeated token to its earlier occurrences themselves.

    For every query q whose token occurred before, the sum of A[q, p] over earlier p
    with token(p) = token(q), averaged over those queries (repeats 2-4 of the
    standard probe). A head that attends to the previous copy of its token scores 1.
    """
    match = _earlier_occurrences(tokens)
    return _mean_over_repeated_queries(pattern, match, match.any(axis=-1))


def previous_token(pattern: Float[Array, "seq kv_seq"]) -> Float[Array, ""]:
    """Mean over queries q >= 1 of A[q, q - 1]: 1 for a head that always attends one back."""
    return jnp.mean(jnp.diagonal(pattern, offset=-1))
