"""TransformerLens-compatible head detection, for users migrating from TransformerLens.

These reproduce ``transformer_lens.head_detector.detect_head`` on given token
sequences: its three named detection patterns, its "mul" and "abs" error measures
and its exclude_bos / exclude_current_token switches, including its quirks (the
"abs" measure is rounded to 3 decimals; a list of sequences is averaged). They are
kernels of one head's pattern on one sequence; `jaxinduct.scores.batched`
batches them.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class DetectionPattern(enum.StrEnum):
    PREVIOUS_TOKEN = "previous_token_head"
    DUPLICATE_TOKEN = "duplicate_token_head"
    INDUCTION = "induction_head"


class ErrorMeasure(enum.StrEnum):
    MUL = "mul"  # share of the head's attention that lands where the pattern is 1
    ABS = "abs"  # 1 - (mean |attention - pattern|) * seq, rounded to 3 decimals


def detection_pattern(kind: DetectionPattern, tokens: Int[Array, " seq"]) -> Float[Array, "seq kv_seq"]:
    """The ideal pattern of a head of this kind on these tokens (lower triangular, 0/1)."""
    seq = tokens.shape[0]
    if kind == DetectionPattern.PREVIOUS_TOKEN:
        return jnp.eye(seq, k=-1)
    duplicate = (tokens[:, None] == tokens[None, :]) & ~jnp.eye(seq, dtype=bool)
    duplicate = jnp.tril(duplicate).astype(jnp.float32)
    if kind == DetectionPattern.DUPLICATE_TOKEN:
        return duplicate
    # Induction: attend to the token after an earlier duplicate (shift right by one).
    return jnp.tril(jnp.pad(duplicate[:, :-1], ((0, 0), (1, 0))))


def pattern_similarity(
    pattern: Float[Array, "seq kv_seq"],
    detection: Float[Array, "seq kv_seq"],
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = ErrorMeasure.MUL,
) -> Float[Array, ""]:
    """TransformerLens's compute_head_attention_similarity_score for one head."""
    seq = pattern.shape[0]
    keep = jnp.ones((seq, seq), dtype=bool)
    if exclude_bos:
        keep = keep.at[:, 0].set(False)
    if exclude_current_token:
        keep = keep & ~jnp.eye(seq, dtype=bool)
    if ErrorMeasure(error_measure) == ErrorMeasure.MUL:
        attended = jnp.where(keep, pattern, 0.0)
        return jnp.sum(attended * detection) / jnp.sum(attended)
    abs_diff = jnp.where(keep, jnp.abs(pattern - detection), 0.0)
    return 1.0 - jnp.round(jnp.mean(abs_diff) * seq, 3)
