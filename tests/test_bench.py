"""`jaxinduct bench` on a tiny shape: every figure present, consistent and from a real run."""

import json

from jaxinduct.cli import main as cli_main
from jaxinduct.scores import registry

TINY = ["--layers", "2", "--heads", "2", "--d-model", "32", "--d-mlp", "64", "--vocab", "128", "--examples", "2",
        "--runs", "1"]  # fmt: skip


def test_bench_reports_every_part_and_the_engine_as_json(tmp_path, capsys):
    assert cli_main(["bench", *TINY, "--trajectory", "2", "--dir", str(tmp_path / "trajectory"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shape"]["n_layers"] == 2 and report["shape"]["d_vocab"] == 128
    assert report["matmul_peak_flops_per_second"] > 1e6 and report["memory_bandwidth_bytes_per_second"] > 1e6
    parts = {p["name"]: p for p in report["parts"]}
    # Without a dataset the ablation family computes nothing and is left out; verdicts are derived.
    assert set(parts) == {"empirical", "mechanistic", "losses", "whole program"}
    whole = parts["whole program"]
    assert set(whole["scores"]) == set(registry.names())
    for part in parts.values():
        assert part["seconds_per_checkpoint"] > 0 and part["flops_per_checkpoint"] > 0 and part["bytes_per_checkpoint"] > 0
        assert abs(part["checkpoints_per_second"] * part["seconds_per_checkpoint"] - 1) < 1e-9
    # The whole program does at least what its costliest part does (parts share intermediates).
    assert whole["flops_per_checkpoint"] >= max(p["flops_per_checkpoint"] for p in parts.values()) * 0.999
    assert parts["mechanistic"]["eigenproblems_per_checkpoint"] > 0 and parts["empirical"]["eigenproblems_per_checkpoint"] == 0
    engine = report["engine"]
    assert engine["checkpoints"] >= 2 * report["batch"]  # a compiling batch and a steady one
    assert engine["scan_seconds"] > 0 and engine["bare_load_seconds"] > 0
    assert abs(engine["overhead"] - engine["scan_seconds"] / max(engine["bare_load_seconds"], engine["kernels_seconds"])) < 1e-9
    assert (tmp_path / "trajectory").is_dir()  # --dir keeps the synthetic trajectory


def test_bench_tables_and_a_clear_error_for_an_unknown_shape(capsys):
    assert cli_main(["bench", *TINY, "--no-engine", "--no-parts"]) == 0
    out = capsys.readouterr().out
    assert "matmul peak" in out and "whole program" in out and "engine" not in out.split("whole program")[1]
    assert cli_main(["bench", "--shape", "pythia-7b"]) == 2
    assert "known shapes are pythia-70m" in capsys.readouterr().err
