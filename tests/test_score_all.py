"""The batched entry point: hand-built circuits with known answers, and invariance.

The hand-built model has three blocks of residual dimensions: the current token (one-hot),
the position (one-hot), and a slot where layer 0 writes the previous token. Layer 0's
head attends one position back through positions alone and copies the token it sees
into the slot; layer 1's head matches its query token against that slot (K-composition)
and copies the token it lands on (an identity OV circuit). Nothing is trained.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinduct.probes import ProbeConfig, make_probes
from jaxinduct.scores.batched import _checkpoint_scores, score_all
from jaxinduct.weights import ModelSpec, init_random_weights, make_weights, stack_weights

V, N_CTX = 30, 101  # vocabulary (BOS = 0) and context; the standard probe is 101 tokens
TOK, POS, PREV = 0, V, V + N_CTX  # offsets of the three residual blocks
D_MODEL, D_HEAD = V + N_CTX + V, N_CTX
SHARP = 20.0 * np.sqrt(D_HEAD)  # attention logit 20 on the intended key, 0 elsewhere


def induction_circuit(ov_sign: float = 1.0):
    spec = ModelSpec(
        d_vocab=V, d_model=D_MODEL, n_layers=2, n_heads=1, d_head=D_HEAD, n_ctx=N_CTX,
        positional="learned", norm="none", bos_token_id=0,
    )  # fmt: skip
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    W_E, W_pos, W_U = z(V, D_MODEL), z(N_CTX, D_MODEL), z(D_MODEL, V)
    W_Q, W_K, W_V, W_O = z(2, 1, D_MODEL, D_HEAD), z(2, 1, D_MODEL, D_HEAD), z(2, 1, D_MODEL, D_HEAD), z(2, 1, D_HEAD, D_MODEL)
    for t in range(V):
        W_E[t, TOK + t] = 1.0
        W_U[TOK + t, t] = 1.0
        # Layer 0 values: the token; output: into the previous-token slot.
        W_V[0, 0, TOK + t, t] = 1.0
        W_O[0, 0, t, PREV + t] = 1.0
        # Layer 1 queries: the current token; keys: the previous-token slot; OV: copy the token.
        W_Q[1, 0, TOK + t, t] = SHARP
        W_K[1, 0, PREV + t, t] = 1.0
        W_V[1, 0, TOK + t, t] = 1.0
        W_O[1, 0, t, TOK + t] = ov_sign
    for i in range(N_CTX):
        W_pos[i, POS + i] = 1.0
        W_K[0, 0, POS + i, i] = 1.0
        if i >= 1:
            W_Q[0, 0, POS + i, i - 1] = SHARP  # position i asks for position i - 1
    arrays = dict(
        W_E=W_E, W_pos=W_pos, W_U=W_U, b_U=z(V), W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O,
        b_Q=z(2, 1, D_HEAD), b_K=z(2, 1, D_HEAD), b_V=z(2, 1, D_HEAD), b_O=z(2, D_MODEL),
    )  # fmt: skip
    return make_weights(spec, {k: jnp.asarray(v) for k, v in arrays.items()})


@pytest.fixture(scope="module")
def circuit_scores():
    weights = stack_weights([induction_circuit(+1.0), induction_circuit(-1.0)])
    probes = make_probes(weights.spec, ProbeConfig(n_examples=4))
    return score_all(weights, probes)


def test_hand_built_induction_circuit_scores_as_an_induction_head(circuit_scores):
    head = {name: np.asarray(v)[0] for name, v in circuit_scores.head.items()}
    assert head["previous_token"][0, 0] > 0.99  # layer 0: a previous-token head
    assert head["prefix_matching"][1, 0] > 0.9
    assert head["ov_copying"][1, 0] > 0.9
    assert head["induction_qk_positivity"][1, 0] > 0.9
    assert head["prefix_matching"][0, 0] < 0.1  # the previous-token head is no induction head
    # K-composition of two identity-like rank-V circuits is 1/sqrt(V) (|I_V|_F = sqrt(V)).
    pair_k = np.asarray(circuit_scores.pair["k_composition"])[0]
    assert pair_k[0, 0, 1, 0] == pytest.approx(1 / np.sqrt(V), rel=1e-5)
    assert np.isnan(pair_k[1, 0, 0, 0])  # only earlier -> later pairs are defined


def test_negated_ov_circuit_scores_as_anti_copying(circuit_scores):
    head = {name: np.asarray(v)[1] for name, v in circuit_scores.head.items()}
    assert head["ov_copying"][1, 0] < -0.9
    assert head["prefix_matching"][1, 0] > 0.9  # where it attends is unchanged


SPEC = ModelSpec(d_vocab=40, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=101, d_mlp=32, bos_token_id=0)


@pytest.fixture(scope="module")
def eight_checkpoints():
    return [init_random_weights(SPEC, seed) for seed in range(8)]


def assert_same_results(a, b, tol):
    for group in ("head", "pair", "model", "curve"):
        x, y = getattr(a, group), getattr(b, group)
        assert sorted(x) == sorted(y)
        for name in x:
            np.testing.assert_allclose(np.asarray(x[name]), np.asarray(y[name]), rtol=tol, atol=tol, err_msg=name)


def test_batched_equals_a_loop_over_checkpoints(eight_checkpoints):
    probes = make_probes(SPEC, ProbeConfig(n_examples=3))
    batched = score_all(stack_weights(eight_checkpoints), probes)
    one = jax.jit(functools.partial(_checkpoint_scores, config=probes.config))
    looped = [one(w, jnp.asarray(probes.repeated), jnp.asarray(probes.random)) for w in eight_checkpoints]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *looped)
    assert_same_results(batched, stacked, 1e-6)
    assert batched.head["prefix_matching"].shape == (8, 2, 2)
    assert batched.pair["q_composition"].shape == (8, 2, 2, 2, 2)


def test_sharded_over_eight_devices_equals_unsharded(eight_checkpoints):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (conftest sets 8 CPU devices)")
    probes = make_probes(SPEC, ProbeConfig(n_examples=3))
    stacked = stack_weights(eight_checkpoints)
    mesh = Mesh(np.array(jax.devices()[:8]), ("ckpt",))
    sharded = jax.device_put(stacked, NamedSharding(mesh, PartitionSpec("ckpt")))
    assert len(sharded.W_Q.sharding.device_set) == 8
    assert_same_results(score_all(sharded, probes), score_all(stacked, probes), 1e-6)


def test_probe_config_identifies_its_probes():
    a = make_probes(SPEC, ProbeConfig(n_examples=3))
    b = make_probes(SPEC, ProbeConfig(n_examples=3))
    np.testing.assert_array_equal(a.repeated, b.repeated)
    assert a.config.config_hash() == b.config.config_hash() != ProbeConfig(n_examples=3, seed=1).config_hash()
    assert a.random.shape == (3, 40) and all(len(set(row[1:])) == 39 for row in a.random)
    short = ModelSpec(d_vocab=40, d_model=16, n_layers=1, n_heads=1, d_head=16, n_ctx=64, bos_token_id=0)
    with pytest.raises(Exception, match="probe has 101 tokens but the model's context is 64"):
        make_probes(short)


def test_chunked_passes_equal_one_vmapped_pass(eight_checkpoints):
    probes = make_probes(SPEC, ProbeConfig(n_examples=3))
    stacked = stack_weights(eight_checkpoints)
    whole = score_all(stacked, probes)
    for per_pass in (1, 3):  # 3 does not divide 8: the remainder is its own pass
        assert_same_results(score_all(stacked, probes, checkpoints_per_pass=per_pass), whole, 1e-6)
    with pytest.raises(ValueError, match="positive integer"):
        score_all(stacked, probes, checkpoints_per_pass=0)


def test_model_scores_equal_losses_from_the_reference_model(eight_checkpoints):
    from flax import nnx

    from jaxinduct.model import model_from_weights

    rng = np.random.default_rng(3)
    dataset = rng.integers(1, SPEC.d_vocab, size=(4, 60))
    config = ProbeConfig(n_examples=3, icl_late=40, icl_early=5)
    probes = make_probes(SPEC, config, dataset=dataset)
    results = score_all(stack_weights(eight_checkpoints[:2]), probes)
    for i, weights in enumerate(eight_checkpoints[:2]):
        apply = nnx.jit(lambda model, tokens: model(tokens))
        model = model_from_weights(weights)

        def losses(tokens):  # [example, seq - 1]: loss of token j + 1 given tokens[: j + 1]
            logits = apply(model, jnp.asarray(tokens))[:, :-1]
            return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tokens)[:, 1:]))

        # Repeated probe: [BOS] + 4 x 25 tokens; the second half of the body starts at token 51.
        expected_induction = losses(probes.repeated)[:, 50:].mean()
        np.testing.assert_allclose(results.model["induction_loss"][i], expected_induction, rtol=1e-5)
        curve = losses(dataset).mean(axis=0)  # curve[j] is the loss at context index j + 1
        np.testing.assert_allclose(results.curve["per_token_loss"][i, 1:], curve, rtol=1e-5)
        assert np.isnan(results.curve["per_token_loss"][i, 0])
        np.testing.assert_allclose(results.model["icl_score"][i], curve[39] - curve[4], rtol=1e-4, atol=1e-6)


def test_dataset_problems_get_clear_errors():
    from jaxinduct.errors import SpecError

    with pytest.raises(SpecError, match=r"context indices 500 and 50, but the dataset's examples have 100 tokens"):
        make_probes(SPEC, ProbeConfig(n_examples=2), dataset=np.ones((3, 100), np.int32))
    with pytest.raises(SpecError, match="outside the model's vocabulary"):
        make_probes(SPEC, ProbeConfig(n_examples=2, icl_late=20, icl_early=5), dataset=np.full((3, 30), 40))
    with pytest.raises(SpecError, match="integer token ids"):
        make_probes(SPEC, ProbeConfig(n_examples=2, icl_late=20, icl_early=5), dataset=np.ones((3, 30), np.float32))
    plain = make_probes(SPEC, ProbeConfig(n_examples=2, icl_late=20, icl_early=5))
    text = make_probes(SPEC, ProbeConfig(n_examples=2, icl_late=20, icl_early=5), dataset=np.ones((3, 30), np.int32))
    assert plain.config_hash() != text.config_hash()  # the dataset is part of the probes' identity
