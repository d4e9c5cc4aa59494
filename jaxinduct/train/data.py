"""Built-in training data: nothing here downloads anything.

Two corpora:

- `TiledBlocks` (generated): each sequence is [BOS] followed by one block of
  random tokens, of random length, tiled to the context. The period varies from
  sequence to sequence, so no fixed positional offset predicts the next token;
  only looking up the previous occurrence of the current token and copying its
  successor does. Induction heads form on it within a few hundred steps.
- `ByteCorpus`: any text file or folder, read as bytes (vocabulary 256 + BOS),
  sampled as random windows.

Both produce batch ``step`` deterministically from the run's seed, so a resumed
run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from jaxinduct.errors import CorpusError

BYTE_VOCAB = 257  # 256 byte values + BOS
BYTE_BOS = 256


@dataclasses.dataclass(frozen=True)
class TiledBlocks:
    """[BOS] + one random block of length in [min_block, max_block], tiled to seq_len."""

    d_vocab: int
    seq_len: int
    batch_size: int
    min_block: int
    max_block: int
    seed: int
    bos_token_id: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_block <= self.max_block <= self.seq_len - 1:
            raise CorpusError(
                f"block lengths must satisfy 1 <= min_block ({self.min_block}) <= max_block "
                f"({self.max_block}) <= seq_len - 1 ({self.seq_len - 1})"
            )
        if self.d_vocab < 3:
            raise CorpusError(f"d_vocab must be at least 3 for a tiled corpus, got {self.d_vocab}")

    def batch(self, step: int) -> Int[Array, "batch seq"]:
        return _tiled_batch(
            jax.random.fold_in(jax.random.key(self.seed), step),
            self.batch_size,
            self.seq_len,
            self.min_block,
            self.max_block,
            self.d_vocab,
            self.bos_token_id,
        )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _tiled_batch(key, batch_size, seq_len, min_block, max_block, d_vocab, bos):
    length_key, token_key = jax.random.split(key)
    lengths = jax.random.randint(length_key, (batch_size, 1), min_block, max_block + 1)
    # Block tokens avoid BOS: draw from d_vocab - 1 values and skip over the BOS id.
    blocks = jax.random.randint(token_key, (batch_size, max_block), 0, d_vocab - 1)
    blocks = jnp.where(blocks >= bos, blocks + 1, blocks)
    index = jnp.arange(seq_len - 1)[None, :] % lengths
    body = jnp.take_along_axis(blocks, index, axis=1)
    return jnp.concatenate([jnp.full((batch_size, 1), bos, body.dtype), body], axis=1).astype(jnp.int32)


def read_corpus(path: str | os.PathLike) -> np.ndarray:
    """All bytes of a text file, or of every non-hidden text file under a folder (sorted).

    Files of a folder are joined with a newline so that windows rarely straddle
    two files without a separator; files with a NUL byte in their first 8 KiB are
    taken for binary and skipped.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus {root} does not exist; pass --corpus a text file or a folder of text files")
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise CorpusError(f"corpus folder {root} holds no files (hidden files and folders are skipped)")
    else:
        raise CorpusError(f"corpus {root} is neither a file nor a folder")
    chunks = []
    binary = 0
    for f in files:
        try:
            content = f.read_bytes()
        except OSError as e:
            raise CorpusError(f"cannot read corpus file {f}: {e.strerror}") from e
        if b"\0" in content[:8192] and len(files) > 1:
            binary += 1  # a folder's binary files (images, .pyc) are not text: skip them
            continue
        chunks.append(content)
    data = b"\n".join(chunks)
    if not data.strip():
        skipped = f", skipped {binary} binary file(s)" if binary else ""
        raise CorpusError(f"corpus {root} is empty (read {len(chunks)} file(s), {len(data)} bytes, all whitespace{skipped})")
    return np.frombuffer(data, dtype=np.uint8)


def corpus_digest(data: np.ndarray) -> str:
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class ByteCorpus:
    """Random windows of a byte corpus, each preceded by BOS (id 256)."""

    data: np.ndarray
    seq_len: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.data) < self.seq_len:
            raise CorpusError(
                f"corpus has {len(self.data)} bytes, fewer than one window of {self.seq_len - 1} "
                "bytes plus BOS; use a larger corpus or a smaller context"
            )

    def batch(self, step: int) -> Int[Array, "batch seq"]:
        rng = np.random.default_rng((self.seed, step))
        window = self.seq_len - 1
        starts = rng.integers(0, len(self.data) - window + 1, size=self.batch_size)
        body = self.data[starts[:, None] + np.arange(window)[None, :]].astype(np.int32)
        bos = np.full((self.batch_size, 1), BYTE_BOS, np.int32)
        return jnp.asarray(np.concatenate([bos, body], axis=1))
