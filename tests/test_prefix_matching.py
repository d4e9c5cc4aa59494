"""prefix_matching on hand-built patterns with known answers, and the standard probe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinduct.errors import SpecError
from jaxinduct.scores.probes import default_token_pool, repeated_random_tokens
from jaxinduct.scores.empirical import prefix_matching
from jaxinduct.model.weights import ModelSpec

R = 5  # block length in these hand-built cases


def probe(block=R, repeats=4):
    rng = np.random.default_rng(0)
    body = np.tile(rng.choice(np.arange(1, 50), size=block, replace=False), repeats)
    return np.concatenate([[0], body])  # [BOS] + R R R R


def one_hot_pattern(targets, seq):
    pattern = np.zeros((seq, seq))
    pattern[np.arange(seq), targets] = 1.0
    return pattern


def test_ideal_induction_head_scores_one():
    tokens = probe()
    seq = len(tokens)
    # Query q in a repeat attends to the token after its previous occurrence: q - R + 1.
    targets = np.array([q - R + 1 if q > R else 0 for q in range(seq)])
    assert float(prefix_matching(jnp.asarray(one_hot_pattern(targets, seq)), jnp.asarray(tokens))) == pytest.approx(1.0)


def test_previous_token_and_bos_heads_score_zero():
    tokens = probe()
    seq = len(tokens)
    previous = one_hot_pattern(np.maximum(np.arange(seq) - 1, 0), seq)
    to_bos = one_hot_pattern(np.zeros(seq, int), seq)
    assert float(prefix_matching(jnp.asarray(previous), jnp.asarray(tokens))) == 0.0
    assert float(prefix_matching(jnp.asarray(to_bos), jnp.asarray(tokens))) == 0.0


def test_uniform_attention_scores_the_share_of_matching_successors():
    tokens = probe()
    seq = len(tokens)
    pattern = np.tril(np.ones((seq, seq)))
    pattern /= pattern.sum(-1, keepdims=True)
    # Worked by hand: query q in repeat r (r = 1, 2, 3 counting from 0) has r earlier occurrences,
    # each followed by one token it attends to with weight 1 / (q + 1).
    expected = np.mean([r / (q + 1) for r in (1, 2, 3) for q in range(1 + r * R, 1 + (r + 1) * R)])
    assert float(prefix_matching(jnp.asarray(pattern), jnp.asarray(tokens))) == pytest.approx(expected, rel=1e-6)


def test_half_induction_head_scores_one_half():
    tokens = probe()
    seq = len(tokens)
    pattern = np.zeros((seq, seq))
    for q in range(seq):
        if q > R:
            pattern[q, q - R + 1] = 0.5
            pattern[q, 0] = 0.5
        else:
            pattern[q, 0] = 1.0
    assert float(prefix_matching(jnp.asarray(pattern), jnp.asarray(tokens))) == pytest.approx(0.5)


def test_repeated_random_tokens_follow_the_standard_probe():
    spec = ModelSpec(d_vocab=64, d_model=8, n_layers=1, n_heads=1, d_head=8, n_ctx=128, bos_token_id=0)
    tokens = repeated_random_tokens(default_token_pool(spec), n_examples=6, bos_token_id=0, seed=1)
    assert tokens.shape == (6, 101)
    assert (tokens[:, 0] == 0).all() and (tokens[:, 1:] != 0).all()
    for row in tokens:
        block = row[1:26]
        assert len(set(block.tolist())) == 25
        np.testing.assert_array_equal(row[1:], np.tile(block, 4))
    np.testing.assert_array_equal(tokens, repeated_random_tokens(default_token_pool(spec), n_examples=6, bos_token_id=0, seed=1))
    with pytest.raises(SpecError, match="fewer than block_len=25"):
        repeated_random_tokens(np.arange(10), n_examples=1, bos_token_id=None)


def test_prefix_matching_vmaps_over_heads():
    tokens = jnp.asarray(probe())
    seq = tokens.shape[0]
    ideal = one_hot_pattern(np.array([q - R + 1 if q > R else 0 for q in range(seq)]), seq)
    to_bos = one_hot_pattern(np.zeros(seq, int), seq)
    scores = jax.vmap(prefix_matching, in_axes=(0, None))(jnp.asarray(np.stack([ideal, to_bos])), tokens)
    np.testing.assert_allclose(scores, [1.0, 0.0], atol=1e-7)


def test_stacked_scores_equal_a_loop_over_checkpoints():
    from jaxinduct.scores.batched import head_prefix_matching, stacked_prefix_matching
    from jaxinduct.model.weights import init_random_weights, stack_weights

    spec = ModelSpec(d_vocab=40, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=101, bos_token_id=0)
    checkpoints = [init_random_weights(spec, seed, scale=2.0) for seed in range(4)]
    tokens = jnp.asarray(repeated_random_tokens(default_token_pool(spec), n_examples=3, bos_token_id=0))
    stacked = stacked_prefix_matching(stack_weights(checkpoints), tokens)
    assert stacked.shape == (4, 2, 2)
    for i, weights in enumerate(checkpoints):
        np.testing.assert_allclose(stacked[i], head_prefix_matching(weights, tokens), rtol=1e-6, atol=1e-6)
    assert float(jnp.std(stacked)) > 1e-3  # the checkpoints really differ


def test_duplicate_token_and_previous_token_of_hand_built_heads():
    from jaxinduct.scores.empirical import duplicate_token, previous_token

    tokens = probe()
    seq = len(tokens)
    to_previous_copy = one_hot_pattern(np.array([q - R if q > R else 0 for q in range(seq)]), seq)
    one_back = one_hot_pattern(np.maximum(np.arange(seq) - 1, 0), seq)
    induction = one_hot_pattern(np.array([q - R + 1 if q > R else 0 for q in range(seq)]), seq)
    t = jnp.asarray(tokens)
    assert float(duplicate_token(jnp.asarray(to_previous_copy), t)) == pytest.approx(1.0)
    assert float(duplicate_token(jnp.asarray(induction), t)) == 0.0
    assert float(duplicate_token(jnp.asarray(one_back), t)) == 0.0
    assert float(previous_token(jnp.asarray(one_back))) == pytest.approx(1.0)
    # Of the 20 queries q >= 1 only q = 1 attends one back (to BOS, where early queries park).
    assert float(previous_token(jnp.asarray(to_previous_copy))) == pytest.approx(1 / 20)
    # Half the queries attend one back: query q >= 1 attends to q - 1 iff q is even.
    half = one_hot_pattern(np.array([q - 1 if q % 2 == 0 and q > 0 else q for q in range(seq)]), seq)
    expected = np.mean([1.0 if q % 2 == 0 else 0.0 for q in range(1, seq)])
    assert float(previous_token(jnp.asarray(half))) == pytest.approx(expected)
