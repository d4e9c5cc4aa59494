"""Fixed, seeded probe sequences for the empirical scores (SCORES.md).

A probe is plain host data (numpy), identical for every checkpoint of a scan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Annotated

import numpy as np
import tyro
from jaxtyping import Bool, Int

from jaxinduct.errors import SpecError
from jaxinduct.flags import default_is
from jaxinduct.results.identity import VerdictThresholds
from jaxinduct.model.weights import ModelSpec


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
    """Everything that determines a scan's probes and score options; its hash identifies results."""

    # The command line also takes the shorter --examples and --repeats.
    n_examples: Annotated[int, tyro.conf.arg(aliases=("--examples",))] = 32
    """sequences per probe"""
    block_len: int = 25
    """length of the random block R of the repeated probes"""
    n_repeats: Annotated[int, tyro.conf.arg(aliases=("--repeats",))] = 4
    """repeats of R: the repeated probe is [BOS] + R x n_repeats"""
    seed: int = 0
    """seed of every probe's random tokens"""
    token_range: Annotated[tuple[int, int] | None, default_is("the dataset's tokens, else every id but BOS")] = None
    """draw probe tokens from ids [low, high)"""
    pool_exclude_frequent: float = 0.05
    """share of the dataset's distinct tokens left out of the pool as the most frequent"""
    pool_exclude_rare: float = 0.05
    """... and as the least frequent (tokens absent from the dataset never qualify)"""
    icl_late: int = 500
    """icl_score = loss at this context index minus loss at icl_early"""
    icl_early: int = 50
    """the early context index of icl_score"""
    ablation: bool = True
    """with a dataset: the change of icl_score when each head is ablated, full and pattern-preserving"""
    thresholds: VerdictThresholds = VerdictThresholds()

    def __post_init__(self) -> None:
        for name in ("n_examples", "block_len", "icl_late", "icl_early"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"ProbeConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_repeats, int) or self.n_repeats < 2:
            raise SpecError(f"ProbeConfig.n_repeats must be an integer >= 2 (a block and its repeat), got {self.n_repeats!r}")
        if self.token_range is not None:
            object.__setattr__(self, "token_range", tuple(self.token_range))  # hashable, from JSON lists too

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
    copying: Int[np.ndarray, "example block"]  # R alone: distinct random tokens, no BOS
    prefix2: Int[np.ndarray, "example seq"]  # the repeated probe with predecessors changed (prefix2_sensitivity)
    prefix2_queries: Bool[np.ndarray, "example seq"]  # the queries whose predecessor was changed
    dataset: Int[np.ndarray, "example seq"] | None = None  # fixed-length text examples, if any

    def config_hash(self) -> str:
        digest = None if self.dataset is None else hashlib.sha256(np.ascontiguousarray(self.dataset).tobytes()).hexdigest()
        return self.config.config_hash(digest)


def make_probes(
    spec: ModelSpec, config: ProbeConfig = ProbeConfig(), *, dataset: np.ndarray | None = None
) -> Probes:
    """The probes of ``config`` for a model of ``spec``, with clear errors when they cannot fit.

    dataset: token ids [example, seq] of fixed-length text examples, for the dataset
    scores (icl_score, per_token_loss, head ablation) and the default token pool; the
    same examples serve every checkpoint.
    """
    if dataset is not None:
        dataset = _check_dataset(spec, config, np.asarray(dataset))
    pool = token_pool(spec, config, dataset)
    length = config.block_len * config.n_repeats + (spec.bos_token_id is not None)
    if length > spec.n_ctx:
        raise SpecError(
            f"the repeated-token probe has {length} tokens but the model's context is {spec.n_ctx}; "
            "use a smaller block_len or n_repeats"
        )
    common = dict(n_examples=config.n_examples, bos_token_id=spec.bos_token_id)
    repeated = repeated_random_tokens(
        pool, block_len=config.block_len, n_repeats=config.n_repeats, seed=config.seed, **common
    )
    # As long as the repeated probe (or the pool, if smaller), each token at most once.
    distinct = min(len(pool), config.block_len * config.n_repeats)
    random = repeated_random_tokens(pool, block_len=distinct, n_repeats=1, seed=config.seed + 1, **common)
    copying = repeated_random_tokens(
        pool, n_examples=config.n_examples, block_len=config.block_len, n_repeats=1, bos_token_id=None, seed=config.seed + 2
    )
    prefix2, prefix2_queries = changed_predecessor_probe(
        repeated, pool, block_len=config.block_len, has_bos=spec.bos_token_id is not None, seed=config.seed + 3
    )
    return Probes(
        config=config,
        repeated=repeated,
        random=random,
        copying=copying,
        prefix2=prefix2,
        prefix2_queries=prefix2_queries,
        dataset=dataset,
    )


def token_pool(spec: ModelSpec, config: ProbeConfig, dataset: np.ndarray | None) -> np.ndarray:
    """The ids random probe tokens are drawn from (sorted, never BOS)."""
    if config.token_range is not None:
        low, high = config.token_range
        if not 0 <= low < high <= spec.d_vocab:
            raise SpecError(f"token_range {config.token_range} is not a range inside [0, {spec.d_vocab})")
        pool = np.array([t for t in range(low, high) if t != spec.bos_token_id])
        source = f"token_range {config.token_range}"
    elif dataset is not None:
        pool = dataset_token_pool(spec, dataset, config.pool_exclude_frequent, config.pool_exclude_rare)
        source = "the dataset's tokens (most and least frequent excluded)"
    else:
        pool = default_token_pool(spec)
        source = "the vocabulary"
    # R needs block_len distinct tokens; the prefix2 probe n_repeats - 1 more, outside R.
    needed = config.block_len + config.n_repeats - 1
    if len(pool) < needed:
        raise SpecError(
            f"the token pool ({source}) has {len(pool)} ids; the probes need at least {needed} "
            f"(block_len={config.block_len} plus n_repeats - 1 = {config.n_repeats - 1}); use a smaller "
            "block_len, a larger dataset, smaller pool_exclude_* shares or an explicit token_range"
        )
    return np.sort(pool)


def dataset_token_pool(
    spec: ModelSpec, dataset: np.ndarray, exclude_frequent: float, exclude_rare: float
) -> np.ndarray:
    """The dataset's tokens, ranked by frequency, minus the top and bottom shares (Olsson)."""
    for name, share in (("pool_exclude_frequent", exclude_frequent), ("pool_exclude_rare", exclude_rare)):
        if not 0.0 <= share < 1.0:
            raise SpecError(f"{name} must be a share in [0, 1), got {share}")
    counts = np.bincount(dataset.ravel(), minlength=spec.d_vocab)
    if spec.bos_token_id is not None:
        counts[spec.bos_token_id] = 0  # special tokens never enter the pool
    present = np.flatnonzero(counts)
    ranked = present[np.argsort(-counts[present], kind="stable")]  # most frequent first, ties by id
    n = len(ranked)
    return ranked[int(n * exclude_frequent) : n - int(n * exclude_rare)]


def changed_predecessor_probe(
    repeated: Int[np.ndarray, "example seq"], pool: np.ndarray, *, block_len: int, has_bos: bool, seed: int
) -> tuple[Int[np.ndarray, "example seq"], Bool[np.ndarray, "example seq"]]:
    """The repeated probe with every other token's predecessor changed in repeats 2..n.

    In every repeat after the first, the tokens at odd offsets of the block are replaced
    by tokens outside R, a different one in each repeat (per offset), so that the
    tokens at even offsets keep their identity but never recur after the same
    predecessor. Those even-offset tokens (offset >= 2) are the queries: a head that
    matches only the current token still finds their successors; one that also matches
    the previous token does not.
    """
    rng = np.random.default_rng(seed)
    tokens = repeated.copy()
    start = int(has_bos)
    n_repeats = (repeated.shape[1] - start) // block_len
    offsets = np.arange(block_len)
    queries = np.zeros(repeated.shape, dtype=bool)
    for example in range(repeated.shape[0]):
        block = repeated[example, start : start + block_len]
        outside = np.setdiff1d(pool, block)
        for offset in offsets[1::2]:
            fresh = rng.choice(outside, size=n_repeats - 1, replace=False)
            positions = start + offset + block_len * np.arange(1, n_repeats)
            tokens[example, positions] = fresh
        for repeat in range(1, n_repeats):
            queries[example, start + block_len * repeat + offsets[2::2]] = True
    return tokens, queries


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
