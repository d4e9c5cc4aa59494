"""Built-in corpora: structure, determinism and clear errors."""

import numpy as np
import pytest

from jaxinduct.train.data import BYTE_BOS, ByteCorpus, TiledBlocks, read_corpus
from jaxinduct.errors import CorpusError


def test_tiled_blocks_are_bos_then_a_tiled_random_block():
    source = TiledBlocks(d_vocab=20, seq_len=65, batch_size=64, min_block=8, max_block=32, seed=3)
    batch = np.asarray(source.batch(5))
    assert batch.shape == (64, 65) and batch.dtype == np.int32
    assert (batch[:, 0] == 0).all() and (batch[:, 1:] != 0).all() and (batch < 20).all()
    periods = []
    for row in batch:
        body = row[1:]
        # The smallest shift under which the body repeats itself is the block length.
        period = next(p for p in range(1, len(body)) if (body[p:] == body[:-p]).all())
        periods.append(period)
    assert min(periods) >= 8 and max(periods) <= 32
    assert len(set(periods)) > 5  # the offset varies, so no fixed offset predicts the next token


def test_tiled_blocks_are_a_function_of_seed_and_step():
    source = TiledBlocks(d_vocab=20, seq_len=33, batch_size=4, min_block=4, max_block=16, seed=1)
    np.testing.assert_array_equal(source.batch(7), source.batch(7))
    assert not np.array_equal(source.batch(7), source.batch(8))
    other = TiledBlocks(d_vocab=20, seq_len=33, batch_size=4, min_block=4, max_block=16, seed=2)
    assert not np.array_equal(source.batch(7), other.batch(7))


def test_tiled_blocks_reject_impossible_lengths():
    with pytest.raises(CorpusError, match="block lengths"):
        TiledBlocks(d_vocab=20, seq_len=10, batch_size=1, min_block=4, max_block=12, seed=0)


def test_byte_corpus_windows_come_from_the_text(tmp_path):
    text = (b"the quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "a.txt").write_bytes(text)
    data = read_corpus(tmp_path / "a.txt")
    source = ByteCorpus(data, seq_len=17, batch_size=5, seed=0)
    batch = np.asarray(source.batch(3))
    assert batch.shape == (5, 17) and (batch[:, 0] == BYTE_BOS).all()
    for row in batch:
        assert bytes(row[1:].astype(np.uint8)) in text
    np.testing.assert_array_equal(batch, source.batch(3))


def test_folder_corpus_reads_files_in_order_and_skips_hidden(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second")
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"hidden")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_bytes(b"third")
    assert bytes(read_corpus(tmp_path)) == b"first\nsecond\nthird"


def _missing(p):
    return p / "nope.txt"


def _empty_file(p):
    (p / "empty.txt").write_bytes(b"")
    return p / "empty.txt"


def _whitespace_file(p):
    (p / "blank.txt").write_bytes(b" \n\t\n")
    return p / "blank.txt"


def _empty_folder(p):
    (p / "dir").mkdir()
    return p / "dir"


@pytest.mark.parametrize(
    "make,message",
    [(_missing, "does not exist"), (_empty_file, "is empty"), (_whitespace_file, "is empty"), (_empty_folder, "holds no files")],
    ids=["missing", "empty-file", "whitespace-file", "empty-folder"],
)
def test_bad_corpora_get_clear_errors(tmp_path, make, message):
    with pytest.raises(CorpusError, match=message):
        read_corpus(make(tmp_path))


def test_corpus_shorter_than_a_window_is_an_error(tmp_path):
    (tmp_path / "short.txt").write_bytes(b"abc")
    with pytest.raises(CorpusError, match="fewer than one window"):
        ByteCorpus(read_corpus(tmp_path / "short.txt"), seq_len=17, batch_size=1, seed=0)
