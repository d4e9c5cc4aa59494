"""The score registry: every registered score is computed by score_all under its kind, a score
registered from outside is computed like the built-in ones, a selection computes just what it
names, and no other module keeps its own list of score names."""

import ast
import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Literal

from jaxinduct.errors import JaxInductError
from jaxinduct.model.weights import ModelSpec, abstract_weights, init_random_weights, stack_weights
from jaxinduct.engine.cost import compiled_cost
from jaxinduct.scores import registry
from jaxinduct.scores.batched import (
    CURVE_NAMES,
    HEAD_SCORE_NAMES,
    MODEL_SCORE_NAMES,
    PAIR_SCORE_NAMES,
    ProbeArrays,
    _checkpoint_scores,
    _score_all,
    compile_score_all,
    score_all,
)
from jaxinduct.scores.probes import ProbeConfig, make_probes
from jaxinduct.scores.registry import Kind, Score

# Small enough to compile quickly; a dataset so that the dataset scores (icl, ablation) exist.
SPEC = ModelSpec(d_vocab=40, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=48, d_mlp=32, bos_token_id=0)
CONFIG = ProbeConfig(n_examples=2, block_len=10, n_repeats=3, icl_late=30, icl_early=5)
GROUPS = {Kind.HEAD: "head", Kind.PAIR: "pair", Kind.MODEL: "model", Kind.CURVE: "curve", Kind.HEAD_CURVE: "head_curve"}


@pytest.fixture(scope="module")
def weights():
    return stack_weights([init_random_weights(SPEC, seed) for seed in range(2)])


@pytest.fixture(scope="module")
def probes():
    dataset = np.random.default_rng(0).integers(1, SPEC.d_vocab, size=(2, 40))
    return make_probes(SPEC, CONFIG, dataset=dataset)


@pytest.fixture(scope="module")
def everything(weights, probes):
    return jax.device_get(score_all(weights, probes))


def returned(results) -> dict[Kind, set[str]]:
    return {kind: set(getattr(results, group)) for kind, group in GROUPS.items()}


def test_every_registered_score_is_returned_under_its_kind_and_nothing_else(everything):
    assert returned(everything) == {kind: set(registry.names(kind)) for kind in Kind}
    for score in registry.scores():
        value = getattr(everything, GROUPS[score.kind])[score.name]
        shape = {
            Kind.HEAD: (2, 2, 2), Kind.PAIR: (2, 2, 2, 2, 2), Kind.MODEL: (2,), Kind.CURVE: (2, 40),
            Kind.HEAD_CURVE: (2, 2, 2, 40),
        }[score.kind]  # fmt: skip
        assert value.shape == shape, score
    # The frozensets the engine and older callers import are the registry's names.
    assert HEAD_SCORE_NAMES == set(registry.names(Kind.HEAD)) and PAIR_SCORE_NAMES == set(registry.names(Kind.PAIR))
    assert MODEL_SCORE_NAMES == set(registry.names(Kind.MODEL))
    assert CURVE_NAMES == set(registry.names(Kind.CURVE)) | set(registry.names(Kind.HEAD_CURVE))


def test_without_a_dataset_the_dataset_scores_are_absent(weights):
    plain = make_probes(SPEC, CONFIG)
    selected = ("icl_score", "per_token_loss", "ablation_icl_delta", "induction_loss")
    results = score_all(weights, plain, scores=selected)
    assert returned(results) == {Kind.HEAD: set(), Kind.PAIR: set(), Kind.MODEL: {"induction_loss"}, Kind.CURVE: set(),
                                 Kind.HEAD_CURVE: set()}  # fmt: skip


def w_q_norm(ck):
    """Toy score: the Frobenius norm of each head's raw W_Q."""
    return jnp.sqrt(jnp.sum(ck.weights.W_Q**2, axis=(-2, -1)))


TOY = Score("w_q_norm", Kind.HEAD, "test", "Frobenius norm of W_Q", w_q_norm)


def test_a_registered_score_is_computed_by_score_all_and_gone_after_unregistering(weights, probes, everything):
    expected = np.sqrt((np.asarray(weights.W_Q, np.float64) ** 2).sum(axis=(-2, -1)))  # [ckpt, layer, head]
    with registry.registered(TOY):
        assert registry.get("w_q_norm") is TOY and "w_q_norm" in registry.names(Kind.HEAD)
        results = jax.device_get(score_all(weights, probes))  # every registered score: compiled anew
        np.testing.assert_allclose(results.head["w_q_norm"], expected, rtol=1e-6)
        assert returned(results)[Kind.HEAD] == returned(everything)[Kind.HEAD] | {"w_q_norm"}
        for name, value in everything.head.items():  # the others are unchanged, bit for bit
            np.testing.assert_array_equal(results.head[name], value, err_msg=name)
        alone = score_all(weights, probes, scores=["w_q_norm"])
        np.testing.assert_allclose(alone.head["w_q_norm"], expected, rtol=1e-6)
        with pytest.raises(registry.DuplicateScoreError, match="already registered"):
            registry.register(TOY)
    assert "w_q_norm" not in registry.names()
    assert "w_q_norm" not in score_all(weights, probes).head
    with pytest.raises(registry.UnknownScoreError):
        score_all(weights, probes, scores=["w_q_norm"])


def test_a_selection_returns_just_itself_and_equals_the_full_computation(weights, probes, everything):
    # Verdicts and per-head induction terms read other scores, which are computed but not returned;
    # induction_qk_positivity is a head and a pair score: selecting the name selects both.
    selected = ("induction_mechanism", "induction_qk_positivity", "ablation_icl_delta", "icl_score", "per_token_loss")
    results = jax.device_get(score_all(weights, probes, scores=selected))
    assert returned(results) == {
        Kind.HEAD: {"induction_mechanism", "induction_qk_positivity", "ablation_icl_delta"},
        Kind.PAIR: {"induction_qk_positivity"}, Kind.MODEL: {"icl_score"}, Kind.CURVE: {"per_token_loss"},
        Kind.HEAD_CURVE: set(),
    }  # fmt: skip
    for kind, group in GROUPS.items():
        for name, value in getattr(results, group).items():
            np.testing.assert_allclose(value, getattr(everything, group)[name], rtol=1e-6, atol=1e-6, err_msg=name)


def reads_probes(selection, weights, arrays) -> bool:
    """Whether the traced program of one checkpoint reads any probe array."""
    one = functools.partial(_checkpoint_scores, config=CONFIG, selection=selection)
    jaxpr = jax.make_jaxpr(one)(jax.tree.map(lambda x: x[0], weights), arrays).jaxpr
    probe_vars = set(jaxpr.invars[-len(jax.tree.leaves(arrays)) :])
    return any(v in probe_vars for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal))


def test_a_weights_only_selection_reads_no_probe(weights, probes):
    # ov_copying and the compositions come from the weights: no forward pass over any probe.
    arrays = ProbeArrays.from_probes(probes)
    assert not reads_probes(registry.select(["ov_copying", "q_composition", "k_composition", "v_composition"]), weights, arrays)
    assert reads_probes(registry.select(None), weights, arrays)  # the check can fail
    assert reads_probes(registry.select(["induction_mechanism"]), weights, arrays)  # it pulls in previous_token


def test_registry_api():
    assert [s.name for s in registry.scores(Kind.HEAD)][:5] == [
        "prefix_matching", "copying", "ov_copying", "previous_token", "induction_qk_positivity",
    ]  # fmt: skip
    # A name under two kinds: get() without a kind is its head form; names() lists it once.
    both = registry.get("induction_qk_positivity")
    assert both.kind == Kind.HEAD and both.title == "qk_pos" and both.value_range == (-1.0, 1.0) and both.headline
    assert registry.get("induction_qk_positivity", Kind.PAIR).kind == Kind.PAIR
    assert registry.names().count("induction_qk_positivity") == 1
    assert [s.name for s in registry.scores(Kind.HEAD) if s.verdict] == [
        "induction_behaviour", "induction_mechanism", "induction_verdicts_agree",
    ]  # fmt: skip
    with pytest.raises(JaxInductError, match="unknown score 'no_such_score'; known: .*prefix_matching"):
        registry.get("no_such_score")
    with pytest.raises(registry.UnknownScoreError):
        registry.get("icl_score", Kind.HEAD)
    with pytest.raises(registry.UnknownScoreError, match="'nope'"):
        registry.select(["prefix_matching", "nope"])
    with pytest.raises(registry.UnknownScoreError):
        registry.unregister("nope")
    listing = registry.describe_scores()
    for score in registry.scores():
        assert any(line.split()[:3] == [score.name, score.kind, score.family] for line in listing.splitlines())
    # A failed registration leaves nothing behind.
    clash = Score("prefix_matching", Kind.HEAD, "test", "a clash", w_q_norm)
    with pytest.raises(registry.DuplicateScoreError):
        with registry.registered(TOY, clash):
            pass
    assert "w_q_norm" not in registry.names()
    assert Score("x", "head", "test", "m", w_q_norm, value_range=[0, 1]) == Score("x", Kind.HEAD, "test", "m", w_q_norm, value_range=(0.0, 1.0))


# --- the registry is the one list of score names ----------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "jaxinduct"
REGISTRY_MODULE = PACKAGE / "scores" / "registry.py"
# A module may name a few scores it reads or presents specially (the CLI's default metric,
# the phase-change signals); more than this is a list of scores kept by hand.
MAX_NAMES_PER_MODULE = 5


def names_spelled(path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in known}


def test_no_module_but_the_registry_lists_score_names():
    known = set(registry.names())
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == REGISTRY_MODULE:
            continue
        spelled = names_spelled(path, known)
        if len(spelled) > MAX_NAMES_PER_MODULE:
            offenders[str(path.relative_to(PACKAGE))] = sorted(spelled)
    assert not offenders, f"score names belong in jaxinduct/scores/registry.py: {offenders}"


# --- a score registered in a test alone goes through a scan, show and export ---------------------


def test_a_registered_score_is_stored_by_a_scan_shown_and_exported(tmp_path, capsys):
    from jaxinduct.cli import main as cli_main
    from jaxinduct.results.store import ResultStore
    from tests.test_scan import PROBE_ARGS, STEPS, checkpoint_weights, write_trajectory

    trajectory = write_trajectory(tmp_path / "run-a", STEPS[:3])
    store = tmp_path / "results.sqlite"
    expected = {s: np.sqrt((np.asarray(checkpoint_weights(s).W_Q, np.float64) ** 2).sum(axis=(-2, -1))) for s in STEPS[:3]}
    with registry.registered(TOY):
        argv = ["scan", str(trajectory), "--store", str(store), "--scores", "w_q_norm,prefix_matching", *PROBE_ARGS]
        assert cli_main([*argv, "--no-progress"]) == 0
        with ResultStore.open(store, create=False, readonly=True) as results:
            steps, grid = results.head_score_grid("run-a", "w_q_norm")
        assert list(steps) == STEPS[:3]
        np.testing.assert_allclose(grid, np.stack([expected[s] for s in STEPS[:3]]), rtol=1e-6)
        capsys.readouterr()
        assert cli_main(["show", "--store", str(store), "--metric", "w_q_norm", "--top", "1"]) == 0
        shown = capsys.readouterr().out
        best = np.unravel_index(np.argmax(expected[STEPS[2]]), expected[STEPS[2]].shape)
        assert f"top 1 heads by w_q_norm at step {STEPS[2]}" in shown
        assert re.search(rf"^1\s+L{best[0]}H{best[1]}\s+{expected[STEPS[2]].max():.3f}\b", shown, re.MULTILINE), shown
    # Exported (and shown) from the store alone: the registry entry is no longer needed.
    out = tmp_path / "heads.csv"
    assert cli_main(["export", "--store", str(store), "--table", "heads", "--format", "csv", "--out", str(out)]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()[1:] if ",w_q_norm," in line]
    assert len(rows) == 3 * SPEC_SCAN_HEADS
    for run, step, layer, head, _, value in rows:
        assert abs(float(value) - expected[int(step)][int(layer), int(head)]) <= 1e-6 * expected[int(step)].max()


SPEC_SCAN_HEADS = 2 * 2  # tests/test_scan.py's SPEC: 2 layers x 2 heads


# --- shared products are computed once per checkpoint (from the compiled program) -------------


def compiled_flops(spec: ModelSpec, selection) -> float:
    """Matmul FLOPs of one checkpoint's compiled pass for this selection (shapes only, nothing runs),
    every loop body counted as many times as it runs (`jaxinduct.engine.cost`)."""
    stacked = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape), s.dtype), abstract_weights(spec))
    probes = make_probes(spec, ProbeConfig(n_examples=2))
    compiled = _score_all.lower(stacked, ProbeArrays.from_probes(probes), None, probes.config, None, tuple(selection)).compile()
    return compiled_cost(compiled).flops


def test_the_vocabulary_sized_products_are_computed_once_per_checkpoint():
    # A vocabulary far wider than the model, so that the two d_vocab-sized products dominate:
    # W_E^T W_E, which every induction QK pair (both scores, every source-layer block) reads,
    # and W_U W_E, which every head's OV circuit reads. Each costs 2 d_vocab d_model^2 FLOPs.
    spec = ModelSpec(d_vocab=8192, d_model=64, n_layers=5, n_heads=2, d_head=32, n_ctx=128, positional="rotary",
                     bos_token_id=0)  # fmt: skip
    product = 2 * spec.d_vocab * spec.d_model**2
    pairs = [registry.get(name, Kind.PAIR) for name in ("induction_qk_positivity", "induction_qk_trace")]
    base = compiled_flops(spec, registry.select(["k_composition"]))  # processing and the small per-pair products
    assert base < 0.5 * product  # the products dominate, so a second one could not hide in the bounds
    # The bound allows the pair loops and the eigenvalue inputs, not a second product of either
    # kind (inside the pair loop, W_E^T W_E would count once per source layer: 4 times here).
    assert product < compiled_flops(spec, pairs) < base + 1.3 * product
    assert 2 * product < compiled_flops(spec, [*pairs, registry.get("ov_copying")]) < base + 2.3 * product


def test_from_the_compiled_program_weights_only_runs_no_forward_and_patterns_no_logits():
    # A model whose probe forwards dominate, so the counts below cannot hide one.
    spec = ModelSpec(d_vocab=64, d_model=32, n_layers=2, n_heads=2, d_head=16, n_ctx=64, d_mlp=128, bos_token_id=0)
    config = ProbeConfig(n_examples=16, block_len=10, n_repeats=3)
    s, d, h, e, m = 1 + 10 * 3, spec.d_model, spec.n_heads, spec.d_head, spec.d_mlp
    # One forward over the repeated probe, by hand: Q, K, V, scores, pattern x V, W_O, MLP in and out.
    per_layer = 3 * 2 * s * d * h * e + 2 * 2 * h * s * s * e + 2 * s * h * e * d + 2 * 2 * s * d * m
    forward = config.n_examples * spec.n_layers * per_layer
    stacked = stack_weights([init_random_weights(spec, 0)])
    probes = make_probes(spec, config)

    def flops(names):
        return compiled_cost(compile_score_all(stacked, probes, checkpoints_per_pass=1, scores=names).compiled).flops

    assert flops(["ov_copying", "q_composition", "k_composition", "v_composition"]) < 0.1 * forward
    assert flops(["prefix_matching"]) == pytest.approx(forward, rel=0.01)  # patterns: no unembedding
    logits = config.n_examples * (s - 1 - (10 * 3) // 2) * 2 * d * spec.d_vocab  # induction_loss unembeds half
    assert flops(["prefix_matching", "induction_loss"]) == pytest.approx(forward + logits, rel=0.05)
