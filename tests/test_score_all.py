"""The batched entry point: hand-built circuits with known answers, and invariance.

The hand-built model has three blocks of residual dimensions: the current token (one-hot),
the position (one-hot), and a slot where layer 0 writes the previous token. Layer 0's
head attends one position back through positions alone and copies the token it sees
into the slot; layer 1's head matches its query token against that slot (K-composition)
and copies the token it lands on (an identity OV circuit). Nothing is trained.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinduct.scores.probes import ProbeConfig, make_probes
from jaxinduct.scores.batched import ProbeArrays, _checkpoint_scores, score_all
from jaxinduct.model.weights import ModelSpec, init_random_weights, make_weights, stack_weights
from tests.reference import reference_forward

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
    assert head["previous_token"][0, 0] > 0.99  # layer 0: a previous-token head ...
    assert head["qk_prev_token"][0, 0] > 0.99  # ... through its positional QK circuit
    assert head["prefix_matching"][1, 0] > 0.9
    assert head["copying"][1, 0] > 0.9
    assert head["ov_copying"][1, 0] > 0.9
    assert head["induction_qk_positivity"][1, 0] > 0.9
    assert head["induction_behaviour"][1, 0] == 1 and head["induction_mechanism"][1, 0] == 1
    assert head["induction_verdicts_agree"][1, 0] == 1
    assert abs(head["prefix2_sensitivity"][1, 0]) < 0.05  # it matches one token back only
    assert head["prefix_matching"][0, 0] < 0.1  # the previous-token head is no induction head
    assert head["induction_behaviour"][0, 0] == 0 and head["induction_mechanism"][0, 0] == 0
    # K-composition of two identity-like rank-V circuits is 1/sqrt(V) (|I_V|_F = sqrt(V)).
    pair_k = np.asarray(circuit_scores.pair["k_composition"])[0]
    assert pair_k[0, 0, 1, 0] == pytest.approx(1 / np.sqrt(V), rel=1e-5)
    assert np.isnan(pair_k[1, 0, 0, 0])  # only earlier -> later pairs are defined


def test_negated_ov_circuit_scores_as_anti_copying(circuit_scores):
    head = {name: np.asarray(v)[1] for name, v in circuit_scores.head.items()}
    assert head["ov_copying"][1, 0] < -0.9
    assert head["copying"][1, 0] < -0.9
    assert head["prefix_matching"][1, 0] > 0.9  # where it attends is unchanged
    assert head["induction_behaviour"][1, 0] == 0 and head["induction_mechanism"][1, 0] == 0


def test_induction_verdicts_of_given_head_scores():
    from jaxinduct.scores.batched import induction_verdicts
    from jaxinduct.scores.probes import VerdictThresholds
    from jaxinduct.scores.registry import UnknownScoreError

    nan = np.nan
    head = {  # [layer, head]; default thresholds: 0.4, 0.3, 0.5, 0.5, previous_token 0.2
        "prefix_matching": [[0.5, 0.1], [0.5, 0.5]],
        "copying": [[0.5, 0.5], [0.4, nan]],
        "ov_copying": [[0.9, 0.9], [0.6, 0.6]],
        "induction_qk_positivity": [[nan, nan], [0.7, 0.6]],
        "previous_token": [[0.3, 0.0], [0.0, 0.0]],  # L0H0 is the upstream previous-token head of layer 1
    }
    got = induction_verdicts({k: jnp.asarray(v, jnp.float32) for k, v in head.items()}, VerdictThresholds())
    np.testing.assert_array_equal(got["induction_behaviour"], [[1, 0], [1, 0]])  # NaN copying never passes
    np.testing.assert_array_equal(got["induction_mechanism"], [[0, 0], [1, 1]])  # layer 0 has nothing upstream
    np.testing.assert_array_equal(got["induction_verdicts_agree"], [[0, 1], [1, 0]])
    assert got["induction_behaviour"].dtype == jnp.float32
    missing = {k: jnp.asarray(v, jnp.float32) for k, v in head.items() if k != "ov_copying"}
    with pytest.raises(UnknownScoreError, match="ov_copying"):
        induction_verdicts(missing, VerdictThresholds())


SPEC = ModelSpec(d_vocab=40, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=101, d_mlp=32, bos_token_id=0)


@pytest.fixture(scope="module")
def eight_checkpoints():
    return [init_random_weights(SPEC, seed) for seed in range(8)]


ScoreResultsGroups = ("head", "pair", "model", "curve", "head_curve")


def assert_same_results(a, b, tol):
    # Ablation deltas are differences of losses of a few nats: their float32 rounding is that
    # of the losses subtracted, so they are compared at tol relative to those losses.
    loss_scale = float(np.nanmax(np.asarray(a.curve["per_token_loss"]))) if "per_token_loss" in a.curve else 1.0
    for group in ScoreResultsGroups:
        x, y = getattr(a, group), getattr(b, group)
        assert sorted(x) == sorted(y)
        for name in x:
            atol = tol * loss_scale if name.startswith("ablation_") else tol
            np.testing.assert_allclose(np.asarray(x[name]), np.asarray(y[name]), rtol=tol, atol=atol, err_msg=name)


def probes_with_dataset(seed=3):
    """Small probes with a text-like dataset, so that every score (ablation included) is computed."""
    dataset = np.random.default_rng(seed).integers(1, SPEC.d_vocab, size=(3, 40))
    return make_probes(SPEC, ProbeConfig(n_examples=3, icl_late=30, icl_early=5), dataset=dataset)


def test_batched_equals_a_loop_over_checkpoints(eight_checkpoints):
    probes = probes_with_dataset()
    batched = score_all(stack_weights(eight_checkpoints), probes)
    one = jax.jit(functools.partial(_checkpoint_scores, config=probes.config))
    looped = [one(w, ProbeArrays.from_probes(probes)) for w in eight_checkpoints]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *looped)
    assert_same_results(batched, stacked, 1e-6)
    assert batched.head["prefix_matching"].shape == (8, 2, 2)
    assert batched.pair["q_composition"].shape == (8, 2, 2, 2, 2)


def test_sharded_over_eight_devices_equals_unsharded(eight_checkpoints):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (conftest sets 8 CPU devices)")
    probes = probes_with_dataset()
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


def test_rows_marked_invalid_are_nan_and_the_others_unchanged(eight_checkpoints):
    # The engine pads a short last batch: padded rows are skipped (one per pass) or masked.
    probes = make_probes(SPEC, ProbeConfig(n_examples=3))
    stacked = stack_weights(eight_checkpoints)
    whole = jax.device_get(score_all(stacked, probes))
    valid = np.array([True, True, False, True, True, True, False, False])
    runs = {per_pass: score_all(stacked, probes, checkpoints_per_pass=per_pass, valid=valid) for per_pass in (None, 1, 3)}
    if len(jax.devices()) >= 8:
        mesh = Mesh(np.array(jax.devices()[:8]), ("ckpt",))
        sharding = NamedSharding(mesh, PartitionSpec("ckpt"))
        for per_pass in (None, 1):
            runs[f"sharded, {per_pass} per pass"] = score_all(
                jax.device_put(stacked, sharding), probes, checkpoints_per_pass=per_pass, valid=jax.device_put(valid, sharding)
            )
        runs["sharded, host flags"] = score_all(jax.device_put(stacked, sharding), probes, checkpoints_per_pass=1, valid=valid)
    for name, results in runs.items():
        results = jax.device_get(results)
        for group in ("head", "pair", "model", "curve", "head_curve"):
            for key, value in getattr(results, group).items():
                assert np.isnan(value[~valid]).all(), (name, group, key)
                np.testing.assert_allclose(value[valid], getattr(whole, group)[key][valid], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one flag per checkpoint"):
        score_all(stacked, probes, valid=valid[:5])


def test_pair_scores_of_a_six_layer_model_equal_a_loop_over_pairs():
    # score_all computes pairs whose source layer comes first, source layers in blocks (here
    # [0, 1], [2], [3], [4]): every pair must land in its own cell, every other cell be NaN.
    from jaxinduct.model.processing import process_weights
    from jaxinduct.scores import mechanistic

    spec = ModelSpec(d_vocab=40, d_model=16, n_layers=6, n_heads=2, d_head=4, n_ctx=101, bos_token_id=0)
    weights = init_random_weights(spec, 11)
    pair = jax.device_get(score_all(stack_weights([weights]), make_probes(spec, ProbeConfig(n_examples=2))).pair)
    p = process_weights(weights)
    per_pair = {
        "q_composition": lambda a, b: mechanistic.q_composition(p.W_V[a], p.W_O[a], p.W_Q[b], p.W_K[b]),
        "k_composition": lambda a, b: mechanistic.k_composition(p.W_V[a], p.W_O[a], p.W_Q[b], p.W_K[b]),
        "v_composition": lambda a, b: mechanistic.v_composition(p.W_V[a], p.W_O[a], p.W_V[b], p.W_O[b]),
        "induction_qk_positivity": lambda a, b: mechanistic.induction_qk_positivity(
            p.W_E, p.W_V[a], p.W_O[a], p.W_Q[b], p.W_K[b]
        ),
        "induction_qk_trace": lambda a, b: mechanistic.induction_qk_trace(p.W_E, p.W_V[a], p.W_O[a], p.W_Q[b], p.W_K[b]),
        "pointer_arithmetic": lambda a, b: mechanistic.pointer_arithmetic(p.W_pos, p.W_V[a], p.W_O[a], p.W_Q[b], p.W_K[b]),
    }
    for name, score in per_pair.items():
        for l1, h1, l2, h2 in np.ndindex(6, 2, 6, 2):
            got = pair[name][0, l1, h1, l2, h2]
            if l1 < l2:
                np.testing.assert_allclose(got, score((l1, h1), (l2, h2)), rtol=1e-5, atol=1e-6, err_msg=name)
            else:
                assert np.isnan(got), (name, l1, h1, l2, h2)


def test_model_scores_equal_losses_from_the_reference_model(eight_checkpoints):
    from flax import nnx

    from jaxinduct.model.nnx import model_from_weights

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
    dataset = np.random.default_rng(0).integers(1, SPEC.d_vocab, size=(3, 30))
    text = make_probes(SPEC, ProbeConfig(n_examples=2, icl_late=20, icl_early=5), dataset=dataset)
    assert plain.config_hash() != text.config_hash()  # the dataset is part of the probes' identity


# --- prefix2_sensitivity: a head that matches two tokens back --------------------------------

PREV2 = PREV + V  # a fourth residual block: the token two positions back
D_MODEL2 = PREV2 + V


def two_token_induction_circuit():
    """Layer 0: a previous-token head and a previous-previous-token head. Layer 1: a head
    that attends to the key whose two predecessors equal the query's token and the query's
    predecessor (logit 2 * SHARP), else to BOS (1.5 * SHARP, above a one-token match)."""
    spec = ModelSpec(
        d_vocab=V, d_model=D_MODEL2, n_layers=2, n_heads=2, d_head=D_HEAD, n_ctx=N_CTX,
        positional="learned", norm="none", bos_token_id=0,
    )  # fmt: skip
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    W_E, W_pos, W_U = z(V, D_MODEL2), z(N_CTX, D_MODEL2), z(D_MODEL2, V)
    W_Q, W_K, W_V, W_O = (z(2, 2, D_MODEL2, D_HEAD), z(2, 2, D_MODEL2, D_HEAD), z(2, 2, D_MODEL2, D_HEAD), z(2, 2, D_HEAD, D_MODEL2))
    b_Q = z(2, 2, D_HEAD)
    for t in range(V):
        W_E[t, TOK + t] = W_U[TOK + t, t] = 1.0
        for head, slot in ((0, PREV), (1, PREV2)):  # layer 0 copies the token it attends to into a slot
            W_V[0, head, TOK + t, t] = 1.0
            W_O[0, head, t, slot + t] = 1.0
        W_Q[1, 0, TOK + t, t] = SHARP  # query token against the key's previous token
        W_K[1, 0, PREV + t, t] = 1.0
        W_Q[1, 0, PREV + t, V + t] = SHARP  # query's previous token against the key's token two back
        W_K[1, 0, PREV2 + t, V + t] = 1.0
        W_V[1, 0, TOK + t, t] = 1.0
        W_O[1, 0, t, TOK + t] = 1.0
    b_Q[1, 0, 2 * V] = 1.5 * SHARP  # every query, against the BOS key below: the fallback
    W_K[1, 0, TOK + 0, 2 * V] = 1.0
    for i in range(N_CTX):
        W_pos[i, POS + i] = 1.0
        W_K[0, :, POS + i, i] = 1.0
        for head, back in ((0, 1), (1, 2)):
            if i >= back:
                W_Q[0, head, POS + i, i - back] = SHARP
    arrays = dict(
        W_E=W_E, W_pos=W_pos, W_U=W_U, b_U=z(V), W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O,
        b_Q=b_Q, b_K=z(2, 2, D_HEAD), b_V=z(2, 2, D_HEAD), b_O=z(2, D_MODEL2),
    )  # fmt: skip
    return make_weights(spec, {k: jnp.asarray(v) for k, v in arrays.items()})


def test_a_head_matching_two_tokens_back_is_prefix2_sensitive():
    weights = stack_weights([two_token_induction_circuit()])
    head = score_all(weights, make_probes(weights.spec, ProbeConfig(n_examples=4))).head
    assert head["previous_token"][0, 0, 0] > 0.99
    assert head["prefix_matching"][0, 1, 0] > 0.9  # on the standard probe it is an induction head
    assert head["prefix2_sensitivity"][0, 1, 0] > 0.8  # but it needs the previous token to match too


def test_changed_predecessor_probe_structure():
    probes = make_probes(SPEC, ProbeConfig(n_examples=3))
    body, changed, queries = probes.repeated[:, 1:], probes.prefix2[:, 1:], probes.prefix2_queries[:, 1:]
    block = body[:, :25]
    np.testing.assert_array_equal(changed[:, :25], block)  # the first repeat is untouched
    for repeat in range(1, 4):
        part = changed[:, 25 * repeat : 25 * (repeat + 1)]
        np.testing.assert_array_equal(part[:, 0::2], block[:, 0::2])  # even offsets keep their token
        for e in range(3):
            assert not set(part[e, 1::2]) & set(block[e])  # odd offsets: tokens outside R
        np.testing.assert_array_equal(queries[:, 25 * repeat : 25 * (repeat + 1)][:, 2::2], True)
    assert queries.sum() == 3 * 3 * 12 and not queries[:, :25].any()
    for e in range(3):  # a predecessor never recurs at the same offset: per offset, distinct over repeats
        for offset in range(1, 25, 2):
            fresh = changed[e, [offset + 25 * r for r in range(1, 4)]]
            assert len(set(fresh)) == 3


# --- empirical copying against a dense computation -----------------------------------------


def dense_copying(weights, tokens):
    """The definition of docs/scores.md, in float64 numpy from the reference forward pass."""
    internals = {}
    _, patterns = reference_forward(weights, tokens, internals=internals)
    spec = weights.spec
    x = internals["final_residual"]
    centre = spec.norm.value == "layernorm"
    if centre:
        x = x - x.mean(axis=-1, keepdims=True)
    if spec.norm.value == "none":
        scale, norm_w = np.ones(len(tokens)), np.ones(spec.d_model)
    else:
        scale = 1 / np.sqrt((x**2).mean(axis=-1) + spec.norm_eps)
        norm_w = np.asarray(weights.ln_final_w, np.float64)
    W_U = np.asarray(weights.W_U, np.float64)
    scores = np.full((spec.n_layers, spec.n_heads), np.nan)
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            contrasts = []
            for q in range(len(tokens)):
                o = internals["head_outputs"][layer, head, q]
                logits = ((o - o.mean() if centre else o) * scale[q] * norm_w) @ W_U
                boost = np.maximum(logits[np.asarray(tokens)] - logits.mean(), 0.0)
                attention = patterns[layer, head, q]
                attended = (attention * boost).sum()
                away = 1 - attention / attention.max()
                if away.sum() > 1e-6:
                    unattended = (away * boost).sum() / away.sum()
                    if attended + unattended > 0:
                        contrasts.append((attended - unattended) / (attended + unattended))
            scores[layer, head] = np.mean(contrasts)
    return scores


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
def test_copying_equals_a_dense_computation(norm):
    spec = ModelSpec(**{**SPEC.to_dict(), "norm": norm})
    checkpoints = [init_random_weights(spec, seed) for seed in range(2)]
    probes = make_probes(spec, ProbeConfig(n_examples=2))
    results = score_all(stack_weights(checkpoints), probes)
    for i in range(2):
        expected = np.mean([dense_copying(checkpoints[i], t) for t in probes.copying], axis=0)
        np.testing.assert_allclose(results.head["copying"][i], expected, rtol=1e-4, atol=1e-5)


def test_a_one_layer_model_has_head_scores_and_no_pair_scores():
    spec = ModelSpec(**{**SPEC.to_dict(), "n_layers": 1})
    results = jax.device_get(score_all(stack_weights([init_random_weights(spec, 0)]), make_probes(spec, ProbeConfig(n_examples=2))))
    assert all(np.isnan(value).all() and value.shape == (1, 1, 2, 1, 2) for value in results.pair.values())
    assert np.isfinite(results.head["prefix_matching"]).all() and np.isfinite(results.head["ov_copying"]).all()


# --- head ablation --------------------------------------------------------------------------


def icl_and_curve(logits, dataset, late, early):
    """Reference per-token loss and icl_score from float64 logits [example, seq, vocab]."""
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs[:, :-1], dataset[:, 1:, None], axis=-1)[..., 0]
    curve = np.concatenate([[np.nan], nll.mean(axis=0)])
    return curve[late] - curve[early], curve


def test_ablation_equals_removing_the_head_from_the_weights(eight_checkpoints):
    probes = probes_with_dataset()
    weights = eight_checkpoints[0]
    results = score_all(stack_weights([weights]), probes)
    layer, head = 0, 1
    removed = weights.arrays()
    removed["W_O"] = removed["W_O"].at[layer, head].set(0.0)
    without = score_all(stack_weights([make_weights(SPEC, removed)]), probes)
    expected = without.model["icl_score"][0] - results.model["icl_score"][0]
    np.testing.assert_allclose(results.head["ablation_icl_delta"][0, layer, head], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        results.head_curve["ablation_per_token_loss_delta"][0, layer, head],
        without.curve["per_token_loss"][0] - results.curve["per_token_loss"][0],
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_pattern_preserving_ablation_equals_the_reference_with_frozen_patterns(eight_checkpoints):
    probes = probes_with_dataset()
    weights = eight_checkpoints[1]
    results = score_all(stack_weights([weights]), probes)
    config, dataset = probes.config, probes.dataset
    clean = [reference_forward(weights, t) for t in dataset]
    clean_icl, _ = icl_and_curve(np.stack([c[0] for c in clean]), dataset, config.icl_late, config.icl_early)
    for layer, head in [(0, 0), (1, 1)]:
        mask = np.ones((2, 2))
        mask[layer, head] = 0.0
        full = np.stack([reference_forward(weights, t, head_mask=mask)[0] for t in dataset])
        frozen = np.stack([reference_forward(weights, t, head_mask=mask, frozen_patterns=c[1])[0] for t, c in zip(dataset, clean)])
        for name, logits in (("ablation_icl_delta", full), ("ablation_icl_delta_pattern_preserving", frozen)):
            icl, _ = icl_and_curve(logits, dataset, config.icl_late, config.icl_early)
            np.testing.assert_allclose(results.head[name][0, layer, head], icl - clean_icl, rtol=1e-4, atol=1e-5)
    # A layer-0 head changes layer 1's patterns, so the two ablations differ there.
    deltas = results.head["ablation_icl_delta"][0, 0] - results.head["ablation_icl_delta_pattern_preserving"][0, 0]
    assert np.abs(np.asarray(deltas)).max() > 1e-4


# --- random initialisation: the documented baselines -----------------------------------------


def uniform_attention_baselines(random_probe_length, block=25, repeats=4):
    """prefix_matching, duplicate_token and previous_token of a head attending evenly to
    every key it can see, on [BOS] + R x repeats and [BOS] + distinct tokens (docs/scores.md)."""
    prefix, duplicate = [], []
    for k in range(2, repeats + 1):  # repeat k (1-based) has k - 1 earlier copies of each token
        for j in range(block):
            q = 1 + block * (k - 1) + j  # position; q + 1 keys visible
            prefix.append((k - 1) / (q + 1))
            duplicate.append((k - 1) / (q + 1))
    previous = np.mean([1 / (q + 1) for q in range(1, random_probe_length)])
    return np.mean(prefix), np.mean(duplicate), previous


def test_a_randomly_initialised_model_scores_near_the_documented_baselines():
    from flax import nnx

    from jaxinduct.model.nnx import Transformer, model_to_weights
    from jaxinduct.train.trainer import get_preset

    spec = get_preset("quickstart").model
    weights = model_to_weights(Transformer(spec, rngs=nnx.Rngs(0)))
    probes = make_probes(spec, ProbeConfig(n_examples=8))
    head = score_all(stack_weights([weights]), probes).head
    # The random probe is [BOS] + every other id once (63 of them) on this 64-token vocabulary.
    assert probes.random.shape[1] == 64
    prefix, duplicate, previous = uniform_attention_baselines(random_probe_length=64)
    np.testing.assert_allclose(head["prefix_matching"], prefix, atol=0.01)
    np.testing.assert_allclose(head["duplicate_token"], duplicate, atol=0.01)
    np.testing.assert_allclose(head["previous_token"], previous, atol=0.01)
    assert np.abs(np.asarray(head["copying"])).max() < 0.25
    assert np.abs(np.asarray(head["ov_copying"])).max() < 0.5
    assert np.asarray(head["induction_behaviour"]).sum() == 0 and np.asarray(head["induction_mechanism"]).sum() == 0


# --- probes ---------------------------------------------------------------------------------


def test_dataset_token_pool_excludes_special_most_and_least_frequent_tokens():
    from jaxinduct.scores.probes import token_pool

    # Token t (1..39) appears t times; BOS (0) appears most of all; nothing else is present.
    dataset = np.concatenate([np.zeros(500, int)] + [np.full(t, t) for t in range(1, 40)])
    dataset = np.resize(np.random.default_rng(0).permutation(dataset), (10, 128))[:, :78]
    counts = np.bincount(dataset.ravel(), minlength=40)
    present = [t for t in range(1, 40) if counts[t] > 0]
    ranked = sorted(present, key=lambda t: (-counts[t], t))
    config = ProbeConfig(n_examples=2, icl_late=60, icl_early=5, pool_exclude_frequent=0.1, pool_exclude_rare=0.2)
    n = len(ranked)
    expected = sorted(ranked[int(n * 0.1) : n - int(n * 0.2)])
    np.testing.assert_array_equal(token_pool(SPEC, config, dataset), expected)
    probes = make_probes(SPEC, config, dataset=dataset)
    assert set(np.unique(probes.repeated[:, 1:])) <= set(expected)
    with pytest.raises(Exception, match="the token pool .* has .* ids; the probes need at least 28"):
        make_probes(SPEC, ProbeConfig(n_examples=2, icl_late=60, icl_early=5, pool_exclude_frequent=0.5, pool_exclude_rare=0.4), dataset=dataset)


def test_previous_token_is_measured_on_the_dataset_when_one_is_given(eight_checkpoints):
    probes = probes_with_dataset()
    weights = eight_checkpoints[2]
    results = score_all(stack_weights([weights]), probes)
    patterns = np.stack([reference_forward(weights, t)[1] for t in probes.dataset])  # [example, layer, head, q, k]
    expected = np.mean([np.diagonal(p, offset=-1, axis1=-2, axis2=-1).mean(-1) for p in patterns], axis=0)
    np.testing.assert_allclose(results.head["previous_token"][0], expected, rtol=1e-5, atol=1e-6)


def test_unembedded_losses_equal_the_log_softmax_of_the_whole_logits(monkeypatch):
    # Chunks of 7 columns over a vocabulary of 50: 8 chunks, the last padded by 6 columns.
    from jaxinduct.scores import losses

    monkeypatch.setattr(losses, "VOCAB_CHUNK", 7)
    rng = np.random.default_rng(3)
    spec = ModelSpec(d_vocab=50, d_model=16, n_layers=1, n_heads=2, d_head=8, n_ctx=32, d_mlp=None)
    weights = init_random_weights(spec, 0)
    weights = dataclasses.replace(weights, W_U=weights.W_U * 4.0)  # logits spread over a wide range
    final = rng.standard_normal((3, 11, 16)).astype(np.float32)
    targets = rng.integers(0, 50, (3, 11)).astype(np.int32)
    logits = final.astype(np.float64) @ np.asarray(weights.W_U, np.float64) + np.asarray(weights.b_U, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    got = jax.jit(losses.unembedded_losses)(weights, jnp.asarray(final), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    # A NaN position (an out-of-vocabulary token upstream) stays NaN; the others are unaffected.
    final[1, 4] = np.nan
    got = np.asarray(jax.jit(losses.unembedded_losses)(weights, jnp.asarray(final), jnp.asarray(targets)))
    assert np.isnan(got[1, 4]) and np.isfinite(np.delete(got.reshape(-1), 1 * 11 + 4)).all()
