"""Loss-based scores of one checkpoint: per-token loss, icl_score and induction loss.

Loss at context index i is the cross-entropy of token i given tokens[:i]; index 0 has
nothing to condition on and is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_HIGHEST = jax.lax.Precision.HIGHEST

from jaxinduct.model.weights import Weights
from jaxinduct.scores.context import Checkpoint
from jaxinduct.scores.probes import ProbeConfig


def next_token_losses(
    logits: Float[Array, "example position d_vocab"], targets: Int[Array, "example position"]
) -> Float[Array, "example position"]:
    """Cross-entropy of each target under the logits at the same index (logits predicting it)."""
    # logsumexp minus the target's logit: the [.., d_vocab] log-softmax is never materialised.
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def token_losses(logits: Float[Array, "example seq d_vocab"], tokens: Int[Array, "example seq"]) -> Float[Array, "example seq"]:
    """Cross-entropy of token i given tokens[:i], at index i; index 0 (nothing to condition on) is NaN."""
    nll = next_token_losses(logits[:, :-1], tokens[:, 1:])
    return jnp.pad(nll, ((0, 0), (1, 0)), constant_values=jnp.nan)


def mean_token_losses(logits: Float[Array, "example seq d_vocab"], tokens: Int[Array, "example seq"]) -> Float[Array, " seq"]:
    """The per-token loss curve: the mean over examples of `token_losses`."""
    return token_losses(logits, tokens).mean(axis=0)


# Columns of W_U unembedded at a time by `unembedded_losses`: the logits of one step,
# [positions, chunk], are what is live, instead of [positions, d_vocab].
VOCAB_CHUNK = 8192


def unembedded_losses(
    weights: Weights, final: Float[Array, "*position d_model"], targets: Int[Array, "*position"]
) -> Float[Array, "*position"]:
    """next_token_losses(unembed(weights, final), targets), the logits never stored whole.

    The vocabulary is unembedded a chunk of columns at a time with a running logsumexp
    (max and rescaled sum), and each target's logit is one dot product. On the CPU this
    halves the time of Pythia-70M's induction loss (0.59 s against 1.22 s for 3,200
    positions): the [positions, d_vocab] logits are neither written nor read back.
    Equal to the direct computation up to float rounding.
    """
    dtype = jnp.promote_types(weights.W_E.dtype, jnp.float32)
    W_U, b_U = weights.W_U.astype(dtype), weights.b_U.astype(dtype)
    d_model, d_vocab = W_U.shape
    x = final.reshape(-1, d_model).astype(dtype)
    flat_targets = targets.reshape(-1)
    n_chunks = -(-d_vocab // VOCAB_CHUNK)
    chunk = -(-d_vocab // n_chunks)
    # Chunks sliced from W_U in the loop (no reshaped copy of it). The last chunk's start is
    # clamped to fit, so it overlaps the one before: its columns already counted are masked.
    columns = jnp.arange(chunk)

    def step(carry: tuple[Array, Array], index: Array) -> tuple[tuple[Array, Array], None]:
        running_max, running_sum = carry
        start = jnp.minimum(index * chunk, d_vocab - chunk)
        part = jax.lax.dynamic_slice_in_dim(W_U, start, chunk, axis=1)
        bias = jax.lax.dynamic_slice_in_dim(b_U, start, chunk)
        fresh = start + columns >= index * chunk
        logits = jnp.where(fresh, jnp.matmul(x, part, precision=_HIGHEST) + bias, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        rescaled = running_sum * jnp.exp(running_max - new_max)
        return (new_max, rescaled + jnp.exp(logits - new_max[:, None]).sum(axis=-1)), None

    start = (jnp.full(x.shape[0], -jnp.inf, dtype), jnp.zeros(x.shape[0], dtype))
    (peak, total), _ = jax.lax.scan(step, start, jnp.arange(n_chunks))
    target_logits = jnp.einsum("nd,dn->n", x, jnp.take(W_U, flat_targets, axis=1), precision=_HIGHEST)
    losses = peak + jnp.log(total) - (target_logits + b_U[flat_targets])
    return losses.reshape(targets.shape)


def unembedded_token_losses(
    weights: Weights, final: Float[Array, "example seq d_model"], tokens: Int[Array, "example seq"]
) -> Float[Array, "example seq"]:
    """`token_losses` of the logits of ``final`` (`ForwardOutput.final`), through `unembedded_losses`."""
    nll = unembedded_losses(weights, final[:, :-1], tokens[:, 1:])
    return jnp.pad(nll, ((0, 0), (1, 0)), constant_values=jnp.nan)


def icl_of_curve(curve: Float[Array, " seq"], config: ProbeConfig) -> Float[Array, ""]:
    """Olsson's in-context-learning score of a per-token loss curve: curve[icl_late] - curve[icl_early]."""
    return curve[config.icl_late] - curve[config.icl_early]


def per_token_loss(ck: Checkpoint) -> Float[Array, " seq"] | None:
    """Mean loss at every context index of the dataset's examples; None without a dataset."""
    if ck.dataset is None:
        return None
    return unembedded_token_losses(ck.weights, ck.dataset.final, ck.probes.dataset).mean(axis=0)


def icl_score(ck: Checkpoint) -> Float[Array, ""] | None:
    """per_token_loss[icl_late] - per_token_loss[icl_early] (negative: in-context learning); None without a dataset."""
    curve = ck.of(per_token_loss)
    return None if curve is None else icl_of_curve(curve, ck.config)


def induction_loss(ck: Checkpoint) -> Float[Array, ""]:
    """Mean loss over the second half of the repeated probe's body (repeats 3-4 of [BOS] + R x 4),
    where an induction head can predict every token."""
    repeated, config = ck.probes.repeated, ck.config
    body = config.block_len * config.n_repeats
    second_half = repeated.shape[1] - body + body // 2
    # Only the positions that predict the second half are unembedded: half the logits.
    return unembedded_losses(ck.weights, ck.repeated.final[:, second_half - 1 : -1], repeated[:, second_half:]).mean()
