"""Hugging Face revision trajectories as scan sources, and `convert hf` to Orbax.

Expected scores come from `score_all` on weights read by the importer (whose parity with
transformers is tested in test_hf_import.py), never from the engine under test.
"""

import json
import shutil

import numpy as np
import pytest

from jaxinduct.cli import main as cli_main
from jaxinduct.checkpoints.hf_weights import load_hf_weights
from jaxinduct.scores.probes import ProbeConfig, make_probes
from jaxinduct.scores.batched import score_all
from jaxinduct.checkpoints import HFSource, open_source
from jaxinduct.results.store import ResultStore
from jaxinduct.model.weights import stack_weights
from tests.test_hf_import import gpt2_config, save_model
from tests.test_scan import table_rows

PROBE_ARGS = ["--examples", "2", "--block-len", "9", "--repeats", "4", "--no-progress"]
CONFIG = dict(n_positions=40)


@pytest.fixture(scope="module")
def revisions(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "pythia-like"
    for seed, step in enumerate((0, 512, 1000)):
        save_model(root / f"step{step}", gpt2_config(**CONFIG), seed=seed)
    return root


def test_revision_layouts_and_steps(revisions, tmp_path):
    assert isinstance(open_source(revisions), HFSource) and open_source(revisions).steps() == [0, 512, 1000]
    trainer = tmp_path / "trainer-run"
    for step in (10, 20):
        shutil.copytree(revisions / "step0", trainer / f"checkpoint-{step}")
    shutil.copytree(revisions / "step0", trainer / "revision-final")
    (trainer / "revision-final" / "trainer_state.json").write_text(json.dumps({"global_step": 30}))
    assert open_source(trainer).steps() == [10, 20, 30]
    single = open_source(revisions / "step512")
    assert single.steps() == [512] and single.spec() == open_source(revisions).spec()  # the step from its name


def test_scan_of_hf_revisions_equals_the_kernels_and_convert_gives_an_identical_store(revisions, tmp_path):
    direct = tmp_path / "direct.sqlite"
    assert cli_main(["scan", str(revisions), "--store", str(direct), "--run", "r", *PROBE_ARGS]) == 0
    weights = [load_hf_weights(revisions / f"step{s}") for s in (0, 512, 1000)]
    config = ProbeConfig(n_examples=2, block_len=9, n_repeats=4)
    expected = score_all(stack_weights(weights), make_probes(weights[0].spec, config))
    with ResultStore.open(direct, readonly=True) as store:
        steps, grid = store.head_score_grid("r", "prefix_matching")
        assert list(steps) == [0, 512, 1000]
        np.testing.assert_allclose(grid, np.asarray(expected.head["prefix_matching"]), rtol=1e-6, atol=1e-6)
        _, ov = store.head_score_grid("r", "ov_copying")
        np.testing.assert_allclose(ov, np.asarray(expected.head["ov_copying"]), rtol=1e-6, atol=1e-6)

    orbax_dir = tmp_path / "converted"
    assert cli_main(["convert", "hf", str(revisions), "--out", str(orbax_dir)]) == 0
    assert cli_main(["convert", "hf", str(revisions), "--out", str(orbax_dir)]) == 0  # resumable: nothing new
    converted = tmp_path / "converted.sqlite"
    assert cli_main(["scan", str(orbax_dir), "--store", str(converted), "--run", "r", *PROBE_ARGS]) == 0
    a, b = table_rows(direct), table_rows(converted)
    assert a == b  # identical stores, bit for bit


def test_a_broken_revision_is_recorded_as_failed_and_the_others_are_scanned(revisions, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(revisions, broken)
    (broken / "step512" / "model.safetensors").unlink()
    store = tmp_path / "s.sqlite"
    assert cli_main(["scan", str(broken), "--store", str(store), *PROBE_ARGS]) == 1  # non-zero: a failure
    with ResultStore.open(store, readonly=True) as results:
        status = {r.step: (r.status, r.error) for r in results.steps("broken")}
    assert status[0][0] == status[1000][0] == "done"
    assert status[512][0] == "failed" and "step512" in status[512][1]


def test_convert_refuses_what_is_not_a_hf_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["convert", "hf", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
