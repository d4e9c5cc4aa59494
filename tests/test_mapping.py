"""Declarative mappings (jaxinduct.checkpoints.mapping): someone else's Orbax params tree, scanned via a YAML.

The foreign checkpoints are built by hand from canonical random weights by the inverse
of the mapping's transforms; expected scores come from `score_all` on the canonical weights.
"""

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxinduct.checkpoints.mapping import MappingError, apply_mapping, load_mapping, parse_mapping
from jaxinduct.scores.probes import ProbeConfig, make_probes
from jaxinduct.engine.scan import ScanConfig as ScanOptions, probe_identity, scan
from jaxinduct.scores.batched import SCORES_VERSION, score_all
from jaxinduct.checkpoints import MappedSource as OrbaxSource, SourceError  # every use reads through a mapping
from jaxinduct.results.store import ResultStore
from jaxinduct.model.weights import ModelSpec, expected_shapes, init_random_weights, stack_weights

REPO = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(d_vocab=40, d_model=16, n_layers=2, n_heads=2, d_head=8, n_ctx=40, bos_token_id=0)
PROBE = ProbeConfig(n_examples=2, block_len=9, n_repeats=4)
STEPS = [0, 5, 9]

MAPPING = {
    "spec": SPEC.to_dict(),
    "item": "default",
    "tensors": {
        "W_E": "params/embed/embedding",
        "W_pos": "params/pos_embed/embedding",
        "W_U": "params/unembed/kernel",
        "b_U": "params/unembed/bias",
        "ln1_w": "params/blocks_{layer}/ln/scale",
        "ln1_b": "params/blocks_{layer}/ln/bias",
        "W_Q": {"path": "params/blocks_{layer}/attn/query/kernel", "split_heads": "in"},
        "W_K": {"path": "params/blocks_{layer}/attn/key/kernel", "transpose": True, "split_heads": "in"},
        "W_V": {"path": "params/blocks_{layer}/attn/value/kernel", "transpose": [1, 0, 2]},
        "W_O": {"path": "params/blocks_{layer}/attn/out/kernel", "split_heads": "out"},
        "b_Q": {"path": "params/blocks_{layer}/attn/query/bias", "split_heads": "bias"},
        "b_K": {"path": "params/blocks_{layer}/attn/key/bias", "split_heads": "bias"},
        "b_V": {"zeros": True},
        "b_O": "params/blocks_{layer}/attn/out/bias",
        "ln_final_w": "params/ln_f/scale",
        "ln_final_b": "params/ln_f/bias",
    },
}


def canonical(step):
    w = init_random_weights(SPEC, step)
    arrays = {k: np.asarray(v) for k, v in w.arrays().items()}
    arrays["b_V"] = np.zeros_like(arrays["b_V"])  # the foreign model has no value bias
    from jaxinduct.model.weights import make_weights

    return make_weights(SPEC, arrays)


def heads_in(x):  # canonical [H, D, E] -> linen Dense kernel [D, H*E]
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def foreign_tree(w):
    a = {k: np.asarray(v) for k, v in w.arrays().items()}
    params = {
        "embed": {"embedding": a["W_E"]},
        "pos_embed": {"embedding": a["W_pos"]},
        "unembed": {"kernel": a["W_U"], "bias": a["b_U"]},
        "ln_f": {"scale": a["ln_final_w"], "bias": a["ln_final_b"]},
    }
    for i in range(SPEC.n_layers):
        params[f"blocks_{i}"] = {
            "ln": {"scale": a["ln1_w"][i], "bias": a["ln1_b"][i]},
            "attn": {
                "query": {"kernel": heads_in(a["W_Q"][i]), "bias": a["b_Q"][i].reshape(-1)},
                "key": {"kernel": heads_in(a["W_K"][i]).T.copy(), "bias": a["b_K"][i].reshape(-1)},
                "value": {"kernel": a["W_V"][i].transpose(1, 0, 2).copy()},  # linen MHA: [D, H, E]
                "out": {"kernel": a["W_O"][i].reshape(-1, SPEC.d_model), "bias": a["b_O"][i]},
            },
        }
    return {"params": params}


def write_foreign(directory, steps, tree_of=lambda s: foreign_tree(canonical(s))):
    with ocp.CheckpointManager(directory) as manager:
        for step in steps:
            manager.save(step, args=ocp.args.StandardSave(tree_of(step)))  # a bare save: item "default"
        manager.wait_until_finished()
    return directory


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    mapping = root / "mapping.yaml"
    mapping.write_text(yaml.safe_dump(MAPPING))
    return write_foreign(root / "linen-run", STEPS), mapping


def test_scan_through_a_mapping_gives_the_canonical_scores(foreign, tmp_path):
    directory, mapping = foreign
    store = tmp_path / "s.sqlite"
    summary = scan(ScanOptions(source=str(directory), store=str(store), mapping=str(mapping), probe=PROBE, progress=False))
    assert summary.scanned == len(STEPS) and summary.failed == 0
    expected = score_all(stack_weights([canonical(s) for s in STEPS]), make_probes(SPEC, PROBE))
    with ResultStore.open(store, readonly=True) as results:
        for metric in ("prefix_matching", "ov_copying"):
            steps, grid = results.head_score_grid("linen-run", metric)
            assert list(steps) == STEPS
            np.testing.assert_allclose(grid, np.asarray(expected.head[metric]), rtol=1e-6, atol=1e-6, err_msg=metric)
        assert all(r.tokens_seen is None for r in results.steps("linen-run"))


def test_mapped_load_equals_the_canonical_weights(foreign):
    directory, mapping = foreign
    source = OrbaxSource.open(directory, mapping=mapping)
    try:
        assert source.spec() == SPEC
        loaded = source.load(5)
        for name, want in canonical(5).arrays().items():
            np.testing.assert_array_equal(getattr(loaded.weights, name), np.asarray(want), err_msg=name)
    finally:
        source.close()


def test_shipped_linen_example_parses_and_fits_a_matching_checkpoint(tmp_path):
    example = REPO / "docs" / "mappings" / "linen_gpt.yaml"
    full = load_mapping(example)
    assert full.spec.n_layers == 12 and set(full.tensors) == set(expected_shapes(full.spec))
    # Flax defaults: nn.gelu is approximate=True (tanh, i.e. gelu_new); nn.LayerNorm's epsilon is 1e-6
    assert full.spec.activation == "gelu_new" and full.spec.norm_eps == 1e-6
    data = yaml.safe_load(example.read_text())
    small = ModelSpec(**{**SPEC.to_dict(), "d_mlp": 24, "activation": data["spec"]["activation"]})
    data["spec"] = small.to_dict()
    mapping = parse_mapping(data, file=str(example))
    w = init_random_weights(small, 3)
    a = {k: np.asarray(v) for k, v in w.arrays().items()}
    a["W_U"] = a["W_E"].T.copy()  # tied
    a["b_U"] = np.zeros_like(a["b_U"])
    params = {"embed": {"embedding": a["W_E"]}, "pos_embed": {"embedding": a["W_pos"]}, "ln_f": {"scale": a["ln_final_w"], "bias": a["ln_final_b"]}}
    for i in range(small.n_layers):
        attn = {n: {"kernel": heads_in(a[f"W_{c}"][i]), "bias": a[f"b_{c}"][i].reshape(-1)} for n, c in (("query", "Q"), ("key", "K"), ("value", "V"))}
        attn["out"] = {"kernel": a["W_O"][i].reshape(-1, small.d_model), "bias": a["b_O"][i]}
        params[f"blocks_{i}"] = {
            "ln_1": {"scale": a["ln1_w"][i], "bias": a["ln1_b"][i]},
            "ln_2": {"scale": a["ln2_w"][i], "bias": a["ln2_b"][i]},
            "attn": attn,
            "mlp": {"fc": {"kernel": a["W_in"][i], "bias": a["b_in"][i]}, "proj": {"kernel": a["W_out"][i], "bias": a["b_out"][i]}},
        }
    directory = tmp_path / "gpt"
    with ocp.CheckpointManager(directory, item_names=("params",)) as manager:
        manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    source = OrbaxSource.open(directory, mapping=mapping)
    try:
        assert source.spec() == small
        loaded = source.load(7).weights
        for name, want in a.items():
            np.testing.assert_allclose(getattr(loaded, name), want, rtol=0, atol=0, err_msg=name)
    finally:
        source.close()


def test_a_wrong_path_names_the_path_step_and_file(foreign, tmp_path):
    directory, _ = foreign
    bad = dict(MAPPING, tensors={**MAPPING["tensors"], "W_Q": {"path": "params/blocks_{layer}/attn/qry/kernel", "split_heads": "in"}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    source = OrbaxSource.open(directory, mapping=path)
    with pytest.raises(MappingError) as err:
        source.spec()
    message = str(err.value)
    assert "params/blocks_0/attn/qry/kernel" in message and str(path) in message and "step 0" in message
    with pytest.raises(MappingError, match="qry"):
        source.load(9)
    source.close()


def test_a_wrong_shape_names_the_tensor_and_both_shapes(foreign, tmp_path):
    directory, _ = foreign
    bad = dict(MAPPING, tensors={**MAPPING["tensors"], "W_U": {"path": "params/unembed/kernel", "transpose": True}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(MappingError) as err:
        OrbaxSource.open(directory, mapping=path).spec()
    message = str(err.value)
    assert "W_U" in message and "(40, 16)" in message and "(16, 40)" in message and str(path) in message


def test_malformed_mappings_are_refused():
    with pytest.raises(MappingError, match="W_X"):
        parse_mapping(dict(MAPPING, tensors={**MAPPING["tensors"], "W_X": "a/b"}))
    missing = {k: v for k, v in MAPPING["tensors"].items() if k != "W_O"}
    with pytest.raises(MappingError, match="W_O"):
        parse_mapping(dict(MAPPING, tensors=missing))
    with pytest.raises(MappingError, match="W_in"):  # attention-only spec has no MLP
        parse_mapping(dict(MAPPING, tensors={**MAPPING["tensors"], "W_in": "a"}))
    with pytest.raises(MappingError, match="split_heads"):
        parse_mapping(dict(MAPPING, tensors={**MAPPING["tensors"], "W_Q": {"path": "a", "split_heads": "sideways"}}))


def test_cli_takes_a_mapping(foreign, tmp_path):
    from jaxinduct.cli import main as cli_main

    directory, mapping = foreign
    store = tmp_path / "c.sqlite"
    args = ["scan", str(directory), "--store", str(store), "--mapping", str(mapping), "--no-progress", "--steps", "9"]
    assert cli_main([*args, "--examples", "2", "--block-len", "9", "--repeats", "4"]) == 0
    with ResultStore.open(store, readonly=True) as results:
        steps, _ = results.head_score_grid("linen-run", "prefix_matching")
    assert list(steps) == [9]


# --- the mapping is part of the results' identity ----------------------------------------------


def _with(tensors=None, **top):
    """MAPPING with some tensor rules (and top-level keys) replaced; a deep copy."""
    data = copy.deepcopy(MAPPING)
    data["tensors"].update(copy.deepcopy(tensors or {}))
    data.update(copy.deepcopy(top))
    return data


def _grids(store, probe_hash=None):
    with ResultStore.open(store, readonly=True) as results:
        return {m: results.head_score_grid("linen-run", m, probe_hash=probe_hash) for m in ("prefix_matching", "ov_copying")}


def test_a_corrected_mapping_is_scanned_again(foreign, tmp_path):
    directory, good = foreign
    # Forgot W_K's transpose: the kernel is [H*E, D] = [16, 16], so every shape still fits.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(_with({"W_K": {"path": "params/blocks_{layer}/attn/key/kernel", "split_heads": "in"}})))
    store = tmp_path / "s.sqlite"

    def scan_with(mapping, into):
        return scan(ScanOptions(source=str(directory), store=str(into), mapping=str(mapping), probe=PROBE, progress=False))

    first = scan_with(wrong, store)
    assert first.scanned == len(STEPS) and first.failed == 0
    fixed = scan_with(good, store)
    assert fixed.scanned == len(STEPS) and fixed.already_done == 0 and fixed.probe_hash != first.probe_hash
    fresh = scan_with(good, tmp_path / "fresh.sqlite")
    assert fresh.probe_hash == fixed.probe_hash

    expected = score_all(stack_weights([canonical(s) for s in STEPS]), make_probes(SPEC, PROBE))
    latest, reference, stale = _grids(store), _grids(tmp_path / "fresh.sqlite"), _grids(store, first.probe_hash)
    for metric, (steps, grid) in latest.items():
        assert list(steps) == STEPS == list(reference[metric][0])
        np.testing.assert_array_equal(grid, reference[metric][1], err_msg=metric)
        np.testing.assert_allclose(grid, np.asarray(expected.head[metric]), rtol=1e-6, atol=1e-6, err_msg=metric)
    assert not np.allclose(stale["prefix_matching"][1], latest["prefix_matching"][1])  # the wrong mapping did matter

    # The same rules written differently (comments, key order, block style) are the same mapping.
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text("# reformatted\n" + yaml.safe_dump(MAPPING, sort_keys=False, default_flow_style=False, indent=4))
    again = scan_with(reformatted, store)
    assert again.scanned == 0 and again.already_done == len(STEPS) and again.probe_hash == fixed.probe_hash


def test_without_a_mapping_the_results_identity_is_unchanged():
    probes = make_probes(SPEC, PROBE)
    # The identity JSON as it was before mappings entered it (existing stores keep their hashes).
    before = json.dumps(
        {
            "probes": dataclasses.asdict(probes.config),
            "probe_hash": probes.config_hash(),
            "scores": "all",
            "scores_version": SCORES_VERSION,
        },
        sort_keys=True,
    )
    assert probe_identity(probes, None) == (hashlib.sha256(before.encode()).hexdigest()[:16], before)
    assert probe_identity(probes, None, None) == probe_identity(probes, None)
    digest = parse_mapping(MAPPING).digest()
    mapped_hash, mapped_json = probe_identity(probes, None, digest)
    assert json.loads(mapped_json) == {**json.loads(before), "mapping": digest}
    assert mapped_hash != probe_identity(probes, None)[0]


# --- layouts -------------------------------------------------------------------------------------


def test_per_layer_paths_stacked_on_a_layer_axis(tmp_path):
    """nn.scan-style leaves [n_layers, ...] (no {layer} in the path), saved bare without a
    'params' wrapper: item 'default', paths without a 'params/' prefix."""

    def stacked_tree(step):
        params = foreign_tree(canonical(step))["params"]
        blocks = [params.pop(f"blocks_{i}") for i in range(SPEC.n_layers)]
        params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *blocks)
        return params

    directory = write_foreign(tmp_path / "scanned", [4], tree_of=stacked_tree)
    tensors = {}
    for name, rule in MAPPING["tensors"].items():
        if isinstance(rule, str):
            rule = {"path": rule}
        if "path" in rule:
            rule = dict(rule, path=rule["path"].removeprefix("params/").replace("blocks_{layer}", "layers"))
        tensors[name] = rule
    mapping = parse_mapping(_with(tensors))
    assert all(r.path.startswith("layers/") for r in mapping.tensors.values() if r.per_layer and not r.zeros)
    source = OrbaxSource.open(directory, mapping=mapping)
    try:
        assert source.spec() == SPEC
        loaded = source.load(4).weights
        for name, want in canonical(4).arrays().items():
            np.testing.assert_array_equal(getattr(loaded, name), np.asarray(want), err_msg=name)
    finally:
        source.close()


def test_a_wrong_item_names_the_items_the_step_has(foreign, tmp_path):
    directory, _ = foreign
    path = tmp_path / "item.yaml"
    path.write_text(yaml.safe_dump(_with(item="params")))
    source = OrbaxSource.open(directory, mapping=path)
    try:
        with pytest.raises(SourceError) as err:
            source.spec()
    finally:
        source.close()
    message = str(err.value)
    assert "'params'" in message and "['default']" in message and str(path) in message and "step 0" in message


# --- malformed mappings ---------------------------------------------------------------------------


def test_unknown_keys_are_refused():
    with pytest.raises(MappingError, match=r"unknown keys \['tensor'\]"):
        parse_mapping(dict(_with(), tensor={}), file="m.yaml")
    with pytest.raises(MappingError, match=r"W_U: unknown keys \['tranpose'\]"):
        parse_mapping(_with({"W_U": {"path": "params/unembed/kernel", "tranpose": True}}), file="m.yaml")
    with pytest.raises(MappingError, match=r"m.yaml: bad spec: unknown ModelSpec fields \['d_modle'\]"):
        parse_mapping(_with(spec={**SPEC.to_dict(), "d_modle": 16}), file="m.yaml")


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        ({"zeros": True, "path": "params/unembed/bias"}, r"b_U: 'zeros: true' takes no path or transforms; remove \['path'\]"),
        ({"zeros": True, "split_heads": "bias"}, r"takes no path or transforms; remove \['split_heads'\]"),
        ({"zeros": "yes"}, r"b_U: 'zeros' must be the boolean true, got 'yes'"),
        ({"zeros": 1}, "'zeros' must be the boolean true, got 1"),
        ({"zeros": False, "path": "params/unembed/bias"}, "'zeros' must be the boolean true, got False"),
    ],
)
def test_zeros_must_be_true_alone(rule, match):
    with pytest.raises(MappingError, match=match):
        parse_mapping(_with({"b_U": rule}), file="m.yaml")


@pytest.mark.parametrize("name", ["W_E", "W_Q", "W_U", "ln1_w", "ln_final_w"])
def test_zeros_is_only_for_biases(name):
    with pytest.raises(MappingError, match=rf"m.yaml: tensor {name}: 'zeros: true' is only for biases"):
        parse_mapping(_with({name: {"zeros": True}}), file="m.yaml")


def test_a_bias_free_layernorm_may_map_its_bias_to_zeros():
    mapping = parse_mapping(_with({"ln1_b": {"zeros": True}, "ln_final_b": {"zeros": True}}))
    w = apply_mapping(mapping, foreign_tree(canonical(2)))
    np.testing.assert_array_equal(w.ln1_b, np.zeros((SPEC.n_layers, SPEC.d_model)))
    np.testing.assert_array_equal(w.ln_final_b, np.zeros(SPEC.d_model))
    np.testing.assert_array_equal(w.ln1_w, np.asarray(canonical(2).ln1_w))


@pytest.mark.parametrize("transpose", [[], [True, False], [1.0, 0.0], [0, 0], [1, 2], "yes", 1, False, None, {"0": 1}])
def test_transpose_must_be_true_or_a_permutation(transpose):
    with pytest.raises(MappingError, match=r"m.yaml: tensor W_U: 'transpose' must be true .* or a permutation"):
        parse_mapping(_with({"W_U": {"path": "params/unembed/kernel", "transpose": transpose}}), file="m.yaml")


def test_transpose_true_needs_a_2d_tensor():
    # the foreign value kernel is [D, H, E] (3-D): it needs [1, 0, 2], not true
    mapping = parse_mapping(_with({"W_V": {"path": "params/blocks_{layer}/attn/value/kernel", "transpose": True}}), file="m.yaml")
    with pytest.raises(MappingError, match=r"m.yaml: tensor W_V .*'transpose: true' needs a 2-D tensor, got shape \(16, 2, 8\)"):
        apply_mapping(mapping, foreign_tree(canonical(0)), where="step 0")


def test_unreadable_or_invalid_files_are_refused(tmp_path):
    with pytest.raises(MappingError, match=r"missing.yaml cannot be read"):
        load_mapping(tmp_path / "missing.yaml")
    with pytest.raises(MappingError, match="cannot be read"):
        load_mapping(tmp_path)  # a directory
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: {d_vocab: 40\ntensors: [\n")
    with pytest.raises(MappingError, match="broken.yaml is not valid YAML"):
        load_mapping(broken)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00spec")
    with pytest.raises(MappingError, match="binary.yaml"):
        load_mapping(binary)


def _yaml_with(tmp_path, extra_tensor_lines="", spec_lines=""):
    """MAPPING as YAML text in block style, with lines appended to the spec and tensors sections."""
    text = yaml.safe_dump(MAPPING, sort_keys=False, default_flow_style=False)
    text = text.replace("spec:\n", "spec:\n" + spec_lines, 1).replace("tensors:\n", "tensors:\n" + extra_tensor_lines, 1)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(MappingError, match=r"(?s)m.yaml is not valid YAML.*duplicate key 'W_Q'.*m.yaml\", line"):
        load_mapping(_yaml_with(tmp_path, "  W_Q: params/blocks_{layer}/attn/key/kernel\n"))
    with pytest.raises(MappingError, match="duplicate key 'd_model'"):
        load_mapping(_yaml_with(tmp_path, spec_lines="  d_model: 32\n"))
    path = _yaml_with(tmp_path)
    rule = "  W_E: params/embed/embedding\n"
    assert rule in path.read_text()
    path.write_text(path.read_text().replace(rule, "  W_E: {path: params/embed/embedding, path: params/pos_embed/embedding}\n"))
    with pytest.raises(MappingError, match="duplicate key 'path'"):
        load_mapping(path)
    text = yaml.safe_dump(MAPPING) + "item: default\n"
    (tmp_path / "top.yaml").write_text(text)
    with pytest.raises(MappingError, match="duplicate key 'item'"):
        load_mapping(tmp_path / "top.yaml")
    assert load_mapping(_yaml_with(tmp_path)).tensors == parse_mapping(MAPPING).tensors  # the unedited text loads


def test_float_spec_fields_may_be_written_as_pyyaml_reads_them(tmp_path):
    assert yaml.safe_load("x: 1e-6")["x"] == "1e-6"  # YAML 1.1: no dot, so not a float
    spec = {k: v for k, v in SPEC.to_dict().items() if k != "norm_eps"}
    for text, want in (("1e-6", 1e-6), ("1.0e-6", 1e-6), ("'2e-5'", 2e-5), ("1", 1.0)):
        data = _with(spec=spec)
        path = tmp_path / "f.yaml"
        path.write_text(yaml.safe_dump(data).replace("spec:\n", f"spec:\n  norm_eps: {text}\n", 1))
        assert load_mapping(path).spec.norm_eps == want, text
    with pytest.raises(MappingError, match=r"spec.norm_eps must be a number, got 'small'; write e.g. 1.0e-6"):
        parse_mapping(_with(spec={**spec, "norm_eps": "small"}), file="m.yaml")


# --- errors against a checkpoint ----------------------------------------------------------------


def test_per_layer_leaves_of_different_shapes_name_the_layer():
    tree = foreign_tree(canonical(0))
    tree["params"]["blocks_1"]["attn"]["query"]["kernel"] = np.zeros((16, 8), np.float32)
    with pytest.raises(MappingError) as err:
        apply_mapping(parse_mapping(MAPPING, file="m.yaml"), tree, where="step 0")
    message = str(err.value)
    assert "W_Q" in message and "layer 1" in message and "params/blocks_1/attn/query/kernel" in message
    assert "(16, 8)" in message and "(16, 16)" in message and "None" not in message


def _stacked_mapping():
    tensors = {"W_Q": {"path": "params/stacked_query", "split_heads": "in"}}
    return parse_mapping(_with(tensors), file="m.yaml")


@pytest.mark.parametrize(("leaf", "found"), [(np.float32(0), "is a scalar"), (np.zeros((3, 16, 16), np.float32), "first axis is 3")])
def test_a_bad_stacked_leaf_says_what_it_is(leaf, found):
    tree = foreign_tree(canonical(0))
    tree["params"]["stacked_query"] = leaf
    with pytest.raises(MappingError) as err:
        apply_mapping(_stacked_mapping(), tree)
    message = str(err.value)
    assert "W_Q" in message and "params/stacked_query" in message and found in message and "n_layers=2" in message
    assert "None" not in message


def test_a_path_not_found_suggests_close_matches():
    tree = foreign_tree(canonical(0))
    no_prefix = parse_mapping(_with({"W_E": "embed/embedding"}), file="m.yaml")
    with pytest.raises(MappingError, match=r"'embed/embedding' not found.*'params/embed/embedding'"):
        apply_mapping(no_prefix, tree)
    typo = parse_mapping(_with({"W_Q": {"path": "params/blocks_{layer}/attn/qurey/kernel", "split_heads": "in"}}), file="m.yaml")
    with pytest.raises(MappingError) as err:
        apply_mapping(typo, tree)
    assert "'params/blocks_0/attn/query/kernel'" in str(err.value)
    # layer 0 is there but the spec wants more layers than the checkpoint has
    three = ModelSpec(**{**SPEC.to_dict(), "n_layers": 3})
    with pytest.raises(MappingError, match=r"'params/blocks_2/ln/scale' not found.*fewer than n_layers=3"):
        apply_mapping(parse_mapping(_with(spec=three.to_dict()), file="m.yaml"), tree)
