"""Mechanistic scores: hand-built circuits with known answers, and explicit dense computations.

The dense references form the full d_vocab x d_vocab (or d_model x d_model) matrices in
float64 numpy, exactly as the definitions read; the kernels never do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinduct.scores import mechanistic as mech

D_VOCAB, D_MODEL, D_HEAD = 13, 8, 4


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def dense_positivity(matrix):
    eigs = np.linalg.eigvals(matrix)
    return eigs.real.sum() / np.abs(eigs).sum()


def frob(m):
    return np.sqrt((m * m).sum())


@pytest.fixture
def head_weights():
    rng = np.random.default_rng(0)
    return dict(
        W_E=rand(rng, D_VOCAB, D_MODEL), W_U=rand(rng, D_MODEL, D_VOCAB),
        W_V1=rand(rng, D_MODEL, D_HEAD), W_O1=rand(rng, D_HEAD, D_MODEL),
        W_Q2=rand(rng, D_MODEL, D_HEAD), W_K2=rand(rng, D_MODEL, D_HEAD),
        W_V2=rand(rng, D_MODEL, D_HEAD), W_O2=rand(rng, D_HEAD, D_MODEL),
    )  # fmt: skip


def test_ov_copying_equals_the_dense_full_ov_circuit(head_weights):
    w = head_weights
    W_E, W_V, W_O, W_U = f64(w["W_E"], w["W_V1"], w["W_O1"], w["W_U"])
    expected = dense_positivity(W_E @ W_V @ W_O @ W_U)  # [d_vocab, d_vocab]
    got = mech.ov_copying(w["W_E"], w["W_V1"], w["W_O1"], w["W_U"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_ov_copying_of_hand_built_circuits():
    eye = np.eye(4, dtype=np.float32)
    assert float(mech.ov_copying(eye, eye, 2 * eye, eye)) == pytest.approx(1.0)  # copies every token
    assert float(mech.ov_copying(eye, eye, -2 * eye, eye)) == pytest.approx(-1.0)  # suppresses every token
    rotation = np.array([[0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1], [0, 0, -1, 0]], np.float32)
    assert float(mech.ov_copying(eye, eye, rotation, eye)) == pytest.approx(0.0, abs=1e-6)  # maps a -> b, b -> -a


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_composition_scores_equal_dense_products(head_weights, kind):
    w = head_weights
    V1, O1, Q2, K2, V2, O2 = f64(w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"], w["W_V2"], w["W_O2"])
    ov1 = V1 @ O1  # [d_model, d_model]
    right = {"q": Q2 @ K2.T, "k": (Q2 @ K2.T).T, "v": V2 @ O2}[kind]
    expected = frob(ov1 @ right) / (frob(ov1) * frob(right))
    got = {
        "q": lambda: mech.q_composition(w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"]),
        "k": lambda: mech.k_composition(w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"]),
        "v": lambda: mech.v_composition(w["W_V1"], w["W_O1"], w["W_V2"], w["W_O2"]),
    }[kind]()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_composition_of_orthogonal_subspaces_is_zero_and_of_aligned_ones_is_high():
    eye = np.eye(D_MODEL, dtype=np.float32)
    V1, O1 = eye[:, :2], eye[:2, :]  # head 1 writes dims 0-1
    Q2, K2 = eye[:, :2], eye[:, 4:6]  # head 2's queries read dims 0-1, its keys dims 4-5
    assert float(mech.q_composition(V1, O1, Q2, K2)) > 0.7
    assert float(mech.k_composition(V1, O1, Q2, K2)) == pytest.approx(0.0, abs=1e-7)


def test_induction_qk_equals_the_dense_vocab_matrix(head_weights):
    w = head_weights
    W_E, V1, O1, Q2, K2 = f64(w["W_E"], w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"])
    dense = (W_E @ Q2 @ K2.T) @ (W_E @ V1 @ O1).T  # [d_vocab, d_vocab]
    args = (w["W_E"], w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"])
    np.testing.assert_allclose(mech.induction_qk_positivity(*args), dense_positivity(dense), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mech.induction_qk_trace(*args), np.trace(dense), rtol=1e-5)


def test_induction_qk_of_a_hand_built_matching_circuit():
    # Head 1 copies the token into dims 4-7; head 2 compares the query's token (dims 0-3)
    # with what head 1 wrote: W = W_E W_QK2 (W_E W_OV1)^T is a positive multiple of the identity.
    eye = np.eye(D_MODEL, dtype=np.float32)
    W_E = eye[:4]  # 4 tokens embedded in dims 0-3
    V1, O1 = eye[:, :4], eye[4:, :]  # reads dims 0-3, writes them to dims 4-7
    Q2, K2 = eye[:, :4], eye[:, 4:]
    assert float(mech.induction_qk_positivity(W_E, V1, O1, Q2, K2)) == pytest.approx(1.0)
    assert float(mech.induction_qk_trace(W_E, V1, O1, Q2, K2)) == pytest.approx(4.0)
    assert float(mech.induction_qk_positivity(W_E, V1, -O1, Q2, K2)) == pytest.approx(-1.0)


def test_kernels_vmap_over_heads(head_weights):
    w = head_weights
    V = jnp.stack([w["W_V1"], w["W_V2"]])
    O = jnp.stack([w["W_O1"], w["W_O2"]])
    batched = jax.vmap(mech.ov_copying, in_axes=(None, 0, 0, None))(w["W_E"], V, O, w["W_U"])
    for h in range(2):
        np.testing.assert_allclose(batched[h], mech.ov_copying(w["W_E"], V[h], O[h], w["W_U"]), rtol=1e-6, atol=1e-6)


def test_positivity_of_an_all_zero_spectrum_is_nan():
    assert np.isnan(float(mech.positivity(jnp.zeros(3, jnp.complex64))))
