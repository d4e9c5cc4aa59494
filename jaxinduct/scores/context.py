"""What a score's definition is given: one checkpoint, its probes, and what its scores share.

Every registered score (`jaxinduct.scores.registry`) is a pure function of a `Checkpoint`.
The implementation (`jaxinduct.scores.batched`) is created inside the traced
per-checkpoint function and computes each shared intermediate (a forward pass over a
probe with its pattern summaries, the processed weights, a score another score reads)
at most once, when a score first asks for it: a selection of scores traces only what it
needs. This protocol is what the score modules see; it lives apart from the
implementation so that they need not import the module that batches them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxinduct.model.forward import ForwardOutput
from jaxinduct.model.processing import VocabularyProducts
from jaxinduct.model.weights import ModelSpec, Weights
from jaxinduct.scores.probes import ProbeConfig, Probes

T = TypeVar("T")


class ProbeArrays(NamedTuple):
    """Probes as device arrays, the traced inputs of the compiled pass."""

    repeated: Int[Array, "example seq"]
    random: Int[Array, "example seq"]
    copying: Int[Array, "example block"]
    prefix2: Int[Array, "example seq"]
    prefix2_queries: Bool[Array, "example seq"]
    dataset: Int[Array, "example seq"] | None

    @classmethod
    def from_probes(cls, probes: Probes) -> ProbeArrays:
        dataset = None if probes.dataset is None else jnp.asarray(probes.dataset)
        return cls(
            jnp.asarray(probes.repeated),
            jnp.asarray(probes.random),
            jnp.asarray(probes.copying),
            jnp.asarray(probes.prefix2),
            jnp.asarray(probes.prefix2_queries),
            dataset,
        )


class RepeatedSummaries(NamedTuple):
    """Pattern summaries of the repeated probe: [head] per layer, [example, layer, head] from the forward."""

    prefix_matching: Float[Array, "*batch head"]
    duplicate_token: Float[Array, "*batch head"]


class Ablated(NamedTuple):
    """The dataset's scores with one head's output zeroed, for every head (flat head index l * n_heads + h)."""

    per_token_loss: Float[Array, "head seq"]
    icl_score: Float[Array, " head"]


class Checkpoint(Protocol):
    """One checkpoint as its scores see it. Intermediates are computed on first use, once."""

    weights: Weights  # raw (empirical scores run the model as it is)
    probes: ProbeArrays
    config: ProbeConfig

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def dtype(self) -> Any:
        """The dtype of the empirical scores (the forward pass's), that of the verdicts too."""
        ...

    def of(self, compute: Callable[[Checkpoint], T]) -> T:
        """compute(self), computed once per checkpoint: how one score reads another."""
        ...

    # --- weights ---
    @property
    def processed(self) -> Weights:
        """`process_weights(weights)`: what the mechanistic scores read."""
        ...

    @property
    def vocabulary_products(self) -> VocabularyProducts:
        """W_U W_E and W_E^T W_E of the processed weights, [d_model, d_model] each: the only
        vocabulary-sized products, shared by every head and pair that reads them."""
        ...

    @property
    def ov(self) -> tuple[Float[Array, "layer head d_model d_head"], Float[Array, "layer head d_head d_model"]]:
        """(W_V, W_O) of the processed weights: every head's OV circuit as factors."""
        ...

    @property
    def qk(self) -> tuple[Float[Array, "layer head d_model d_head"], Float[Array, "layer head d_model d_head"]]:
        """(W_Q, W_K) of the processed weights: every head's QK circuit as factors."""
        ...

    def per_head(self, kernel: Callable[..., Array], *per_head: Array) -> Float[Array, "layer head"]:
        """kernel(one head's slice of each of ``per_head``) for every head: [layer, head]."""
        ...

    def earlier_pairs(
        self,
        kernel: Callable[..., Array],
        left: tuple[Array, ...],
        right: tuple[Array, ...],
        *,
        sources_in_sequence: bool = False,
    ) -> Float[Array, "layer head layer head"]:
        """kernel(*source head's ``left``, *destination head's ``right``) for every pair whose
        source layer comes first; NaN elsewhere. sources_in_sequence: one source head at a
        time, for kernels with large intermediates."""
        ...

    # --- forward passes over the probes (pattern summaries, never full patterns) ---
    @property
    def repeated(self) -> ForwardOutput:
        """Over the repeated probe: the final norm's output [example, seq, d_model] (what
        `losses.unembedded_losses` reads) and `RepeatedSummaries`."""
        ...

    @property
    def prefix2(self) -> Float[Array, "example layer head"]:
        """prefix_matching on the prefix2 probe, over the queries whose predecessor changed."""
        ...

    @property
    def copying(self) -> Float[Array, "example layer head"]:
        """`empirical.copying` of every head on each example of the copying probe."""
        ...

    @property
    def random_previous_token(self) -> Float[Array, "example layer head"]:
        """`empirical.previous_token` of every head on each example of the random probe."""
        ...

    @property
    def dataset(self) -> ForwardOutput | None:
        """Over the dataset (None without one): the final norm's output, full patterns when ablating, and
        `empirical.previous_token` of every head [example, layer, head] as pattern_summaries."""
        ...

    def ablated(self, pattern_preserving: bool) -> Ablated | None:
        """The dataset's per-token loss and icl_score with each head's output zeroed (patterns
        frozen to the clean run's when pattern_preserving); None without a dataset or ablation."""
        ...
