"""Fixed, seeded probe sequences for the empirical scores (SCORES.md).

A probe is plain host data (numpy), identical for every checkpoint of a scan.
"""

from __future__ import annotations

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
