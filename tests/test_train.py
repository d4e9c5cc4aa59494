"""The trainer: a real Orbax trajectory, resumable after a kill, and clear errors."""

import dataclasses
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
from jaxinduct.train.trainer import PRESETS, ScheduleConfig, checkpoint_steps, get_preset, train
from jaxinduct.checkpoints import restore_weights
from jaxinduct.checkpoints.layout import RUN_FILE, committed_steps, writer_lock

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


def test_cli_says_when_a_run_was_already_complete(tiny_run, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tiny_run.out), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already complete; nothing was trained" in out and "final training loss" in out


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
    steps = 200  # after step 16 there are 13 more saves (~0.3 s each): ample time to kill mid-run
    command = [sys.executable, "-m", "jaxinduct", "train", "--preset", "tiny", "--steps", str(steps), "--no-progress"]
    killed = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        try:
            while not (killed / "16" / "commit_success.txt").exists():
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "training never committed step 16"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    committed = committed_steps(killed)
    assert 16 in committed and steps not in committed

    resumed = subprocess.run([*command, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after committed step" in resumed.stdout
    assert not [name for name in listing(killed) if "tmp" in name.lower()]

    reference = train(dataclasses.replace(get_preset("tiny"), steps=steps), tmp_path / "clean", progress=False)
    assert committed_steps(killed) == reference.steps_saved
    for step in (steps, 56):
        a, _ = restore_weights(killed, step)
        b, _ = restore_weights(tmp_path / "clean", step)
        for name, arr in a.arrays().items():
            np.testing.assert_array_equal(np.asarray(arr), np.asarray(getattr(b, name)), err_msg=f"{name} at step {step}")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_trains(name, tmp_path):
    """A few steps of each shipped preset, fewer than its warm-up (a regression: that crashed)."""
    config = dataclasses.replace(get_preset(name), steps=3, batch_size=2)
    if name == "text":
        (tmp_path / "corpus.txt").write_text("It was a bright cold day in April, and the clocks were striking. " * 8)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=str(tmp_path / "corpus.txt")))
    result = train(config, tmp_path / "run", progress=False)
    assert result.steps_saved == [0, 1, 2, 3]
    assert np.isfinite(result.final_loss)


def test_a_run_that_committed_nothing_can_be_replaced(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # What a crash before the first commit leaves: a run file (of another config) and nothing else.
    (out / RUN_FILE).write_text('{"config_hash": "0123", "config": {"preset": "quickstart"}}')
    result = train(get_preset("tiny"), out, progress=False)
    assert result.steps_saved == TINY_STEPS


def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with writer_lock(out):
        with pytest.raises(RunDirError, match="another process is writing"):
            train(get_preset("tiny"), out, progress=False)


def test_moving_the_corpus_does_not_make_a_different_run(tmp_path):
    first = tmp_path / "a" / "corpus.txt"
    first.parent.mkdir()
    first.write_text("the cat sat on the mat and the dog sat on the log. " * 10)
    config = dataclasses.replace(get_preset("tiny"), steps=4)
    with_corpus = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=str(first)))
    train(with_corpus, tmp_path / "run", progress=False)
    moved = tmp_path / "b" / "renamed.txt"
    moved.parent.mkdir()
    first.rename(moved)
    again = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=str(moved)))
    assert train(again, tmp_path / "run", progress=False).resumed_from == 4
    moved.write_text("different text entirely, so a different run. " * 10)
    with pytest.raises(RunDirError, match="different run"):
        train(again, tmp_path / "run", progress=False)


def test_out_inside_the_corpus_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("some notes to learn from. " * 20)
    config = get_preset("tiny")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus=str(tmp_path)))
    with pytest.raises(RunDirError, match="inside the corpus folder"):
        train(config, tmp_path / "run", progress=False)


def test_restore_takes_relative_paths_and_never_creates_directories(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_run.out.parent)
    weights, meta = restore_weights(tiny_run.out.name, 8)
    assert meta["step"] == 8 and weights.spec == get_preset("tiny").model
    with pytest.raises(RunDirError, match="does not exist"):
        restore_weights(tmp_path / "nothing" / "here", 3)
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(RunDirError, match=r"has no committed step 9; committed steps: \[0, 1, 2"):
        restore_weights(tiny_run.out, 9)
