"""The trainer: a real Orbax trajectory, resumable after a kill, and clear errors."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxinduct.cli import main
from jaxinduct.errors import ConfigError, CorpusError, RunDirError
from jaxinduct.train import ScheduleConfig, checkpoint_steps, get_preset, train
from jaxinduct.trajectory import RUN_FILE, restore_weights

TINY_STEPS = [0, 1, 2, 4, 8, 16, 24, 40]  # tiny: 40 steps, dense every 8 until 24, then every 16


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_checkpoint_schedule_is_dense_early_and_sparse_late():
    assert checkpoint_steps(40, ScheduleConfig(dense_every=8, dense_until=24, sparse_every=16)) == TINY_STEPS
    steps = checkpoint_steps(1200, ScheduleConfig(dense_every=20, dense_until=800, sparse_every=100))
    assert steps[:7] == [0, 1, 2, 4, 8, 16, 20]
    assert steps[-5:] == [800, 900, 1000, 1100, 1200]
    assert len(steps) == 6 + 40 + 4  # powers of two, every 20 below 800, every 100 from 800
    assert checkpoint_steps(3, ScheduleConfig(dense_every=20, dense_until=800, sparse_every=100)) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return train(get_preset("tiny"), out, progress=False)


def test_trainer_writes_a_plain_orbax_trajectory(tiny_run):
    out = tiny_run.out
    assert tiny_run.steps_saved == TINY_STEPS
    # Readable by plain orbax-checkpoint, with no jaxinduct code involved.
    assert ocp.CheckpointManager(out).all_steps() == TINY_STEPS
    assert not [name for name in listing(out) if "tmp" in name.lower()]
    assert (out / RUN_FILE).exists()


def test_steps_record_tokens_seen_and_training_happened(tiny_run):
    w0, meta0 = restore_weights(tiny_run.out, 0)
    w40, meta40 = restore_weights(tiny_run.out, 40)
    _, meta8 = restore_weights(tiny_run.out, 8)
    _, meta1 = restore_weights(tiny_run.out, 1)
    assert meta0["tokens_seen"] == 0 and meta0["loss"] is None
    assert meta8["tokens_seen"] == 8 * 8 * 32  # step * batch * context
    assert meta40["spec"] == get_preset("tiny").model.to_dict()
    # 40 tiny steps learn little more than the unigram statistics, but the loss does fall.
    assert meta40["loss"] < meta1["loss"] - 0.01
    assert not np.allclose(np.asarray(w0.W_Q), np.asarray(w40.W_Q))


def test_rerunning_a_finished_run_changes_nothing(tiny_run):
    before = listing(tiny_run.out)
    again = train(get_preset("tiny"), tiny_run.out, progress=False)
    assert again.resumed_from == 40 and again.steps_saved == TINY_STEPS
    assert listing(tiny_run.out) == before


def test_a_different_run_in_the_same_directory_is_refused_untouched(tiny_run):
    import dataclasses

    before = listing(tiny_run.out)
    other = dataclasses.replace(get_preset("tiny"), seed=1)
    with pytest.raises(RunDirError, match=r"already holds a different run .*differs in \['seed'\]"):
        train(other, tiny_run.out, progress=False)
    assert listing(tiny_run.out) == before


def test_a_directory_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and holds no jaxinduct run"):
        train(get_preset("tiny"), tmp_path, progress=False)
    assert listing(tmp_path) == ["notes.txt"]
    with pytest.raises(RunDirError, match="is a file"):
        train(get_preset("tiny"), tmp_path / "notes.txt", progress=False)


def test_unknown_preset_and_missing_or_empty_corpus(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'; choose one of: quickstart, "):
        get_preset("gpt5")
    with pytest.raises(ConfigError, match="pass --corpus"):
        train(get_preset("text"), tmp_path / "out", progress=False)
    import dataclasses

    config = get_preset("tiny")
    missing = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=str(tmp_path / "none.txt")))
    with pytest.raises(CorpusError, match="does not exist"):
        train(missing, tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("")
    empty = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=str(tmp_path / "empty.txt")))
    with pytest.raises(CorpusError, match="is empty"):
        train(empty, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error: unknown preset 'nope'" in err and "Traceback" not in err
    assert main(["train", "--preset", "tiny", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
    assert "corpus" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["train", "--list-presets"]) == 0
    assert "quickstart" in capsys.readouterr().out


def test_byte_level_training_on_a_text_file(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Mr and Mrs Dursley, of number four, Privet Drive, were proud to say. " * 10)
    code = main(["train", "--preset", "tiny", "--corpus", str(corpus), "--steps", "8", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    weights, meta = restore_weights(tmp_path / "run", 8)
    assert weights.spec.d_vocab == 257 and weights.spec.bos_token_id == 256
    assert meta["tokens_seen"] == 8 * 8 * 32
    assert "committed checkpoints" in capsys.readouterr().out


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL mid-run, rerun the same command: the result equals an uninterrupted run."""
    steps = "120"
    command = [sys.executable, "-m", "jaxinduct", "train", "--preset", "tiny", "--steps", steps, "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        # Kill once a few steps are committed but before the end (the schedule saves 24, 40, ..., 104, 120).
        while not (killed / "16" / "commit_success.txt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "training never committed step 16"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    committed = ocp.CheckpointManager(killed).all_steps()
    assert 16 in committed and 120 not in committed

    resumed = subprocess.run([*command, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after committed step" in resumed.stdout
    assert not [name for name in listing(killed) if "tmp" in name.lower()]

    import dataclasses

    reference = train(dataclasses.replace(get_preset("tiny"), steps=int(steps)), tmp_path / "clean", progress=False)
    assert ocp.CheckpointManager(killed).all_steps() == reference.steps_saved
    for step in (reference.steps_saved[-1], 56):
        a, _ = restore_weights(killed, step)
        b, _ = restore_weights(tmp_path / "clean", step)
        for name, arr in a.arrays().items():
            np.testing.assert_array_equal(np.asarray(arr), np.asarray(getattr(b, name)), err_msg=f"{name} at step {step}")
