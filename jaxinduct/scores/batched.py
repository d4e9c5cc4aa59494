"""The one place where score kernels are batched over examples, heads, layers and checkpoints.

`score_all` computes every registered score (`jaxinduct.scores.registry`), or a
selection, for ckpt-stacked Weights in one compiled pass. Each score is a function of
one checkpoint (`jaxinduct.scores.context.Checkpoint`); `LazyCheckpoint` is that
checkpoint inside the traced per-checkpoint program: it batches the kernels (over
examples in the forward passes, over heads and head pairs) and computes every shared
intermediate at most once, when a selected score first needs it. The per-checkpoint
program is then batched over checkpoints (vmap, chunks, devices) in `_score_checkpoints`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from jaxinduct.model.forward import ForwardOutput, forward
from jaxinduct.model.processing import VocabularyProducts, process_weights, vocabulary_products
from jaxinduct.model.weights import LAYER_FIELDS, ModelSpec, NormKind, Weights, widened
from jaxinduct.parallel import CheckpointParallel, checkpoint_parallel, mesh_of, per_device, place_flags
from jaxinduct.scores import registry
from jaxinduct.scores.compat import DetectionPattern, ErrorMeasure, detection_pattern, pattern_similarity
from jaxinduct.scores.context import Ablated, Checkpoint, ProbeArrays, RepeatedSummaries
from jaxinduct.scores.empirical import copying_of_projection, copying_readout, duplicate_token, prefix_matching, previous_token
from jaxinduct.scores.losses import icl_of_curve, token_losses, unembedded_token_losses
from jaxinduct.scores.mechanistic import composition_score, cpu_eigenvalues_on_host
from jaxinduct.scores.probes import ProbeConfig, Probes, VerdictThresholds
from jaxinduct.scores.registry import SCORES_VERSION, Kind, Score

__all__ = [
    "CURVE_NAMES", "HEAD_SCORE_NAMES", "MODEL_SCORE_NAMES", "PAIR_SCORE_NAMES", "PUBLIC_SCORE_NAMES", "SCORES_VERSION",
    "LazyCheckpoint", "ProbeArrays", "ScoreResults", "all_composition_scores", "detect_head", "head_prefix_matching",
    "ScoreProgram", "compile_score_all", "induction_verdicts", "score_all", "stacked_prefix_matching", "token_losses",
]  # fmt: skip

T = TypeVar("T")


def _summarised_forward(
    weights: Weights, tokens: Int[Array, "example seq"], summarise: Callable[..., Any], *per_example: Array
) -> ForwardOutput:
    """Forward over examples with summarise(pattern [head, seq, kv_seq], tokens, *per_example) per layer.

    pattern_summaries come back as [example, layer, ...]; the full patterns are never stored.
    """

    def one(example_tokens: Array, *extra: Array) -> ForwardOutput:
        return forward(weights, example_tokens, reduce_patterns=lambda pattern: summarise(pattern, example_tokens, *extra))

    return jax.vmap(one)(tokens, *per_example)


def _repeated_summary(pattern: Array, tokens: Array) -> RepeatedSummaries:
    """prefix_matching and duplicate_token of every head of a layer: two [head]."""
    over_heads = lambda kernel: jax.vmap(kernel, in_axes=(0, None))(pattern, tokens)  # noqa: E731
    return RepeatedSummaries(over_heads(prefix_matching), over_heads(duplicate_token))


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


# --- every registered score of one checkpoint ---------------------------------------------------


class ScoreResults(NamedTuple):
    """Scores by public name (docs/scores.md), for every checkpoint of a stack; one field per `Kind`.

    head: [ckpt, layer, head]; pair: [ckpt, src_layer, src_head, dst_layer, dst_head],
    NaN unless src_layer < dst_layer; model: [ckpt]; curve: [ckpt, seq];
    head_curve: [ckpt, layer, head, seq]. NaN marks a score that is undefined there.
    """

    head: dict[str, Float[Array, "ckpt layer head"]]
    pair: dict[str, Float[Array, "ckpt layer head layer head"]]
    model: dict[str, Float[Array, " ckpt"]]
    curve: dict[str, Float[Array, "ckpt seq"]]  # per_token_loss by context index (NaN at 0)
    head_curve: dict[str, Float[Array, "ckpt layer head seq"]]  # per-head ablation curves


assert ScoreResults._fields == tuple(kind.value for kind in Kind), "one ScoreResults field per Kind, named by its value"


def _over_heads(kernel: Callable[..., Array], *, example_axes: tuple, head_axes: tuple) -> Callable[..., Array]:
    """kernel of one head on one example -> [example, layer, head]; axes as in jax.vmap."""
    per_layer = jax.vmap(jax.vmap(kernel, in_axes=head_axes), in_axes=head_axes)
    return jax.vmap(per_layer, in_axes=example_axes)


# Source layers are scored in at most this many compiled blocks: one block per layer would
# grow compile time with depth (13 s more at 32 layers), one block for all would score
# every backward pair too (2x the work).
_PAIR_BLOCKS = 4


def _earlier_pairs(
    score: Callable[..., Array], left: tuple[Array, ...], right: tuple[Array, ...], *, sources_in_sequence: bool = False
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


class LazyCheckpoint:
    """One checkpoint inside the traced per-checkpoint program (`jaxinduct.scores.context.Checkpoint`).

    Every intermediate is a cached property, traced when a score first reads it: a
    selection of scores traces only the forward passes and weight products it needs,
    and one that several scores share is traced once.
    """

    def __init__(self, weights: Weights, probes: ProbeArrays, config: ProbeConfig) -> None:
        self.weights = weights
        self.probes = probes
        self.config = config
        self._values: dict[Callable[[Checkpoint], Any], Any] = {}
        self._ablations: dict[bool, Ablated | None] = {}

    @property
    def spec(self) -> ModelSpec:
        return self.weights.spec

    @property
    def dtype(self) -> Any:
        return jnp.promote_types(self.weights.W_E.dtype, jnp.float32)  # as forward computes

    def of(self, compute: Callable[[Checkpoint], T]) -> T:
        if compute not in self._values:
            self._values[compute] = compute(self)
        return self._values[compute]

    # --- weights ---

    @functools.cached_property
    def processed(self) -> Weights:
        return process_weights(self.weights)

    @functools.cached_property
    def vocabulary_products(self) -> VocabularyProducts:
        return vocabulary_products(self.weights, self.processed)

    @property
    def ov(self) -> tuple[Array, Array]:
        return self.processed.W_V, self.processed.W_O

    @property
    def qk(self) -> tuple[Array, Array]:
        return self.processed.W_Q, self.processed.W_K

    def per_head(self, kernel: Callable[..., Array], *per_head: Array) -> Float[Array, "layer head"]:
        return jax.vmap(jax.vmap(kernel))(*per_head)

    earlier_pairs = staticmethod(_earlier_pairs)

    # --- forward passes over the probes ---

    @functools.cached_property
    def repeated(self) -> ForwardOutput:
        return _summarised_forward(self.weights, self.probes.repeated, _repeated_summary)

    @functools.cached_property
    def prefix2(self) -> Float[Array, "example layer head"]:
        probes = self.probes
        return _summarised_forward(self.weights, probes.prefix2, _prefix2_summary, probes.prefix2_queries).pattern_summaries

    @functools.cached_property
    def copying(self) -> Float[Array, "example layer head"]:
        weights, tokens = self.weights, self.probes.copying
        spec = weights.spec
        final_w = weights.ln_final_w if weights.ln_final_w is not None else jnp.ones(spec.d_model, weights.W_U.dtype)
        centre = spec.norm == NormKind.LAYERNORM

        def one(t: Array) -> ForwardOutput:
            # Each layer's head outputs read through the sequence's readout inside the layer
            # loop: [head, seq, seq] per layer is kept, never [head, seq, d_model].
            readout = copying_readout(final_w, weights.W_U, t, centre)
            project = lambda head_out: head_out @ readout  # noqa: E731
            return forward(weights, t, return_patterns=True, return_head_outputs=True, reduce_head_outputs=project)

        out = jax.vmap(one)(tokens)
        # Over (pattern, projected head output) per head; the final scale shared by a sequence's heads.
        return _over_heads(copying_of_projection, example_axes=(0, 0, 0), head_axes=(0, 0, None))(
            out.patterns, out.head_outputs, out.final_scale
        )

    @functools.cached_property
    def random_previous_token(self) -> Float[Array, "example layer head"]:
        return _summarised_forward(self.weights, self.probes.random, _previous_token_summary).pattern_summaries

    @functools.cached_property
    def dataset(self) -> ForwardOutput | None:
        if self.probes.dataset is None:
            return None
        # Full patterns only for the pattern-preserving ablation; previous_token needs a summary.
        weights, config = self.weights, self.config
        return jax.vmap(
            lambda t: forward(weights, t, return_patterns=config.ablation, reduce_patterns=jax.vmap(previous_token))
        )(self.probes.dataset)

    def ablated(self, pattern_preserving: bool) -> Ablated | None:
        if pattern_preserving not in self._ablations:
            self._ablations[pattern_preserving] = self._ablate(pattern_preserving)
        return self._ablations[pattern_preserving]

    def _ablate(self, pattern_preserving: bool) -> Ablated | None:
        clean = self.dataset
        if clean is None or not self.config.ablation:
            return None
        weights, dataset, config, spec = self.weights, self.probes.dataset, self.config, self.spec
        frozen = clean.patterns if pattern_preserving else None
        n_heads = spec.n_layers * spec.n_heads
        masks = 1.0 - jnp.eye(n_heads, dtype=clean.final.dtype).reshape(n_heads, spec.n_layers, spec.n_heads)

        def with_head_zeroed(mask: Array) -> tuple[Array, Array]:
            one = lambda t, f: forward(weights, t, head_mask=mask, frozen_patterns=f).final  # noqa: E731
            curve = unembedded_token_losses(weights, jax.vmap(one)(dataset, frozen), dataset).mean(axis=0)
            return curve, icl_of_curve(curve, config)

        # One layer's heads at a time (vmapped), layers in sequence: memory of n_heads forward passes.
        curves, icls = jax.lax.map(with_head_zeroed, masks, batch_size=spec.n_heads)
        return Ablated(per_token_loss=curves, icl_score=icls)


class _GivenScores:
    """A checkpoint known only by some of its scores: what `induction_verdicts` evaluates the verdicts on."""

    def __init__(self, known: Mapping[Callable[..., Any], Array], config: ProbeConfig, dtype: Any) -> None:
        self._known, self.config, self.dtype = dict(known), config, dtype

    def of(self, compute: Callable[..., T]) -> T:
        if compute not in self._known:
            # A score other than a verdict must be given; the verdicts and their helpers are computed.
            needed = [s.name for s in registry.scores() if s.function is compute and not s.verdict]
            if needed:
                raise registry.UnknownScoreError(f"induction_verdicts needs the head score {needed[0]!r}, which was not given")
            self._known[compute] = compute(self)
        return self._known[compute]


def induction_verdicts(head: Mapping[str, Float[Array, "layer head"]], thresholds: VerdictThresholds) -> dict[str, Array]:
    """The registered verdicts (induction_behaviour, induction_mechanism, induction_verdicts_agree),
    0/1 per head [layer, head], from one checkpoint's head scores given by name.

    Comparisons with NaN are false: a head whose score is undefined never passes.
    """
    head_scores = registry.scores(Kind.HEAD)
    known = {s.function: head[s.name] for s in head_scores if s.name in head}
    given = cast(Checkpoint, _GivenScores(known, ProbeConfig(thresholds=thresholds), jnp.result_type(*head.values())))
    return {s.name: given.of(s.function) for s in head_scores if s.verdict}


# Per-layer weights are read by the forward pass, which widens them a layer at a time, and by
# process_weights, which widens them as it processes them: widened up front, a float16
# Pythia-1.4B would hold 4.8 GB of float32 copies of its layers for the whole program.
_WIDENED_WHERE_READ = LAYER_FIELDS


def _checkpoint_scores(
    weights: Weights, probes: ProbeArrays, config: ProbeConfig = ProbeConfig(), selection: Sequence[Score] | None = None
) -> ScoreResults:
    """The selected scores of one checkpoint (every registered one when None); batched by _score_checkpoints.

    A score whose compute returns None (not defined for these probes) is left out. Weights
    stored narrower than float32 are widened here, inside the program (`widened`).
    """
    checkpoint = LazyCheckpoint(widened(weights, keep=_WIDENED_WHERE_READ), probes, config)
    groups: dict[Kind, dict[str, Array]] = {kind: {} for kind in Kind}
    for score in registry.scores() if selection is None else selection:
        value = checkpoint.of(score.function)
        if value is not None:
            groups[score.kind][score.name] = value
    return ScoreResults(**{kind.value: groups[kind] for kind in Kind})


def _score_checkpoints(
    weights: Weights,
    probes: ProbeArrays,
    valid: Bool[Array, " ckpt"] | None,
    config: ProbeConfig,
    checkpoints_per_pass: int | None,
    selection: tuple[Score, ...],
    host_eigenvalues: bool = False,
) -> ScoreResults:
    with cpu_eigenvalues_on_host(host_eigenvalues):
        return _score_stack(weights, probes, valid, config, checkpoints_per_pass, selection)


def _score_stack(
    weights: Weights,
    probes: ProbeArrays,
    valid: Bool[Array, " ckpt"] | None,
    config: ProbeConfig,
    checkpoints_per_pass: int | None,
    selection: tuple[Score, ...],
) -> ScoreResults:
    def one(w: Weights) -> ScoreResults:
        return _checkpoint_scores(w, probes, config, selection)

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


# selection is static: the program is specialised on the Score entries themselves (their
# compute functions included), so another selection, or a score registered since, compiles anew.
# host_eigenvalues: `mechanistic.cpu_eigenvalues_on_host` while tracing (static: part of the key).
_score_all = jax.jit(
    _score_checkpoints, static_argnames=("config", "checkpoints_per_pass", "selection", "host_eigenvalues")
)


@functools.partial(
    jax.jit, static_argnames=("config", "checkpoints_per_pass", "selection", "parallel", "host_eigenvalues")
)
def _score_all_per_device(
    weights: Weights,
    probes: ProbeArrays,
    valid: Bool[Array, " ckpt"] | None,
    config: ProbeConfig,
    checkpoints_per_pass: int | None,
    selection: tuple[Score, ...],
    parallel: CheckpointParallel,
    host_eigenvalues: bool = False,
) -> ScoreResults:
    """_score_all with each device scoring its own checkpoints (`jaxinduct.parallel.per_device`)."""

    def local(w: Weights, v: Array | None, p: ProbeArrays) -> ScoreResults:
        return _score_checkpoints(w, p, v, config, checkpoints_per_pass, selection, host_eigenvalues)

    return per_device(local, parallel, n_sharded=2, n_replicated=1)(weights, valid, probes)


# The built-in names by kind, as frozensets (read at import: a score registered later is not
# in them; registry.names() is always current). CURVE_NAMES holds both kinds of curve, as
# the store keeps them together.
HEAD_SCORE_NAMES = frozenset(registry.names(Kind.HEAD))
PAIR_SCORE_NAMES = frozenset(registry.names(Kind.PAIR))
MODEL_SCORE_NAMES = frozenset(registry.names(Kind.MODEL))
CURVE_NAMES = frozenset(registry.names(Kind.CURVE) + registry.names(Kind.HEAD_CURVE))
PUBLIC_SCORE_NAMES = frozenset(registry.names())


def score_all(
    weights: Weights,
    probes: Probes,
    *,
    mesh: Mesh | None = None,
    checkpoints_per_pass: int | None = None,
    valid: Bool[Array, " ckpt"] | np.ndarray | None = None,
    scores: Sequence[str] | None = None,
) -> ScoreResults:
    """Every registered score (or the selected ones) for every head, head pair and checkpoint
    of ckpt-stacked Weights, in one pass.

    ``weights`` carries a leading ckpt axis (`stack_weights`); it may be placed on a
    device mesh with its ckpt axis sharded (`jaxinduct.parallel.place_batch`), and the
    result is sharded the same way: each device then scores its own checkpoints
    (`jaxinduct.parallel.per_device`). Compiled once per (model spec, number of
    checkpoints, probe shapes and config, mesh, checkpoints_per_pass, whether ``valid``
    is given, selected scores); `compile_score_all` compiles ahead of time instead.

    mesh: the mesh ``weights`` are placed on (the engine passes it); left out, the mesh of
        their NamedSharding if they have one (weights a caller placed itself), else none
        (one program on the default device).
    checkpoints_per_pass: None vmaps all checkpoints at once (every intermediate of every
        checkpoint is live together; best on accelerators with memory to spare); k computes
        k at a time inside the same compiled pass, bounding memory to k checkpoints' worth.
    valid: which rows hold a real checkpoint (a batch padded to its compiled size has
        rows that do not); every score of the others is NaN. With one checkpoint per pass
        the others are not computed at all, which is what makes a short last batch cheap.
    scores: names to compute (every kind registered under each name); None: every
        registered score. Only these are returned, and only what they read is computed
        (ov_copying alone runs no forward pass). An unknown name raises
        `registry.UnknownScoreError`, naming the known ones.
    """
    plan = _plan(weights, probes, mesh, checkpoints_per_pass, valid, scores)
    return plan.program(*plan.arguments, **plan.static)


@dataclasses.dataclass(frozen=True)
class _Plan:
    program: Any  # the jitted function
    arguments: tuple[Any, ...]  # weights, probe arrays, placed valid flags
    static: dict[str, Any]
    parallel: CheckpointParallel | None


def _plan(
    weights: Weights,
    probes: Probes,
    mesh: Mesh | None,
    checkpoints_per_pass: int | None,
    valid: Bool[Array, " ckpt"] | np.ndarray | None,
    scores: Sequence[str] | None,
) -> _Plan:
    if checkpoints_per_pass is not None and (not isinstance(checkpoints_per_pass, int) or checkpoints_per_pass < 1):
        raise ValueError(f"checkpoints_per_pass must be a positive integer or None, got {checkpoints_per_pass}")
    selection = registry.select(scores)
    arrays = ProbeArrays.from_probes(probes)
    placed_on = mesh_of(weights)
    if mesh is not None and placed_on is not None and placed_on != mesh:
        raise ValueError("score_all: the weights are placed on another mesh than the one given")
    mesh = placed_on if mesh is None else mesh
    parallel = checkpoint_parallel(mesh)
    if valid is not None:
        valid = place_flags(valid, weights.W_E.shape[0], parallel)
    static: dict[str, Any] = dict(
        config=probes.config,
        checkpoints_per_pass=checkpoints_per_pass,
        selection=selection,
        # One program on several CPU devices takes the host eigenvalue path (see `eigenvalues`).
        host_eigenvalues=mesh is not None and mesh.devices.size > 1,
    )
    if parallel is None:
        return _Plan(_score_all, (weights, arrays, valid), static, None)
    return _Plan(_score_all_per_device, (weights, arrays, valid), {**static, "parallel": parallel}, parallel)


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreProgram:
    """`score_all` compiled ahead of time for one batch shape (`compile_score_all`).

    Call it with ckpt-stacked Weights placed as the ones it was compiled for (and the
    valid flags if it was compiled with them); it returns what score_all would.
    """

    compiled: jax.stages.Compiled
    probes: ProbeArrays
    parallel: CheckpointParallel | None
    n_checkpoints: int
    takes_valid: bool
    compile_seconds: float  # 0 when taken from this process's memo of compiled programs
    from_disk: bool = False  # loaded from JAX's persistent compilation cache, not compiled

    def __call__(self, weights: Weights, valid: Bool[Array, " ckpt"] | np.ndarray | None = None) -> ScoreResults:
        if (valid is not None) != self.takes_valid:
            raise ValueError(f"this program was compiled {'with' if self.takes_valid else 'without'} valid flags")
        if valid is not None:
            valid = place_flags(valid, self.n_checkpoints, self.parallel)
        return self.compiled(weights, self.probes, valid)


# The event JAX records when a program comes from its persistent compilation cache.
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

# Compiled programs by everything that selects one (argument shapes, dtypes and shardings,
# static options): a `watch` poll or repeated scan of the same shape in one process reuses
# its program. A few shapes at most, so the oldest is dropped beyond that.
_PROGRAMS: dict[Any, ScoreProgram] = {}
_PROGRAMS_KEPT = 4


def compile_score_all(
    weights: Weights,
    probes: Probes,
    *,
    mesh: Mesh | None = None,
    checkpoints_per_pass: int | None = None,
    valid: Bool[Array, " ckpt"] | np.ndarray | None = None,
    scores: Sequence[str] | None = None,
) -> ScoreProgram:
    """`score_all`'s program for batches shaped and placed like ``weights``, compiled now.

    Arguments as score_all's (the values of ``weights`` and ``valid`` are not read, only
    their shapes and placement). The compile time is measured apart
    (``compile_seconds``); JAX's persistent compilation cache, when enabled
    (`jaxinduct.engine.compile_cache`), makes a recompile in another process a load. The
    program's cost can be read from ``compiled`` (`jaxinduct.engine.cost.compiled_cost`).
    """
    plan = _plan(weights, probes, mesh, checkpoints_per_pass, valid, scores)
    key = (
        plan.program,
        jax.tree.structure(plan.arguments),
        tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(plan.arguments)),
        tuple(sorted(plan.static.items(), key=lambda item: item[0])),
    )
    if key in _PROGRAMS:  # the same program; these probes' values (the key holds only their shapes)
        return dataclasses.replace(_PROGRAMS[key], probes=plan.arguments[1], compile_seconds=0.0)
    hits: list[str] = []
    listener = lambda event, **_: hits.append(event) if event == _CACHE_HIT else None  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        start = time.perf_counter()
        compiled = plan.program.lower(*plan.arguments, **plan.static).compile()
        seconds = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_listener(listener)
    program = ScoreProgram(
        compiled, plan.arguments[1], plan.parallel, weights.W_E.shape[0], valid is not None, seconds, bool(hits)
    )
    _PROGRAMS[key] = program
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
        del _PROGRAMS[next(iter(_PROGRAMS))]
    return program
