"""The one place where score kernels are batched over examples, heads, layers and checkpoints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxinduct.model.forward import ForwardOutput, forward
from jaxinduct.scores.probes import ProbeConfig, Probes, VerdictThresholds
from jaxinduct.model.processing import process_weights
from jaxinduct.scores.compat import DetectionPattern, ErrorMeasure, detection_pattern, pattern_similarity
from jaxinduct.scores.empirical import copying, duplicate_token, prefix_matching, previous_token
from jaxinduct.scores.mechanistic import (
    composition_score,
    induction_qk_positivity,
    induction_qk_trace,
    k_composition,
    ov_copying,
    pointer_arithmetic,
    q_composition,
    qk_prev_token,
    v_composition,
)
from jaxinduct.model.weights import NormKind, PositionalScheme, Weights


def _summarised_forward(
    weights: Weights, tokens: Int[Array, "example seq"], summarise: Callable[..., Any], *per_example: Array
) -> ForwardOutput:
    """Forward over examples with summarise(pattern [head, seq, kv_seq], tokens, *per_example) per layer.

    pattern_summaries come back as [example, layer, ...]; the full patterns are never stored.
    """

    def one(example_tokens: Array, *extra: Array) -> ForwardOutput:
        return forward(weights, example_tokens, reduce_patterns=lambda pattern: summarise(pattern, example_tokens, *extra))

    return jax.vmap(one)(tokens, *per_example)


def _repeated_summary(pattern: Array, tokens: Array) -> tuple[Array, Array]:
    """prefix_matching and duplicate_token of every head of a layer: two [head]."""
    over_heads = lambda kernel: jax.vmap(kernel, in_axes=(0, None))(pattern, tokens)  # noqa: E731
    return over_heads(prefix_matching), over_heads(duplicate_token)


def _prefix2_summary(pattern: Array, tokens: Array, queries: Array) -> Array:
    return jax.vmap(prefix_matching, in_axes=(0, None, None))(pattern, tokens, queries)


def _previous_token_summary(pattern: Array, tokens: Array) -> Array:
    return jax.vmap(previous_token)(pattern)


def _checkpoint_prefix_matching(weights: Weights, tokens: Int[Array, "example seq"]) -> Float[Array, "layer head"]:
    # Mean of per-example means: equal to the mean over all queries when every example has
    # the same number of repeated tokens, as every repeated-random-token probe does.
    per_layer = lambda pattern, t: jax.vmap(prefix_matching, in_axes=(0, None))(pattern, t)  # noqa: E731
    return _summarised_forward(weights, tokens, per_layer).pattern_summaries.mean(axis=0)


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
    NaN unless src_layer < dst_layer; model: [ckpt]; curve: [ckpt, seq];
    head_curve: [ckpt, layer, head, seq]. NaN marks a score that is undefined there.
    """

    head: dict[str, Float[Array, "ckpt layer head"]]
    pair: dict[str, Float[Array, "ckpt layer head layer head"]]
    model: dict[str, Float[Array, " ckpt"]]
    curve: dict[str, Float[Array, "ckpt seq"]]  # per_token_loss by context index (NaN at 0)
    head_curve: dict[str, Float[Array, "ckpt layer head seq"]]  # per-head ablation curves


def _over_heads(kernel: Callable[..., Array], *, example_axes: tuple, head_axes: tuple) -> Callable[..., Array]:
    """kernel of one head on one example -> [example, layer, head]; axes as in jax.vmap."""
    per_layer = jax.vmap(jax.vmap(kernel, in_axes=head_axes), in_axes=head_axes)
    return jax.vmap(per_layer, in_axes=example_axes)


def _copying(weights: Weights, tokens: Int[Array, "example seq"]) -> Float[Array, "layer head"]:
    out = jax.vmap(lambda t: forward(weights, t, return_patterns=True, return_head_outputs=True))(tokens)
    spec = weights.spec
    final_w = weights.ln_final_w if weights.ln_final_w is not None else jnp.ones(spec.d_model, weights.W_U.dtype)
    kernel = functools.partial(copying, centre=spec.norm == NormKind.LAYERNORM)
    # Over (pattern, head_output) per head; final scale, norm weight, W_U and tokens shared.
    scores = _over_heads(
        kernel, example_axes=(0, 0, 0, None, None, 0), head_axes=(0, 0, None, None, None, None)
    )(out.patterns, out.head_outputs, out.final_scale, final_w, weights.W_U, tokens)
    return jnp.nanmean(scores, axis=0)


def _empirical_head_scores(weights: Weights, probes: ProbeArrays) -> tuple[dict[str, Array], ForwardOutput]:
    on_repeated = _summarised_forward(weights, probes.repeated, _repeated_summary)
    prefix_matching_scores, duplicate_token_scores = (s.mean(axis=0) for s in on_repeated.pattern_summaries)
    prefix2 = _summarised_forward(weights, probes.prefix2, _prefix2_summary, probes.prefix2_queries)
    prefix2 = prefix2.pattern_summaries.mean(axis=0)
    head = {
        "prefix_matching": prefix_matching_scores,
        "duplicate_token": duplicate_token_scores,
        "copying": _copying(weights, probes.copying),
    }
    head["prefix2_sensitivity"] = head["prefix_matching"] - prefix2
    return head, on_repeated


def token_losses(logits: Float[Array, "example seq d_vocab"], tokens: Int[Array, "example seq"]) -> Float[Array, "example seq"]:
    """Cross-entropy of token i given tokens[:i], at index i; index 0 (nothing to condition on) is NaN."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(nll, ((0, 0), (1, 0)), constant_values=jnp.nan)


def _induction_loss(repeated_logits: Array, repeated: Array, config: ProbeConfig) -> Array:
    # The second half of the repeated body, which an induction head predicts.
    body = config.block_len * config.n_repeats
    second_half = repeated.shape[1] - body + body // 2
    return token_losses(repeated_logits, repeated)[:, second_half:].mean()


class _DatasetScores(NamedTuple):
    per_token_loss: Float[Array, " seq"]
    icl_score: Float[Array, ""]
    previous_token: Float[Array, "layer head"]
    head: dict[str, Array]  # ablation deltas of icl_score
    head_curve: dict[str, Array]  # ablation deltas of per_token_loss


def _dataset_scores(weights: Weights, dataset: Int[Array, "example seq"], config: ProbeConfig) -> _DatasetScores:
    # Full patterns only for the pattern-preserving ablation; previous_token needs a summary.
    clean = jax.vmap(
        lambda t: forward(weights, t, return_patterns=config.ablation, reduce_patterns=jax.vmap(previous_token))
    )(dataset)

    def curve_and_icl(logits):
        curve = token_losses(logits, dataset).mean(axis=0)
        return curve, curve[config.icl_late] - curve[config.icl_early]

    curve, icl = curve_and_icl(clean.logits)
    head: dict[str, Array] = {}
    head_curve: dict[str, Array] = {}
    if config.ablation:
        spec = weights.spec
        n_heads = spec.n_layers * spec.n_heads
        masks = 1.0 - jnp.eye(n_heads, dtype=clean.logits.dtype).reshape(n_heads, spec.n_layers, spec.n_heads)

        def ablated(mask, frozen):
            one = lambda t, f: forward(weights, t, head_mask=mask, frozen_patterns=f).logits  # noqa: E731
            return curve_and_icl(jax.vmap(one)(dataset, frozen))

        # One layer's heads at a time (vmapped), layers in sequence: memory of n_heads forward passes.
        for suffix, frozen in (("", None), ("_pattern_preserving", clean.patterns)):
            curves, icls = jax.lax.map(lambda m: ablated(m, frozen), masks, batch_size=spec.n_heads)
            shape = (spec.n_layers, spec.n_heads)
            head["ablation_icl_delta" + suffix] = (icls - icl).reshape(shape)
            head_curve["ablation_per_token_loss_delta" + suffix] = (curves - curve).reshape(*shape, -1)
    return _DatasetScores(curve, icl, clean.pattern_summaries.mean(axis=0), head, head_curve)


# Source layers are scored in at most this many compiled blocks: one block per layer would
# grow compile time with depth (13 s more at 32 layers), one block for all would score
# every backward pair too (2x the work).
_PAIR_BLOCKS = 4


def _earlier_pairs(
    score: Callable[..., Array], left: tuple[Array, Array], right: tuple[Array, Array], *, sources_in_sequence: bool = False
) -> Float[Array, "layer head layer head"]:
    """score(earlier head's factors, later head's factors) at every (l1, h1, l2, h2) with l1 < l2, else NaN.

    Source layers go in a few contiguous blocks; within a block, one source layer at a
    time (lax.map) against every head of the layers after the block's first, so little
    beyond the forward pairs is scored (each may be an eigenproblem: in a 2-layer model
    only a quarter of all pairs are). Slicing rather than gathering pairs keeps the
    factors uncopied, which matters at GPT-2 size. sources_in_sequence: also a source
    layer's heads one at a time, for scores with large per-pair intermediates.
    """
    n_layers, n_heads = left[0].shape[:2]
    out = jnp.full((n_layers, n_heads, n_layers, n_heads), jnp.nan, left[0].dtype)
    if n_layers < 2:
        return out
    over_dst = jax.vmap(jax.vmap(score, in_axes=(None, None, 0, 0)), in_axes=(None, None, 0, 0))
    for block in np.array_split(np.arange(n_layers - 1), min(_PAIR_BLOCKS, n_layers - 1)):
        first, stop = int(block[0]), int(block[-1]) + 1
        later = tuple(x[first + 1 :] for x in right)  # [layer, head, ...]: destinations after the block's first layer
        per_source_head = lambda factors: over_dst(*factors, *later)  # noqa: E731
        if sources_in_sequence:
            per_source_layer = lambda factors: jax.lax.map(per_source_head, factors)  # noqa: E731
        else:
            per_source_layer = jax.vmap(per_source_head)
        values = jax.lax.map(per_source_layer, tuple(x[first:stop] for x in left))  # [src layer, head, dst layer, head]
        forward = np.arange(first, stop)[:, None, None, None] < np.arange(first + 1, n_layers)[None, None, :, None]
        out = out.at[first:stop, :, first + 1 :, :].set(jnp.where(forward, values, jnp.nan).astype(out.dtype))
    return out


def _mechanistic_scores(processed: Weights) -> tuple[dict[str, Array], dict[str, Array]]:
    spec = processed.spec
    W_E = processed.W_E
    per_head = jax.vmap(jax.vmap(ov_copying, in_axes=(None, 0, 0, None)), in_axes=(None, 0, 0, None))
    ov = (processed.W_V, processed.W_O)
    qk = (processed.W_Q, processed.W_K)
    pairs = {
        "q_composition": _earlier_pairs(q_composition, ov, qk),
        "k_composition": _earlier_pairs(k_composition, ov, qk),
        "v_composition": _earlier_pairs(v_composition, ov, ov),
        "induction_qk_positivity": _earlier_pairs(functools.partial(induction_qk_positivity, W_E), ov, qk),
        "induction_qk_trace": _earlier_pairs(functools.partial(induction_qk_trace, W_E), ov, qk),
    }
    head = {"ov_copying": per_head(W_E, processed.W_V, processed.W_O, processed.W_U)}
    nan_heads = jnp.full((spec.n_layers, spec.n_heads), jnp.nan, W_E.dtype)
    if spec.positional in (PositionalScheme.LEARNED, PositionalScheme.SHORTFORMER):
        head["qk_prev_token"] = jax.vmap(jax.vmap(qk_prev_token, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))(
            processed.W_pos, processed.W_Q, processed.W_K
        )
    else:
        head["qk_prev_token"] = nan_heads
    if spec.positional == PositionalScheme.LEARNED:
        # S is n_ctx x n_ctx per pair: one source head at a time bounds the memory.
        pairs["pointer_arithmetic"] = _earlier_pairs(
            functools.partial(pointer_arithmetic, processed.W_pos), ov, qk, sources_in_sequence=True
        )
    else:
        pairs["pointer_arithmetic"] = jnp.full(pairs["q_composition"].shape, jnp.nan, W_E.dtype)
    return head, pairs


def _weighted_over_sources(pair: Array, source_weight: Float[Array, "layer head"]) -> Float[Array, "layer head"]:
    """Per destination head: the mean of a pair score over earlier heads, weighted by source_weight."""
    valid = ~jnp.isnan(pair) & ~jnp.isnan(source_weight)[:, :, None, None]
    weight = jnp.where(valid, source_weight[:, :, None, None], 0.0)
    total = weight.sum(axis=(0, 1))
    weighted = jnp.where(valid, pair, 0.0) * weight
    return jnp.where(total > 0, weighted.sum(axis=(0, 1)) / jnp.where(total > 0, total, 1.0), jnp.nan)


def induction_verdicts(head: dict[str, Array], thresholds: VerdictThresholds) -> dict[str, Array]:
    """induction_behaviour, induction_mechanism (0/1) and whether they agree, per head [layer, head].

    Comparisons with NaN are false: a head whose score is undefined never passes.
    """
    behaviour = (head["prefix_matching"] > thresholds.prefix_matching) & (head["copying"] > thresholds.copying)
    is_previous = head["previous_token"] > thresholds.previous_token  # [layer, head]
    any_previous = jnp.any(is_previous, axis=1)  # [layer]
    # An upstream previous-token head: one in a strictly earlier layer.
    upstream = (jnp.cumsum(any_previous) - any_previous) > 0
    mechanism = (
        (head["ov_copying"] > thresholds.ov_copying)
        & (head["induction_qk_positivity"] > thresholds.induction_qk)
        & upstream[:, None]
    )
    as_float = lambda b: b.astype(head["prefix_matching"].dtype)  # noqa: E731
    return {
        "induction_behaviour": as_float(behaviour),
        "induction_mechanism": as_float(mechanism),
        "induction_verdicts_agree": as_float(behaviour == mechanism),
    }


class ProbeArrays(NamedTuple):
    """Probes as device arrays, the traced inputs of the compiled pass."""

    repeated: Int[Array, "example seq"]
    random: Int[Array, "example seq"]
    copying: Int[Array, "example block"]
    prefix2: Int[Array, "example seq"]
    prefix2_queries: Array
    dataset: Int[Array, "example seq"] | None

    @classmethod
    def from_probes(cls, probes: Probes) -> "ProbeArrays":
        dataset = None if probes.dataset is None else jnp.asarray(probes.dataset)
        return cls(
            jnp.asarray(probes.repeated),
            jnp.asarray(probes.random),
            jnp.asarray(probes.copying),
            jnp.asarray(probes.prefix2),
            jnp.asarray(probes.prefix2_queries),
            dataset,
        )


def _checkpoint_scores(weights: Weights, probes: ProbeArrays, config: ProbeConfig = ProbeConfig()) -> ScoreResults:
    """Every score of one checkpoint (written for one; batched by _score_all)."""
    head, on_repeated = _empirical_head_scores(weights, probes)
    model = {"induction_loss": _induction_loss(on_repeated.logits, probes.repeated, config)}
    curve: dict[str, Array] = {}
    head_curve: dict[str, Array] = {}
    if probes.dataset is None:
        on_random = _summarised_forward(weights, probes.random, _previous_token_summary)
        head["previous_token"] = on_random.pattern_summaries.mean(axis=0)
    else:
        text = _dataset_scores(weights, probes.dataset, config)
        head["previous_token"] = text.previous_token
        model["icl_score"] = text.icl_score
        curve["per_token_loss"] = text.per_token_loss
        head.update(text.head)
        head_curve.update(text.head_curve)
    mechanistic_head, pair = _mechanistic_scores(process_weights(weights))
    head.update(mechanistic_head)
    # Olsson's per-head induction QK terms: pairs weighted by how previous-token-like the source is.
    for name in ("induction_qk_positivity", "induction_qk_trace"):
        head[name] = _weighted_over_sources(pair[name], head["previous_token"])
    # Pointer arithmetic reads a position copied by a head that attends to earlier copies.
    head["pointer_arithmetic"] = _weighted_over_sources(pair["pointer_arithmetic"], head["duplicate_token"])
    head.update(induction_verdicts(head, config.thresholds))
    return ScoreResults(head=head, pair=pair, model=model, curve=curve, head_curve=head_curve)


def _score_checkpoints(
    weights: Weights,
    probes: ProbeArrays,
    valid: Bool[Array, " ckpt"] | None,
    config: ProbeConfig,
    checkpoints_per_pass: int | None,
) -> ScoreResults:
    def one(w: Weights) -> ScoreResults:
        return _checkpoint_scores(w, probes, config)

    if valid is not None and checkpoints_per_pass == 1:
        # One row at a time, so rows without a checkpoint can be skipped (a vmapped cond
        # would run both branches).
        shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], weights))
        return jax.lax.map(lambda row: jax.lax.cond(row[1], one, lambda _: _nan_like(shapes), row[0]), (weights, valid))
    if checkpoints_per_pass is None:
        results = jax.vmap(one)(weights)
    else:  # vmap within chunks, scan across them: the working set is that of one chunk
        results = jax.lax.map(one, weights, batch_size=checkpoints_per_pass)
    return results if valid is None else _where_valid(valid, results)


def _nan_like(shapes: ScoreResults) -> ScoreResults:
    return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)


def _where_valid(valid: Bool[Array, " ckpt"], results: ScoreResults) -> ScoreResults:
    return jax.tree.map(lambda x: jnp.where(valid.reshape(-1, *(1,) * (x.ndim - 1)), x, jnp.nan), results)


_score_all = jax.jit(_score_checkpoints, static_argnames=("config", "checkpoints_per_pass"))


@functools.partial(jax.jit, static_argnames=("config", "checkpoints_per_pass", "mesh", "axis", "manual"))
def _score_all_per_device(
    weights: Weights,
    probes: ProbeArrays,
    valid: Bool[Array, " ckpt"] | None,
    config: ProbeConfig,
    checkpoints_per_pass: int | None,
    mesh: Mesh,
    axis: str,
    manual: frozenset[str],
) -> ScoreResults:
    """_score_all with each device scoring its own checkpoints: no collective on the ckpt axis.

    Checkpoints are independent, but left to the SPMD partitioner the program is not:
    the eigenvalue step (a LAPACK call or a host callback, neither partitionable) and a
    chunked lax.map over a sharded axis are gathered across devices, and on jaxlib
    0.10's CPU runtime those collectives deadlock next to the rest of the program (the
    quickstart model on 2 CPU devices hangs; tests/test_cpu_runtime.py). shard_map makes
    the ckpt axis manual, so each device runs the per-checkpoint program on its slice.
    ``manual``: every mesh axis when the others have one device each (host callbacks,
    the TPU eigenvalue path, need that), else the ckpt axis alone, the head axis staying
    with the partitioner.
    """
    specs = (
        jax.tree.map(lambda _: PartitionSpec(axis), weights),
        jax.tree.map(lambda _: PartitionSpec(), probes),
        PartitionSpec(axis),
    )
    local = functools.partial(_score_checkpoints, config=config, checkpoints_per_pass=checkpoints_per_pass)
    per_device = jax.shard_map(
        local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(axis), axis_names=manual, check_vma=False
    )
    return per_device(weights, probes, valid)


def _checkpoint_axis(weights: Weights) -> tuple[Mesh, str, frozenset[str]] | None:
    """(mesh, ckpt axis name, manual axes) when the ckpt axis of ``weights`` is sharded
    over several devices and each device can score its own checkpoints; else None.

    Every mesh axis is manual unless another axis (head) has several devices on a GPU,
    where the head axis stays with the partitioner (jnp.linalg.eigvals partitions by
    gathering, which GPU collectives handle). On CPU a head axis is then replicated: each
    device scores whole checkpoints (a CPU has no memory limit that head sharding would
    lift). On TPU, whose eigenvalue host callback needs every axis manual, a head axis
    leaves the program to the partitioner.
    """
    sharding = getattr(weights.W_E, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
        return None
    axis = sharding.spec[0]
    mesh = sharding.mesh
    if not isinstance(axis, str) or mesh.shape[axis] == 1:
        return None
    if all(size == 1 for name, size in mesh.shape.items() if name != axis):
        return mesh, axis, frozenset(mesh.axis_names)
    platform = mesh.devices.flat[0].platform
    if platform in ("gpu", "cuda", "rocm"):
        return mesh, axis, frozenset({axis})
    if platform == "cpu":
        return mesh, axis, frozenset(mesh.axis_names)
    return None


# Bumped whenever a definition changes what a score's number is: part of the results'
# identity in the store (scan.probe_identity), so old and new numbers are never mixed.
SCORES_VERSION = 1

# Every name score_all can return (docs/scores.md): the public vocabulary of the store and exports.
HEAD_SCORE_NAMES = frozenset({
    "prefix_matching", "previous_token", "duplicate_token", "copying", "prefix2_sensitivity", "ov_copying",
    "qk_prev_token", "induction_qk_positivity", "induction_qk_trace", "pointer_arithmetic",
    "induction_behaviour", "induction_mechanism", "induction_verdicts_agree",
    "ablation_icl_delta", "ablation_icl_delta_pattern_preserving",
})  # fmt: skip
PAIR_SCORE_NAMES = frozenset({
    "q_composition", "k_composition", "v_composition", "induction_qk_positivity", "induction_qk_trace",
    "pointer_arithmetic",
})  # fmt: skip
MODEL_SCORE_NAMES = frozenset({"induction_loss", "icl_score"})
CURVE_NAMES = frozenset({
    "per_token_loss", "ablation_per_token_loss_delta", "ablation_per_token_loss_delta_pattern_preserving",
})  # fmt: skip
PUBLIC_SCORE_NAMES = HEAD_SCORE_NAMES | PAIR_SCORE_NAMES | MODEL_SCORE_NAMES | CURVE_NAMES


def _checkpoint_flags(
    valid: Array | np.ndarray, n_checkpoints: int, sharded: tuple[Mesh, str, frozenset[str]] | None
) -> Bool[Array, " ckpt"]:
    if not isinstance(valid, jax.Array):
        valid = np.asarray(valid, bool)
    if valid.shape != (n_checkpoints,):
        raise ValueError(f"valid must have shape ({n_checkpoints},), one flag per checkpoint; got shape {valid.shape}")
    if isinstance(valid, jax.Array):
        return valid.astype(bool)
    if sharded is None:
        return jnp.asarray(valid)
    # Host flags placed like the ckpt axis: a global array, so that it works across processes too.
    host = valid
    return jax.make_array_from_callback(host.shape, NamedSharding(sharded[0], PartitionSpec(sharded[1])), lambda i: host[i])


def score_all(
    weights: Weights,
    probes: Probes,
    *,
    checkpoints_per_pass: int | None = None,
    valid: Bool[Array, " ckpt"] | np.ndarray | None = None,
) -> ScoreResults:
    """Every score for every head (and head pair) of ckpt-stacked Weights, in one pass.

    ``weights`` carries a leading ckpt axis (`stack_weights`); it may be sharded over
    devices along that axis (a NamedSharding), and the result is sharded the same way;
    each device then scores its own checkpoints (`_score_all_per_device`). Compiled once per
    (model spec, number of checkpoints, probe shapes and config, sharding,
    checkpoints_per_pass, whether ``valid`` is given).

    checkpoints_per_pass: None vmaps all checkpoints at once (every intermediate of every
    checkpoint is live together; best on accelerators with memory to spare); k computes
    k at a time inside the same compiled pass, bounding memory to k checkpoints' worth.
    valid: which rows hold a real checkpoint (a batch padded to its compiled size has
        rows that do not); every score of the others is NaN. With one checkpoint per pass
        the others are not computed at all, which is what makes a short last batch cheap.
        Shard it like the ckpt axis of ``weights``.
    """
    if checkpoints_per_pass is not None and (not isinstance(checkpoints_per_pass, int) or checkpoints_per_pass < 1):
        raise ValueError(f"checkpoints_per_pass must be a positive integer or None, got {checkpoints_per_pass}")
    arrays = ProbeArrays.from_probes(probes)
    sharded = _checkpoint_axis(weights)
    if valid is not None:
        valid = _checkpoint_flags(valid, weights.W_E.shape[0], sharded)
    if sharded is None:
        return _score_all(weights, arrays, valid, probes.config, checkpoints_per_pass)
    return _score_all_per_device(weights, arrays, valid, probes.config, checkpoints_per_pass, *sharded)
