"""Mechanistic (weights-only) scores of one head or one head pair (SCORES.md).

Circuits are products of low-rank factors, held as (left [d_model, d_head],
right [d_head, d_model]) pairs: W_OV = W_V W_O and W_QK = W_Q W_K^T. No
d_vocab x d_vocab (or d_model x d_model) matrix is ever formed:

- non-zero eigenvalues of a cyclic product equal those of the product taken from
  another starting factor (eig(AB) = eig(BA) up to zeros), so every spectrum is
  computed from a d_head x d_head matrix;
- Frobenius norms reduce to traces of d_head x d_head Gram matrices:
  |L R|_F^2 = tr(L^T L R R^T).

Run these on processed weights (`jaxinduct.model.processing.process_weights`). The
kernels are of one head or one head pair; the scores of one checkpoint at the end of the
module (`jaxinduct.scores.registry`) apply them to every head and every forward pair of
a checkpoint's processed weights, batched by `jaxinduct.scores.batched.LazyCheckpoint`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

from jaxinduct.model.weights import PositionalScheme
from jaxinduct.scores.context import Checkpoint
from jaxinduct.scores.empirical import duplicate_token_heads, previous_token_heads

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(*factors: Array) -> Array:
    out = factors[0]
    for f in factors[1:]:
        out = jnp.matmul(out, f, precision=_HIGHEST)
    return out


def eigenvalues(matrix: Float[Array, "n n"], *, on_host: bool | None = None) -> Complex[Array, " n"]:
    """Eigenvalues of a small non-symmetric matrix, on any backend.

    GPU and CPU lower jnp.linalg.eigvals (cuSOLVER, LAPACK). TPU has no eig lowering: there
    the (d_head x d_head) matrices go to the host, where numpy computes the spectra, one
    callback per compiled batch. On CPU the host path is taken too inside
    `cpu_eigenvalues_on_host` (score_all uses it when a program spans several CPU
    devices): jaxlib 0.10's LAPACK geev hangs the runtime when several CPU devices run it
    at once (tests/test_cpu_runtime.py). Otherwise the device path is preferred because JAX
    never writes a program with a host callback to its persistent compilation cache.

    The choice is made when the program is lowered for its platform
    (lax.platform_dependent), not from the machine that traces it, so a TPU program
    compiled ahead of time on a CPU host gets the host path. on_host: force one path (for
    tests). Neither path can be partitioned: sharded programs run it per device
    (`batched._score_all_per_device`).
    """
    if on_host is True:
        return _host_eigenvalues(matrix)
    if on_host is False:
        return jnp.linalg.eigvals(matrix)
    cpu = _host_eigenvalues if _CPU_ON_HOST.get() else jnp.linalg.eigvals
    return jax.lax.platform_dependent(matrix, default=jnp.linalg.eigvals, cpu=cpu, tpu=_host_eigenvalues)


_CPU_ON_HOST = contextvars.ContextVar("jaxinduct_cpu_eigenvalues_on_host", default=False)


@contextlib.contextmanager
def cpu_eigenvalues_on_host(enabled: bool = True) -> Iterator[None]:
    """Within this block, `eigenvalues` traced for the CPU backend take the host path.

    A trace-time switch: wrap the tracing of a program (and make ``enabled`` part of its
    jit cache key, as a static argument), not its execution.
    """
    token = _CPU_ON_HOST.set(enabled)
    try:
        yield
    finally:
        _CPU_ON_HOST.reset(token)


def _host_eigenvalues(matrix: Float[Array, "n n"]) -> Complex[Array, " n"]:
    dtype = jnp.result_type(matrix.dtype, jnp.complex64)
    out = jax.ShapeDtypeStruct(matrix.shape[:-1], dtype)
    return jax.pure_callback(
        lambda m: _eigenvalues_in_threads(np.asarray(m)).astype(dtype), out, matrix, vmap_method="broadcast_all"
    )


@functools.cache
def _eigen_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="jaxinduct-eig")


def _eigenvalues_in_threads(matrices: np.ndarray) -> np.ndarray:
    """np.linalg.eigvals of a stack [..., n, n], the stack split over the host's cores.

    LAPACK releases the GIL, so the parts run in parallel: a checkpoint's 1,024 spectra of
    64 x 64 (Pythia-70M's forward pairs) take 0.36 s on 2 cores instead of 0.65 s.
    """
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    workers = min(os.cpu_count() or 1, len(flat) // _MATRICES_PER_TASK)
    if workers < 2:
        return np.linalg.eigvals(matrices)
    parts = list(_eigen_pool().map(np.linalg.eigvals, np.array_split(flat, workers)))
    return np.concatenate(parts).reshape(*matrices.shape[:-1])


# Below this many matrices per thread the hand-off costs more than it saves.
_MATRICES_PER_TASK = 16


def positivity(eigs: Complex[Array, " n"]) -> Float[Array, ""]:
    """sum Re(lambda) / sum |lambda|, in [-1, 1]; NaN for an all-zero spectrum."""
    total = jnp.sum(jnp.abs(eigs))
    return jnp.where(total > 0, jnp.sum(eigs.real) / jnp.where(total > 0, total, 1.0), jnp.nan)


def ov_copying(
    W_E: Float[Array, "d_vocab d_model"],
    W_V: Float[Array, "d_model d_head"],
    W_O: Float[Array, "d_head d_model"],
    W_U: Float[Array, "d_model d_vocab"],
) -> Float[Array, ""]:
    """Positivity of the eigenvalues of the full OV circuit W_E W_V W_O W_U.

    Computed from the d_head x d_head cyclic product W_O W_U W_E W_V. A head whose
    OV circuit maps each token to itself (copying) scores 1; its negation -1.
    """
    return ov_copying_through(_mm(W_U, W_E), W_V, W_O)


def ov_copying_through(
    unembed_embed: Float[Array, "d_model d_model"], W_V: Float[Array, "d_model d_head"], W_O: Float[Array, "d_head d_model"]
) -> Float[Array, ""]:
    """`ov_copying` given W_U W_E (shared by every head): positivity of eig(W_O (W_U W_E) W_V)."""
    return positivity(eigenvalues(_mm(W_O, unembed_embed, W_V)))


def product_frobenius(
    left1: Float[Array, "d_model r1"],
    right1: Float[Array, "r1 d_model"],
    left2: Float[Array, "d_model r2"],
    right2: Float[Array, "r2 d_model"],
) -> Float[Array, ""]:
    """|left1 right1 left2 right2|_F from r x r Gram matrices."""
    middle = _mm(right1, left2)  # [r1, r2]
    gram_left = _mm(left1.T, left1)  # [r1, r1]
    gram_right = _mm(right2, right2.T)  # [r2, r2]
    squared = jnp.trace(_mm(gram_left, middle, gram_right, middle.T))
    return jnp.sqrt(jnp.maximum(squared, 0.0))


def factored_frobenius(left: Float[Array, "d_model r"], right: Float[Array, "r d_model"]) -> Float[Array, ""]:
    """|left right|_F = sqrt(tr(left^T left right right^T))."""
    squared = jnp.sum(_mm(left.T, left) * _mm(right, right.T))
    return jnp.sqrt(jnp.maximum(squared, 0.0))


def composition_score(
    left1: Float[Array, "d_model r1"],
    right1: Float[Array, "r1 d_model"],
    left2: Float[Array, "d_model r2"],
    right2: Float[Array, "r2 d_model"],
) -> Float[Array, ""]:
    """|A B|_F / (|A|_F |B|_F) for A = left1 right1 (an earlier head's OV) and B = left2 right2."""
    return product_frobenius(left1, right1, left2, right2) / (
        factored_frobenius(left1, right1) * factored_frobenius(left2, right2)
    )


def q_composition(W_V1, W_O1, W_Q2, W_K2) -> Float[Array, ""]:
    """How much head 1's output feeds head 2's queries: W_OV1 against W_QK2."""
    return composition_score(W_V1, W_O1, W_Q2, W_K2.T)


def k_composition(W_V1, W_O1, W_Q2, W_K2) -> Float[Array, ""]:
    """How much head 1's output feeds head 2's keys: W_OV1 against W_QK2^T."""
    return composition_score(W_V1, W_O1, W_K2, W_Q2.T)


def v_composition(W_V1, W_O1, W_V2, W_O2) -> Float[Array, ""]:
    """How much head 1's output feeds head 2's values: W_OV1 against W_OV2."""
    return composition_score(W_V1, W_O1, W_V2, W_O2)


def induction_qk_matrix(
    W_E: Float[Array, "d_vocab d_model"],
    W_V1: Float[Array, "d_model d_head"],
    W_O1: Float[Array, "d_head d_model"],
    W_Q2: Float[Array, "d_model d_head"],
    W_K2: Float[Array, "d_model d_head"],
) -> Float[Array, "d_head d_head"]:
    """The d_head x d_head cyclic form of W = W_E W_QK2 (W_E W_OV1)^T.

    W compares the query's token (through W_E W_Q2) with the token that head 1 moved
    into the key's position (W_E W_OV1, then W_K2). Its non-zero eigenvalues are those
    of K2^T O1^T V1^T (W_E^T W_E) Q2.
    """
    return induction_qk_matrix_through(_mm(W_E.T, W_E), W_V1, W_O1, W_Q2, W_K2)


def induction_qk_matrix_through(embed_gram: Float[Array, "d_model d_model"], W_V1, W_O1, W_Q2, W_K2) -> Float[Array, "d_head d_head"]:
    """`induction_qk_matrix` given W_E^T W_E (shared by every pair): K2^T O1^T V1^T (W_E^T W_E) Q2."""
    # Grouped so that the d_model x d_model product involves the source head alone: under a
    # vmap over destination heads it is computed once per source. Each pair then costs one
    # d_head x d_model x d_head product into W_Q2 and two d_head-square ones, and holds
    # nothing wider than d_head x d_head: (K2^T O1^T)(V1^T G) first would keep a
    # [d_head, d_model] block per pair, 1.5 GB per source layer at Pythia-410M's size.
    return _mm(_mm(W_K2.T, W_O1.T), _mm(_mm(W_V1.T, embed_gram), W_Q2))


def induction_qk_positivity(W_E, W_V1, W_O1, W_Q2, W_K2) -> Float[Array, ""]:
    """Positivity of W's eigenvalues: near 1 when head 2 attends to keys whose previous token matches its query."""
    return positivity(eigenvalues(induction_qk_matrix(W_E, W_V1, W_O1, W_Q2, W_K2)))


def induction_qk_trace(W_E, W_V1, W_O1, W_Q2, W_K2) -> Float[Array, ""]:
    """Trace of W, the sum of its eigenvalues (Olsson's QK eigenvalue trace); unnormalised."""
    return jnp.trace(induction_qk_matrix(W_E, W_V1, W_O1, W_Q2, W_K2))


def _induction_qk_positivity_through(embed_gram, W_V1, W_O1, W_Q2, W_K2) -> Float[Array, ""]:
    return positivity(eigenvalues(induction_qk_matrix_through(embed_gram, W_V1, W_O1, W_Q2, W_K2)))


def _induction_qk_trace_through(embed_gram, W_V1, W_O1, W_Q2, W_K2) -> Float[Array, ""]:
    return jnp.trace(induction_qk_matrix_through(embed_gram, W_V1, W_O1, W_Q2, W_K2))


def _softmax_entries(
    scores: Float[Array, "n n"], rows: Array, last_key: Array, read_key: Array
) -> Float[Array, " m"]:
    """For each row r: softmax of scores[r, k] over keys k <= last_key, read at read_key."""
    allowed = jnp.arange(scores.shape[1])[None, :] <= last_key[:, None]
    probs = jax.nn.softmax(jnp.where(allowed, scores[rows], -jnp.inf), axis=-1)
    return jnp.take_along_axis(probs, read_key[:, None], axis=-1)[:, 0]


def qk_prev_token(
    W_pos: Float[Array, "n_ctx d_model"], W_Q: Float[Array, "d_model d_head"], W_K: Float[Array, "d_model d_head"]
) -> Float[Array, ""]:
    """How much the positional QK circuit alone makes a head attend one position back.

    S = W_pos W_QK W_pos^T / sqrt(d_head) with causal masking and a row softmax; the
    score is the mean over positions i >= 1 of softmax(S_i)[i - 1]. 1 for a head whose
    positional term points every query at its predecessor. Only meaningful where
    positions enter the residual or the query/key inputs (learned, shortformer).
    """
    d_head = W_Q.shape[-1]
    scores = _mm(_mm(W_pos, W_Q), _mm(W_pos, W_K).T) / math.sqrt(d_head)
    rows = jnp.arange(1, scores.shape[0])
    return jnp.mean(_softmax_entries(scores, rows, last_key=rows, read_key=rows - 1))


def pointer_arithmetic(
    W_pos: Float[Array, "n_ctx d_model"],
    W_V1: Float[Array, "d_model d_head"],
    W_O1: Float[Array, "d_head d_model"],
    W_Q2: Float[Array, "d_model d_head"],
    W_K2: Float[Array, "d_model d_head"],
) -> Float[Array, ""]:
    """GPT-2's pointer arithmetic: head 2, reading a position head 1 copied, attends one further on.

    S = W_pos W_OV1 W_QK2 W_pos^T / sqrt(d_head): row j is the query made from position
    j's embedding after head 1's OV circuit, against raw positional keys. The score is
    the mean over j of the softmax over keys k <= j + 1 of S[j, k], read at k = j + 1.
    Built from [n_ctx, d_head] factors; the only n_ctx x n_ctx array is S itself.
    """
    d_head = W_Q2.shape[-1]
    queries = _mm(W_pos, W_V1, W_O1, W_Q2)  # [n_ctx, d_head]
    keys = _mm(W_pos, W_K2)  # [n_ctx, d_head]
    scores = _mm(queries, keys.T) / math.sqrt(d_head)
    rows = jnp.arange(scores.shape[0] - 1)
    return jnp.mean(_softmax_entries(scores, rows, last_key=rows + 1, read_key=rows + 1))


def weighted_over_sources(
    pair: Float[Array, "layer head layer head"], source_weight: Float[Array, "layer head"]
) -> Float[Array, "layer head"]:
    """Per destination head: the mean of a pair score over earlier heads, weighted by source_weight.

    sum_{l1, h1} w[l1, h1] pair[l1, h1, l2, h2] / sum_{l1, h1} w[l1, h1] over the sources where
    both are defined (not NaN); NaN where no source has weight (layer 0, or all weights 0).
    """
    valid = ~jnp.isnan(pair) & ~jnp.isnan(source_weight)[:, :, None, None]
    weight = jnp.where(valid, source_weight[:, :, None, None], 0.0)
    total = weight.sum(axis=(0, 1))
    weighted = jnp.where(valid, pair, 0.0) * weight
    return jnp.where(total > 0, weighted.sum(axis=(0, 1)) / jnp.where(total > 0, total, 1.0), jnp.nan)


# --- the scores of one checkpoint, on its processed weights ---------------------------------------


def ov_copying_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """`ov_copying` of every head: positivity of the eigenvalues of W_E W_V W_O W_U."""
    unembed_embed = ck.vocabulary_products.unembed_embed
    return ck.per_head(functools.partial(ov_copying_through, unembed_embed), *ck.ov)


def qk_prev_token_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """`qk_prev_token` of every head: mean over i >= 1 of softmax_k(W_pos W_QK W_pos^T / sqrt(d_head))[i, i - 1].

    NaN where positions do not reach queries and keys through W_pos (rotary, none).
    """
    p = ck.processed
    if ck.spec.positional not in (PositionalScheme.LEARNED, PositionalScheme.SHORTFORMER):
        return jnp.full((ck.spec.n_layers, ck.spec.n_heads), jnp.nan, p.W_E.dtype)
    return ck.per_head(lambda W_Q, W_K: qk_prev_token(p.W_pos, W_Q, W_K), p.W_Q, p.W_K)


def q_composition_pairs(ck: Checkpoint) -> Float[Array, "layer head layer head"]:
    """`q_composition` of every forward pair: |W_OV1 W_QK2|_F / (|W_OV1|_F |W_QK2|_F)."""
    return ck.earlier_pairs(q_composition, ck.ov, ck.qk)


def k_composition_pairs(ck: Checkpoint) -> Float[Array, "layer head layer head"]:
    """`k_composition` of every forward pair: |W_OV1 W_QK2^T|_F / (|W_OV1|_F |W_QK2|_F)."""
    return ck.earlier_pairs(k_composition, ck.ov, ck.qk)


def v_composition_pairs(ck: Checkpoint) -> Float[Array, "layer head layer head"]:
    """`v_composition` of every forward pair: |W_OV1 W_OV2|_F / (|W_OV1|_F |W_OV2|_F)."""
    return ck.earlier_pairs(v_composition, ck.ov, ck.ov)


def induction_qk_positivity_pairs(ck: Checkpoint) -> Float[Array, "layer head layer head"]:
    """`induction_qk_positivity` of every forward pair: positivity of the eigenvalues of W_E W_QK2 (W_E W_OV1)^T."""
    gram = ck.vocabulary_products.embed_gram
    # One source head at a time: LAPACK's eig holds complex outputs per eigenproblem, and a
    # source layer's heads against every later head are 5,888 of them at Pythia-1.4B's size.
    return ck.earlier_pairs(
        functools.partial(_induction_qk_positivity_through, gram), ck.ov, ck.qk, sources_in_sequence=True
    )


def induction_qk_trace_pairs(ck: Checkpoint) -> Float[Array, "layer head layer head"]:
    """`induction_qk_trace` of every forward pair: tr(W_E W_QK2 (W_E W_OV1)^T)."""
    gram = ck.vocabulary_products.embed_gram
    return ck.earlier_pairs(functools.partial(_induction_qk_trace_through, gram), ck.ov, ck.qk)


def pointer_arithmetic_pairs(ck: Checkpoint) -> Float[Array, "layer head layer head"]:
    """`pointer_arithmetic` of every forward pair: mean over j of softmax_{k <= j + 1}(S[j])[j + 1],
    S = W_pos W_OV1 W_QK2 W_pos^T / sqrt(d_head). NaN unless positions are learned."""
    p = ck.processed
    if ck.spec.positional != PositionalScheme.LEARNED:
        n_layers, n_heads = ck.spec.n_layers, ck.spec.n_heads
        return jnp.full((n_layers, n_heads, n_layers, n_heads), jnp.nan, p.W_E.dtype)
    # S is n_ctx x n_ctx per pair: one source head at a time bounds the memory.
    return ck.earlier_pairs(functools.partial(pointer_arithmetic, p.W_pos), ck.ov, ck.qk, sources_in_sequence=True)


def induction_qk_positivity_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """Per destination head: induction_qk_positivity of the pairs into it, `weighted_over_sources`
    by the source's previous_token (Olsson: the K-composition term needs a previous-token head)."""
    return weighted_over_sources(ck.of(induction_qk_positivity_pairs), ck.of(previous_token_heads))


def induction_qk_trace_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """Per destination head: induction_qk_trace of the pairs into it, weighted by the source's previous_token."""
    return weighted_over_sources(ck.of(induction_qk_trace_pairs), ck.of(previous_token_heads))


def pointer_arithmetic_heads(ck: Checkpoint) -> Float[Array, "layer head"]:
    """Per destination head: pointer_arithmetic of the pairs into it, weighted by the source's
    duplicate_token (pointer arithmetic reads a position copied by a head that attends to earlier copies)."""
    return weighted_over_sources(ck.of(pointer_arithmetic_pairs), ck.of(duplicate_token_heads))
