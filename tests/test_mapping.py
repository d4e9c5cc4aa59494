"""Declarative mappings (jaxinduct.mapping): someone else's Orbax params tree, scanned via a YAML.

The foreign checkpoints are built by hand from canonical random weights by the inverse
of the mapping's transforms; expected scores come from `score_all` on the canonical weights.
"""

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxinduct.mapping import MappingError, load_mapping, parse_mapping
from jaxinduct.probes import ProbeConfig, make_probes
from jaxinduct.scan import ScanOptions, scan
from jaxinduct.scores.batched import score_all
from jaxinduct.sources import OrbaxSource
from jaxinduct.store import ResultStore
from jaxinduct.weights import ModelSpec, expected_shapes, init_random_weights, stack_weights

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
    from jaxinduct.weights import make_weights

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
