"""The configs that are the CLI: every command's --print-config / --config round trip, flags over
a config file, a scan run from a YAML config, `jaxinduct scores`, clear errors for bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jaxinduct.cli import COMMANDS, main
from jaxinduct.engine.scan import ScanConfig
from jaxinduct.parallel import MeshConfig
from jaxinduct.results.store import ResultStore
from jaxinduct.scores import registry
from tests.test_scan import PROBE_ARGS, assert_same_stores, trajectory  # noqa: F401 - a fixture

# The fewest arguments each command needs to resolve a config.
MINIMAL_ARGS = {
    "train": ["--out", "traj"],
    "scan": ["src", "--store", "s.sqlite"],
    "watch": ["src", "--store", "s.sqlite", "--idle-timeout", "5"],
    "show": ["--store", "s.sqlite"],
    "report": ["--store", "s.sqlite", "--out", "r"],
    "export": ["--store", "s.sqlite", "--table", "heads", "--format", "csv", "--out", "h.csv"],
    "convert hf": ["src", "--out", "traj"],
    "scores": [],
    "quickstart": [],
    "bench": ["--shape", "pythia-160m"],
}


def printed_config(capsys, argv) -> str:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_every_command_has_minimal_args_here():
    assert set(MINIMAL_ARGS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(MINIMAL_ARGS))
def test_print_config_reads_back_as_the_same_config(command, tmp_path, capsys):
    argv = command.split()
    text = printed_config(capsys, [*argv, *MINIMAL_ARGS[command]])
    assert isinstance(yaml.safe_load(text), dict)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text)
    assert printed_config(capsys, [*argv, "--config", str(config_file)]) == text


@pytest.mark.parametrize("command", sorted(MINIMAL_ARGS))
def test_every_command_has_help(command, capsys):
    assert main([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config FILE" in out and "--print-config" in out


def test_flags_override_the_config_file(tmp_path, capsys):
    config_file = tmp_path / "scan.yaml"
    config_file.write_text(
        "source: /data/run\nstore: out.sqlite\nbatch: 4\nmesh: ckpt=4,head=2\nscores: [prefix_matching, copying]\n"
        "probe: {n_examples: 2, block_len: 9, thresholds: {copying: 0.25}}\n"
    )
    printed = yaml.safe_load(printed_config(capsys, ["scan", "--config", str(config_file), "--batch", "8", "--repeats", "3"]))
    assert printed["source"] == "/data/run" and printed["store"] == "out.sqlite"
    assert printed["batch"] == 8  # the flag wins
    assert printed["mesh"] == "ckpt=4,head=2"
    assert printed["scores"] == ["prefix_matching", "copying"]
    assert printed["probe"]["n_examples"] == 2 and printed["probe"]["n_repeats"] == 3
    assert printed["probe"]["thresholds"]["copying"] == 0.25
    assert printed["probe"]["thresholds"]["prefix_matching"] == 0.4  # a default left alone


def test_a_config_file_may_leave_out_what_the_command_line_gives(tmp_path, capsys):
    config_file = tmp_path / "partial.yaml"
    config_file.write_text("batch: 4\n")
    printed = yaml.safe_load(printed_config(capsys, ["scan", "src", "--store", "s.sqlite", "--config", str(config_file)]))
    assert (printed["source"], printed["store"], printed["batch"]) == ("src", "s.sqlite", 4)


def test_scan_from_a_config_file_equals_the_same_scan_from_flags(trajectory, tmp_path):  # noqa: F811 - the fixture
    by_flags = tmp_path / "flags.sqlite"
    assert main(["scan", str(trajectory), "--store", str(by_flags), "--steps", "0:20", "--no-progress", *PROBE_ARGS]) == 0
    by_file = tmp_path / "file.sqlite"
    config_file = tmp_path / "scan.yaml"
    config_file.write_text(yaml.safe_dump({
        "source": str(trajectory), "store": str(by_file), "steps": "0:20", "progress": False,
        "probe": {"n_examples": 2, "block_len": 9, "n_repeats": 4},
    }))  # fmt: skip
    assert main(["scan", "--config", str(config_file)]) == 0
    assert_same_stores(by_flags, by_file, tol=0.0)
    with ResultStore.open(by_file, create=False, readonly=True) as store:
        assert sorted(store.done_steps("run-a", store.latest_probe_hash("run-a"))) == [0, 10, 20]


def test_a_config_file_that_is_not_a_mapping_or_missing_is_a_clear_error(tmp_path, capsys):
    config_file = tmp_path / "list.yaml"
    config_file.write_text("- a\n- b\n")
    assert main(["scan", "--config", str(config_file), "--print-config"]) == 2
    assert "expected a mapping" in capsys.readouterr().err
    assert main(["show", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_scores_lists_every_registered_score(capsys):
    assert main(["scores"]) == 0
    out = capsys.readouterr().out
    for score in registry.scores():
        line = next(line for line in out.splitlines() if line.split()[:3] == [score.name, score.kind.value, score.family])
        assert score.meaning[:20] in line


def test_unknown_command_and_bare_convert_are_usage_errors(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["convert"]) == 2
    assert "convert hf" in capsys.readouterr().err
    assert main([]) == 2
    capsys.readouterr()
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in COMMANDS)


def test_scan_config_takes_the_command_line_spellings_from_python():
    config = ScanConfig(source="s", store="t", mesh="ckpt=4,head=2", scores="prefix_matching, copying", per_pass=None)
    assert config.mesh == MeshConfig(ckpt=4, head=2)
    assert config.scores == ("prefix_matching", "copying")
    assert config.per_pass == "all"
    assert ScanConfig(source="s", store="t").mesh == MeshConfig()


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "docs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_resolves(path, capsys):
    command = "scan"  # every shipped config is a scan config (tpu_configs/ will add theirs here)
    resolved = yaml.safe_load(printed_config(capsys, [command, "--config", str(path)]))
    written = yaml.safe_load(path.read_text())
    assert {k: resolved[k] for k in ("source", "store", "steps")} == {k: written[k] for k in ("source", "store", "steps")}


def test_yaml_configs_mean_what_they_say(tmp_path, capsys):
    config_file = tmp_path / "scan.yaml"
    # YAML 1.1 would read 10:20 as the base-60 number 620; a bare number is a step too.
    config_file.write_text("source: a\nstore: b\nsteps: 10:20\n")
    assert yaml.safe_load(printed_config(capsys, ["scan", "--config", str(config_file)]))["steps"] == "10:20"
    config_file.write_text("source: a\nstore: b\nsteps: 100\nprobe: {pool_exclude_rare: 1e-2}\n")
    printed = yaml.safe_load(printed_config(capsys, ["scan", "--config", str(config_file)]))
    assert printed["steps"] == "100" and printed["probe"]["pool_exclude_rare"] == 0.01


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("batchh: 4", "unknown keys ['batchh']"),
        ("mesh: ckpt=x", "--mesh"),
        ("probe: {n_examples: 0}", "n_examples must be a positive integer"),
        ("probe: [unclosed", "not valid YAML at line"),
        ("batch: eight", "batch: expected int, got 'eight'"),
        ("batch: 0", "--batch must be a positive integer"),
        ("per_pass: 0", "--per-pass must be a positive integer, 'auto' or 'all'"),
        ("per_pass: some", "per_pass"),
        ("load_workers: -3", "--load-workers must be a positive integer"),
        ("scores: [nope]", "unknown score names ['nope']"),
        ("progress: maybe", "progress: expected bool"),
        ("probe: {token_range: [1, 2, 3]}", "token_range"),
        ("steps: '1:2:0'", "the stride must be positive"),
    ],
)
def test_config_values_are_checked_when_the_config_is_read(line, message, tmp_path, capsys):
    config_file = tmp_path / "scan.yaml"
    config_file.write_text(f"source: a\nstore: b\n{line}\n")
    assert main(["scan", "--config", str(config_file), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(config_file) in err


def test_train_starts_from_the_preset_it_names(tmp_path, capsys):
    printed = yaml.safe_load(printed_config(capsys, ["train", "--preset", "tiny", "--steps", "7"]))
    assert printed["train"]["preset"] == "tiny" and printed["train"]["steps"] == 7
    assert printed["train"]["batch_size"] == 8 and printed["train"]["model"]["n_ctx"] == 32  # tiny's, not quickstart's
    config_file = tmp_path / "train.yaml"
    config_file.write_text("out: traj\ntrain: {preset: tiny, learning_rate: 0.01}\n")
    printed = yaml.safe_load(printed_config(capsys, ["train", "--config", str(config_file)]))
    assert printed["out"] == "traj" and printed["train"]["learning_rate"] == 0.01 and printed["train"]["steps"] == 40


def test_the_command_line_starts_without_jax():
    # The readers' --help, --print-config and export never load JAX (show loads it with the score
    # registry; scan, train and convert need it to run).
    code = (
        "import sys, contextlib, io\n"
        "from jaxinduct.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0\n"
        "    assert main(['show', '--store', 's', '--print-config']) == 0\n"
        "    assert main(['export', '--store', 's', '--table', 'heads', '--format', 'csv', '--out', 'o', '--print-config']) == 0\n"
        "    assert main(['report', '--help']) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'orbax', 'flax'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
