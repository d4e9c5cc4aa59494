"""The one place where score kernels are batched over examples, heads, layers and checkpoints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxinduct.forward import ForwardOutput, forward
from jaxinduct.probes import ProbeConfig, Probes
from jaxinduct.processing import process_weights
from jaxinduct.scores.compat import DetectionPattern, ErrorMeasure, detection_pattern, pattern_similarity
from jaxinduct.scores.empirical import duplicate_token, prefix_matching, previous_token
from jaxinduct.scores.mechanistic import (
    composition_score,
    induction_qk_positivity,
    induction_qk_trace,
    k_composition,
    ov_copying,
    q_composition,
    v_composition,
)
from jaxinduct.weights import Weights

def _forward_batch(weights: Weights, tokens: Int[Array, "example seq"]) -> ForwardOutput:
    """Logits [example, seq, d_vocab] and patterns [example, layer, head, seq, kv_seq]."""
    return jax.vmap(lambda t: forward(weights, t, return_patterns=True))(tokens)


def _patterns(weights: Weights, tokens: Int[Array, "example seq"]) -> Float[Array, "example layer head seq kv_seq"]:
    return _forward_batch(weights, tokens).patterns


def _over_examples_layers_heads(kernel: Callable[[Array, Array], Array]) -> Callable[[Array, Array], Array]:
    """kernel(pattern [seq, kv_seq], tokens [seq]) -> scores [example, layer, head]."""
    per_head = jax.vmap(kernel, in_axes=(0, None))
    per_layer = jax.vmap(per_head, in_axes=(0, None))
    return jax.vmap(per_layer, in_axes=(0, 0))


def _checkpoint_prefix_matching(weights: Weights, tokens: Int[Array, "example seq"]) -> Float[Array, "layer head"]:
    # Mean of per-example means: equal to the mean over all queries when every example has
    # the same number of repeated tokens, as every repeated-random-token probe does.
    return _over_examples_layers_heads(prefix_matching)(_patterns(weights, tokens), tokens).mean(axis=0)


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


# --- every score of every head of many checkpoints: the entry point ---------------------------


class ScoreResults(NamedTuple):
    """Scores by public name (docs/scores.md), for every checkpoint of a stack.

    head: [ckpt, layer, head]; pair: [ckpt, src_layer, src_head, dst_layer, dst_head],
    NaN unless src_layer < dst_layer; model: [ckpt]; curve: [ckpt, seq].
    """

    head: dict[str, Float[Array, "ckpt layer head"]]
    pair: dict[str, Float[Array, "ckpt layer head layer head"]]
    model: dict[str, Float[Array, " ckpt"]]
    curve: dict[str, Float[Array, "ckpt seq"]]  # per_token_loss by context index (NaN at 0)


def _empirical_head_scores(
    repeated_patterns: Array, repeated: Int[Array, "example seq"], random_patterns: Array
) -> dict[str, Array]:
    previous = jax.vmap(jax.vmap(jax.vmap(previous_token)))  # over examples, layers, heads
    return {
        "prefix_matching": _over_examples_layers_heads(prefix_matching)(repeated_patterns, repeated).mean(axis=0),
        "duplicate_token": _over_examples_layers_heads(duplicate_token)(repeated_patterns, repeated).mean(axis=0),
        "previous_token": previous(random_patterns).mean(axis=0),
    }


def token_losses(logits: Float[Array, "example seq d_vocab"], tokens: Int[Array, "example seq"]) -> Float[Array, "example seq"]:
    """Cross-entropy of token i given tokens[:i], at index i; index 0 (nothing to condition on) is NaN."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(nll, ((0, 0), (1, 0)), constant_values=jnp.nan)


def _model_scores(
    weights: Weights, repeated_logits: Array, repeated: Array, dataset: Array | None, config: ProbeConfig
) -> tuple[dict[str, Array], dict[str, Array]]:
    # induction_loss: the second half of the repeated body, which an induction head predicts.
    body = config.block_len * config.n_repeats
    second_half = repeated.shape[1] - body + body // 2
    model = {"induction_loss": token_losses(repeated_logits, repeated)[:, second_half:].mean()}
    curve: dict[str, Array] = {}
    if dataset is not None:
        logits = jax.vmap(lambda t: forward(weights, t).logits)(dataset)
        curve["per_token_loss"] = token_losses(logits, dataset).mean(axis=0)
        model["icl_score"] = curve["per_token_loss"][config.icl_late] - curve["per_token_loss"][config.icl_early]
    return model, curve


def _mechanistic_scores(processed: Weights) -> tuple[dict[str, Array], dict[str, Array]]:
    W_E = processed.W_E
    per_head = jax.vmap(jax.vmap(ov_copying, in_axes=(None, 0, 0, None)), in_axes=(None, 0, 0, None))
    ov = (processed.W_V, processed.W_O)
    qk = (processed.W_Q, processed.W_K)
    pairs = {
        "q_composition": _all_pairs(q_composition, ov, qk),
        "k_composition": _all_pairs(k_composition, ov, qk),
        "v_composition": _all_pairs(v_composition, ov, ov),
        "induction_qk_positivity": _all_pairs(functools.partial(induction_qk_positivity, W_E), ov, qk),
        "induction_qk_trace": _all_pairs(functools.partial(induction_qk_trace, W_E), ov, qk),
    }
    n_layers = processed.spec.n_layers
    earlier = jnp.arange(n_layers)[:, None, None, None] < jnp.arange(n_layers)[None, None, :, None]
    pairs = {name: jnp.where(earlier, value, jnp.nan) for name, value in pairs.items()}
    return {"ov_copying": per_head(W_E, processed.W_V, processed.W_O, processed.W_U)}, pairs


def _weighted_over_sources(pair: Array, source_weight: Float[Array, "layer head"]) -> Float[Array, "layer head"]:
    """Per destination head: the mean of a pair score over earlier heads, weighted by source_weight."""
    valid = ~jnp.isnan(pair)
    weight = jnp.where(valid, source_weight[:, :, None, None], 0.0)
    total = weight.sum(axis=(0, 1))
    weighted = jnp.where(valid, pair, 0.0) * weight
    return jnp.where(total > 0, weighted.sum(axis=(0, 1)) / jnp.where(total > 0, total, 1.0), jnp.nan)


def _checkpoint_scores(
    weights: Weights,
    repeated: Int[Array, "example seq"],
    random: Int[Array, "example seq"],
    dataset: Int[Array, "example seq"] | None = None,
    config: ProbeConfig = ProbeConfig(),
) -> ScoreResults:
    on_repeated = _forward_batch(weights, repeated)
    head = _empirical_head_scores(on_repeated.patterns, repeated, _forward_batch(weights, random).patterns)
    mechanistic_head, pair = _mechanistic_scores(process_weights(weights))
    head.update(mechanistic_head)
    # Olsson's per-head induction QK terms: pairs weighted by how previous-token-like the source is.
    for name in ("induction_qk_positivity", "induction_qk_trace"):
        head[name] = _weighted_over_sources(pair[name], head["previous_token"])
    model, curve = _model_scores(weights, on_repeated.logits, repeated, dataset, config)
    return ScoreResults(head=head, pair=pair, model=model, curve=curve)


@functools.partial(jax.jit, static_argnames=("config", "checkpoints_per_pass"))
def _score_all(
    weights: Weights,
    repeated: Array,
    random: Array,
    dataset: Array | None,
    config: ProbeConfig,
    checkpoints_per_pass: int | None,
) -> ScoreResults:
    def one(w: Weights) -> ScoreResults:
        return _checkpoint_scores(w, repeated, random, dataset, config)

    if checkpoints_per_pass is None:
        return jax.vmap(one)(weights)
    # vmap within chunks, scan across them: the working set is that of one chunk.
    return jax.lax.map(one, weights, batch_size=checkpoints_per_pass)


def score_all(weights: Weights, probes: Probes, *, checkpoints_per_pass: int | None = None) -> ScoreResults:
    """Every implemented score for every head (and head pair) of ckpt-stacked Weights, in one pass.

    ``weights`` carries a leading ckpt axis (`stack_weights`); it may be sharded over
    devices along that axis, and the result is sharded the same way. Compiled once per
    (model spec, number of checkpoints, probe shapes, sharding, checkpoints_per_pass).

    checkpoints_per_pass: None vmaps all checkpoints at once (every intermediate of every
    checkpoint is live together; best on accelerators with memory to spare); k computes
    k at a time inside the same compiled pass, bounding memory to k checkpoints' worth.
    """
    if checkpoints_per_pass is not None and checkpoints_per_pass < 1:
        raise ValueError(f"checkpoints_per_pass must be a positive integer or None, got {checkpoints_per_pass}")
    dataset = None if probes.dataset is None else jnp.asarray(probes.dataset)
    return _score_all(
        weights, jnp.asarray(probes.repeated), jnp.asarray(probes.random), dataset, probes.config, checkpoints_per_pass
    )
