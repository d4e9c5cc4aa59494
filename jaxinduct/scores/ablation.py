"""Head ablation scores of one checkpoint (need a dataset and ``ProbeConfig.ablation``).

For every head, the dataset's forward pass with the head's output zeroed (full ablation),
and again with every attention pattern frozen to the clean run's (pattern-preserving:
only the head's direct and value-mediated effect is removed, not its effect on later
heads' attention). `jaxinduct.scores.context.Checkpoint.ablated` runs them, vmapped over
head masks; each score here is a difference to the clean run. Every score is None (absent
from the results) without a dataset or with ablation switched off.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from jaxinduct.scores.context import Checkpoint
from jaxinduct.scores.losses import icl_score, per_token_loss


def _icl_delta(ck: Checkpoint, pattern_preserving: bool) -> Float[Array, "layer head"] | None:
    ablated = ck.ablated(pattern_preserving)
    if ablated is None:
        return None
    return (ablated.icl_score - ck.of(icl_score)).reshape(ck.spec.n_layers, ck.spec.n_heads)


def _per_token_loss_delta(ck: Checkpoint, pattern_preserving: bool) -> Float[Array, "layer head seq"] | None:
    ablated = ck.ablated(pattern_preserving)
    if ablated is None:
        return None
    return (ablated.per_token_loss - ck.of(per_token_loss)).reshape(ck.spec.n_layers, ck.spec.n_heads, -1)


def ablation_icl_delta(ck: Checkpoint) -> Float[Array, "layer head"] | None:
    """icl_score with the head's output zeroed minus icl_score: positive where the head helped in-context learning."""
    return _icl_delta(ck, pattern_preserving=False)


def ablation_icl_delta_pattern_preserving(ck: Checkpoint) -> Float[Array, "layer head"] | None:
    """icl_score with the head's output zeroed and every pattern frozen to the clean run's, minus icl_score."""
    return _icl_delta(ck, pattern_preserving=True)


def ablation_per_token_loss_delta(ck: Checkpoint) -> Float[Array, "layer head seq"] | None:
    """per_token_loss with the head's output zeroed minus per_token_loss, at every context index."""
    return _per_token_loss_delta(ck, pattern_preserving=False)


def ablation_per_token_loss_delta_pattern_preserving(ck: Checkpoint) -> Float[Array, "layer head seq"] | None:
    """per_token_loss with the head's output zeroed and every pattern frozen, minus per_token_loss."""
    return _per_token_loss_delta(ck, pattern_preserving=True)
