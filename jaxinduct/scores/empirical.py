"""Empirical head scores: kernels of one head's attention pattern on one sequence, and the
scores of one checkpoint they define (`jaxinduct.scores.registry`).

The kernels are batched over heads, layers and examples inside the forward passes of
`jaxinduct.scores.batched.LazyCheckpoint`; the per-checkpoint scores average them over the
probe's examples.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxinduct.scores.context import Checkpoint


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


def prefix_matching(
    pattern: Float[Array, "seq kv_seq"], tokens: Int[Array, " seq"], queries: Bool[Array, " seq"] | None = None
) -> Float[Array, ""]:
    """Attention from each repeated token to the successor of its earlier occurrences.

    For every query q whose token occurred before, s_q = sum over earlier p with
    token(p) = token(q) of A[q, p + 1]; the score is the mean of s_q over those
    queries. On [BOS] + R R R R with R distinct, they are exactly the queries of
    repeats 2-4, and an ideal induction head scores 1.

    queries: restrict the mean to these positions (among those with an earlier occurrence).
    """
    match = _earlier_occurrences(tokens)
    successor = jnp.pad(match[:, :-1], ((0, 0), (1, 0)))  # successor[q, k]: k = p + 1 for a match p
    is_query = match.any(axis=-1) if queries is None else match.any(axis=-1) & queries
    return _mean_over_repeated_queries(pattern, successor, is_query)


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


def copying(
    pattern: Float[Array, "seq kv_seq"],
    head_output: Float[Array, "seq d_model"],
    final_scale: Float[Array, " seq"],
    final_norm_w: Float[Array, " d_model"],
    W_U: Float[Array, "d_model d_vocab"],
    tokens: Int[Array, " seq"],
    centre: bool,
) -> Float[Array, ""]:
    """Does the head raise the logits of the tokens it attends to, more than the others? In [-1, 1].

    Run on R alone (distinct random tokens, so a position is a token). For query q the
    head's direct logit effect is c_q = N(o_q) W_U, with N the final norm linearised at
    this forward pass (centred over d_model for LayerNorm, times ``final_scale[q]`` and
    the norm's weight), and boost_q[t] = ReLU(c_q[t] - mean over the vocabulary of c_q)
    for every token t of the sample. Then

        attended_q   = sum_t A[q, t] boost_q[t]                 (attention-weighted)
        unattended_q = sum_t w_t boost_q[t] / sum_t w_t,  w_t = 1 - A[q, t] / max A[q]
        s_q = (attended_q - unattended_q) / (attended_q + unattended_q)

    and the score is the mean of s_q over queries where it is defined (some token is
    less than fully attended, and some boost is positive). A head whose OV circuit is a
    scaled identity scores 1 however it spreads its attention; its negation -1; a head
    whose boosts ignore its attention about 0. See docs/scores.md for the choices.
    """
    readout = copying_readout(final_norm_w, W_U, tokens, centre)
    return copying_of_projection(pattern, head_output @ readout, final_scale)


def copying_readout(
    final_norm_w: Float[Array, " d_model"], W_U: Float[Array, "d_model d_vocab"], tokens: Int[Array, " seq"], centre: bool
) -> Float[Array, "d_model seq"]:
    """What `copying` reads a head's output through: (W_U[:, t] - mean_v W_U[:, v]) scaled by
    the final norm's weight, for each token t of the sequence (centred over d_model for LayerNorm)."""
    # c_q[t] - mean_v c_q[v] = s_q N(o_q) (W_U[:, t] - mean_v W_U[:, v]), and centring o_q over
    # d_model moves onto the other factor. So one [d_model, seq] readout per sequence, shared
    # by every head, and one small matmul per head.
    readout = final_norm_w[:, None] * (W_U[:, tokens] - W_U.mean(axis=1, keepdims=True))
    if centre:
        readout = readout - readout.mean(axis=0, keepdims=True)
    return readout


def copying_of_projection(
    pattern: Float[Array, "seq kv_seq"], projected: Float[Array, "seq kv_seq"], final_scale: Float[Array, " seq"]
) -> Float[Array, ""]:
    """`copying` from the head's output already read through `copying_readout` (``projected``:
    head_output @ readout), which the forward pass computes inside its layer loop so that no
    layer's [seq, d_model] head outputs are kept."""
    # boost[q, t]: how much query q's output raises the token at position t above the vocabulary mean
    boost = jnp.maximum(final_scale[:, None] * projected, 0.0)
    attended = jnp.sum(pattern * boost, axis=-1)
    peak = pattern.max(axis=-1, keepdims=True)
    away = 1.0 - pattern / jnp.where(peak > 0, peak, 1.0)  # 0 on the most attended token, 1 on unattended ones
    away_total = away.sum(axis=-1)
    unattended = jnp.sum(away * boost, axis=-1) / jnp.where(away_total > 0, away_total, 1.0)
    total = attended + unattended
    valid = (away_total > 1e-6) & (total > 0)
    contrast = (attended - unattended) / jnp.where(valid, total, 1.0)
    n_valid = valid.sum()
    return jnp.where(n_valid > 0, jnp.sum(jnp.where(valid, contrast, 0.0)) / jnp.maximum(n_valid, 1), jnp.nan)


# --- the scores of one checkpoint [layer, head] ------------------------------------------------
# Means over examples are means of per-example means: equal to the mean over all queries
# when every example has the same number of repeated tokens, as every repeated-random-token
# probe does.


def prefix_matching_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """prefix_matching of every head on [BOS] + R x n_repeats: mean over examples of
    mean over repeated queries q of sum_{p < q, token(p) = token(q)} A[q, p + 1]."""
    return ck.repeated.pattern_summaries.prefix_matching.mean(axis=0)


def duplicate_token_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """duplicate_token of every head on the repeated probe: mean over examples of
    mean over repeated queries q of sum_{p < q, token(p) = token(q)} A[q, p]."""
    return ck.repeated.pattern_summaries.duplicate_token.mean(axis=0)


def previous_token_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """previous_token of every head: mean over examples of mean over q >= 1 of A[q, q - 1],
    on the dataset's examples when there is a dataset, else on the random probe."""
    per_example = ck.random_previous_token if ck.dataset is None else ck.dataset.pattern_summaries
    return per_example.mean(axis=0)


def copying_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """copying of every head on the copying probe (R alone): mean over the examples where it
    is defined of the per-example `copying` (NaN where no example defines it)."""
    return jnp.nanmean(ck.copying, axis=0)


def prefix2_sensitivity(ck: Checkpoint) -> Float[Array, "layer head"]:
    """prefix_matching on the repeated probe minus prefix_matching on the prefix2 probe (every
    other token's predecessor changed), the latter over the queries whose predecessor changed:
    about 0 for a head that matches the current token only, up to 1 for one that matches two."""
    return ck.of(prefix_matching_heads) - ck.prefix2.mean(axis=0)
