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


def dense_causal_softmax(scores):
    """Row softmax over keys k <= row index (float64)."""
    out = np.zeros_like(scores)
    for i in range(len(scores)):
        e = np.exp(scores[i, : i + 1] - scores[i, : i + 1].max())
        out[i, : i + 1] = e / e.sum()
    return out


N_CTX = 11


def test_qk_prev_token_equals_the_dense_positional_pattern():
    rng = np.random.default_rng(1)
    W_pos, W_Q, W_K = rand(rng, N_CTX, D_MODEL), rand(rng, D_MODEL, D_HEAD), rand(rng, D_MODEL, D_HEAD)
    P, Q, K = f64(W_pos, W_Q, W_K)
    pattern = dense_causal_softmax(P @ Q @ K.T @ P.T / np.sqrt(D_HEAD))
    expected = np.mean([pattern[i, i - 1] for i in range(1, N_CTX)])
    np.testing.assert_allclose(mech.qk_prev_token(W_pos, W_Q, W_K), expected, rtol=1e-5, atol=1e-6)


def test_pointer_arithmetic_equals_the_dense_definition(head_weights):
    w = head_weights
    rng = np.random.default_rng(2)
    W_pos = rand(rng, N_CTX, D_MODEL)
    P, V1, O1, Q2, K2 = f64(W_pos, w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"])
    S = P @ (V1 @ O1) @ (Q2 @ K2.T) @ P.T / np.sqrt(D_HEAD)  # [n_ctx, n_ctx] with the d_model x d_model circuits
    entries = []
    for j in range(N_CTX - 1):
        row = S[j, : j + 2]
        e = np.exp(row - row.max())
        entries.append(e[j + 1] / e.sum())
    got = mech.pointer_arithmetic(W_pos, w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"])
    np.testing.assert_allclose(got, np.mean(entries), rtol=1e-5, atol=1e-6)


def test_hand_built_positional_heads():
    eye = np.eye(N_CTX, dtype=np.float32)  # W_pos: one-hot positions, d_model = d_head = n_ctx
    sharp = np.float32(30.0 * np.sqrt(N_CTX))
    previous = np.zeros((N_CTX, N_CTX), np.float32)
    previous[np.arange(1, N_CTX), np.arange(N_CTX - 1)] = sharp  # position i asks for i - 1
    assert float(mech.qk_prev_token(eye, previous, eye)) == pytest.approx(1.0, abs=1e-6)
    assert float(mech.qk_prev_token(eye, eye * sharp, eye)) == pytest.approx(0.0, abs=1e-6)  # attends to itself
    # Head 1 copies positions (identity OV); head 2's query asks for one position further on.
    forward_one = np.zeros((N_CTX, N_CTX), np.float32)
    forward_one[np.arange(N_CTX - 1), np.arange(1, N_CTX)] = sharp
    assert float(mech.pointer_arithmetic(eye, eye, eye, forward_one, eye)) == pytest.approx(1.0, abs=1e-6)
    assert float(mech.pointer_arithmetic(eye, eye, eye, eye * sharp, eye)) == pytest.approx(0.0, abs=1e-6)


def test_host_eigenvalues_equal_device_eigenvalues(head_weights):
    # The TPU path (a host callback) run on CPU: same spectrum, also under jit and vmap.
    w = head_weights
    matrices = jnp.stack([mech.induction_qk_matrix(w["W_E"], w["W_V1"], w["W_O1"], w["W_Q2"], w["W_K2"])] * 3)
    on_device = jax.vmap(jnp.linalg.eigvals)(matrices)
    on_host = jax.jit(jax.vmap(lambda m: mech.eigenvalues(m, on_host=True)))(matrices)
    key = lambda e: np.sort_complex(np.asarray(e))  # noqa: E731
    np.testing.assert_allclose(key(on_host), key(on_device), rtol=1e-4, atol=1e-4)


def test_weighted_over_sources_of_a_hand_made_grid():
    # Two layers of two heads: pairs exist from layer 0 into layer 1 only.
    pair = np.full((2, 2, 2, 2), np.nan, np.float32)
    pair[0, 0, 1, 0], pair[0, 1, 1, 0] = 0.2, 0.8
    pair[0, 1, 1, 1] = 0.5  # pair[0, 0, 1, 1] undefined: that source does not count there
    weight = np.array([[3.0, 1.0], [5.0, np.nan]], np.float32)  # layer 1's weights meet no defined pair
    got = np.asarray(mech.weighted_over_sources(jnp.asarray(pair), jnp.asarray(weight)))
    np.testing.assert_allclose(got[1], [(3 * 0.2 + 1 * 0.8) / 4, 0.5], rtol=1e-6)
    assert np.isnan(got[0]).all()  # nothing flows into layer 0
    zero = np.asarray(mech.weighted_over_sources(jnp.asarray(pair), jnp.zeros((2, 2))))
    assert np.isnan(zero).all()  # no source with weight: undefined, not 0
