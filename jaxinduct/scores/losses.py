"""Loss-based scores of one checkpoint: per-token loss, icl_score and induction loss.

Loss at context index i is the cross-entropy of token i given tokens[:i]; index 0 has
nothing to condition on and is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxinduct.model.forward import unembed
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


def icl_of_curve(curve: Float[Array, " seq"], config: ProbeConfig) -> Float[Array, ""]:
    """Olsson's in-context-learning score of a per-token loss curve: curve[icl_late] - curve[icl_early]."""
    return curve[config.icl_late] - curve[config.icl_early]


def per_token_loss(ck: Checkpoint) -> Float[Array, " seq"] | None:
    """Mean loss at every context index of the dataset's examples; None without a dataset."""
    if ck.dataset is None:
        return None
    return mean_token_losses(ck.dataset.logits, ck.probes.dataset)


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
    logits = unembed(ck.weights, ck.repeated.final[:, second_half - 1 : -1])
    return next_token_losses(logits, repeated[:, second_half:]).mean()
