"""Fixed, seeded probe sequences for the empirical scores (SCORES.md).

A probe is plain host data (numpy), identical for every checkpoint of a scan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
from jaxtyping import Int

from jaxinduct.errors import SpecError
from jaxinduct.weights import ModelSpec


def default_token_pool(spec: ModelSpec) -> np.ndarray:
    """Every token id except BOS (an explicit id range, for scans without a dataset)."""
    ids = np.arange(spec.d_vocab)
    return ids[ids != spec.bos_token_id] if spec.bos_token_id is not None else ids


def repeated_random_tokens(
    pool: np.ndarray,
    *,
    n_examples: int,
    block_len: int = 25,
    n_repeats: int = 4,
    bos_token_id: int | None,
    seed: int = 0,
) -> Int[np.ndarray, "batch seq"]:
    """[BOS] + R * n_repeats per example, R = ``block_len`` distinct tokens from ``pool``.

    Without a BOS id the sequences start directly with R.
    """
    pool = np.unique(np.asarray(pool))
    if len(pool) < block_len:
        raise SpecError(f"the token pool has {len(pool)} ids, fewer than block_len={block_len} distinct tokens")
    rng = np.random.default_rng(seed)
    blocks = np.stack([rng.choice(pool, size=block_len, replace=False) for _ in range(n_examples)])
    body = np.tile(blocks, (1, n_repeats))
    if bos_token_id is None:
        return body.astype(np.int32)
    bos = np.full((n_examples, 1), bos_token_id)
    return np.concatenate([bos, body], axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Everything that determines a scan's probe sequences; its hash identifies results."""

    n_examples: int = 32
    block_len: int = 25
    n_repeats: int = 4
    seed: int = 0
    token_range: tuple[int, int] | None = None  # explicit [low, high) id pool; None: all but BOS
    icl_late: int = 500  # icl_score = loss at this context index minus loss at icl_early
    icl_early: int = 50

    def config_hash(self, dataset_digest: str | None = None) -> str:
        """Identity of the probes: this config, plus the dataset's content when one is used."""
        text = json.dumps({**dataclasses.asdict(self), "dataset": dataset_digest}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class Probes:
    """Materialised probes (host arrays), fixed for a whole scan."""

    config: ProbeConfig
    repeated: Int[np.ndarray, "example seq"]  # [BOS] + R * n_repeats
    random: Int[np.ndarray, "example seq"]  # [BOS] + distinct random tokens, no repeats
    dataset: Int[np.ndarray, "example seq"] | None = None  # fixed-length text examples, if any

    def config_hash(self) -> str:
        digest = None if self.dataset is None else hashlib.sha256(np.ascontiguousarray(self.dataset).tobytes()).hexdigest()
        return self.config.config_hash(digest)


def make_probes(
    spec: ModelSpec, config: ProbeConfig = ProbeConfig(), *, dataset: np.ndarray | None = None
) -> Probes:
    """The probes of ``config`` for a model of ``spec``, with clear errors when they cannot fit.

    dataset: token ids [example, seq] of fixed-length text examples, for the dataset
    scores (icl_score, per_token_loss); the same examples serve every checkpoint.
    """
    if dataset is not None:
        dataset = _check_dataset(spec, config, np.asarray(dataset))
    if config.token_range is None:
        pool = default_token_pool(spec)
    else:
        low, high = config.token_range
        if not 0 <= low < high <= spec.d_vocab:
            raise SpecError(f"token_range {config.token_range} is not a range inside [0, {spec.d_vocab})")
        pool = np.array([t for t in range(low, high) if t != spec.bos_token_id])
    length = config.block_len * config.n_repeats + (spec.bos_token_id is not None)
    if length > spec.n_ctx:
        raise SpecError(
            f"the repeated-token probe has {length} tokens but the model's context is {spec.n_ctx}; "
            "use a smaller block_len or n_repeats"
        )
    repeated = repeated_random_tokens(
        pool,
        n_examples=config.n_examples,
        block_len=config.block_len,
        n_repeats=config.n_repeats,
        bos_token_id=spec.bos_token_id,
        seed=config.seed,
    )
    # As long as the repeated probe (or the pool, if smaller), each token at most once.
    distinct = min(len(np.unique(pool)), config.block_len * config.n_repeats)
    random = repeated_random_tokens(
        pool, n_examples=config.n_examples, block_len=distinct, n_repeats=1, bos_token_id=spec.bos_token_id, seed=config.seed + 1
    )
    return Probes(config=config, repeated=repeated, random=random, dataset=dataset)


def _check_dataset(spec: ModelSpec, config: ProbeConfig, dataset: np.ndarray) -> np.ndarray:
    if dataset.ndim != 2 or not np.issubdtype(dataset.dtype, np.integer):
        raise SpecError(f"the dataset must be integer token ids [example, seq]; got {dataset.dtype} of shape {dataset.shape}")
    if dataset.size and (dataset.min() < 0 or dataset.max() >= spec.d_vocab):
        raise SpecError(f"the dataset has token ids outside the model's vocabulary [0, {spec.d_vocab})")
    length = dataset.shape[1]
    if not 1 <= config.icl_early < config.icl_late < length:
        raise SpecError(
            f"icl_score compares the loss at context indices {config.icl_late} and {config.icl_early}, but the "
            f"dataset's examples have {length} tokens (indices 0..{length - 1}); use longer examples or smaller "
            "icl indices (icl_early >= 1, icl_early < icl_late < example length)"
        )
    if spec.has_pos_embed and length > spec.n_ctx:
        raise SpecError(f"the dataset's examples have {length} tokens but the model's context is {spec.n_ctx}")
    return dataset.astype(np.int32)
