"""The memory planner: the largest batch that fits, a clear refusal of one that cannot, and
the engine scanning with the batch it planned (budgets patched, so the test does not depend
on this machine's RAM). Expected byte counts are worked out by hand from the stated sizes."""

from __future__ import annotations

import types

import numpy as np
import pytest

from jaxinduct.engine import memory
from jaxinduct.engine.memory import GIB, MemoryBudget, MemoryPlanError, ProgramMemory, host_bytes, plan_batch
from jaxinduct.engine.scan import ScanConfig, scan
from jaxinduct.results.store import ResultStore

from tests.test_scan import STEPS, PROBE, assert_same_stores, write_trajectory


def fake_program(arguments: int, outputs: int, temporaries: int):
    stats = types.SimpleNamespace(argument_size_in_bytes=arguments, output_size_in_bytes=outputs, temp_size_in_bytes=temporaries)
    return types.SimpleNamespace(compiled=types.SimpleNamespace(memory_analysis=lambda: stats), from_disk=False)


CKPT = GIB  # one checkpoint as stored


def cpu_programs(asked: list):
    """A CPU program per batch b (one device): arguments b GiB, outputs 0, temporaries 2 GiB."""

    def compile_for(batch, per_pass):
        asked.append((batch, per_pass))
        return fake_program(batch * CKPT, 0, 2 * GIB)

    return compile_for


def test_host_bytes_counts_restores_prefetch_copies_and_the_program():
    program = ProgramMemory(arguments=4 * GIB, outputs=0, temporaries=2 * GIB)
    # 4 rows stacked on a device: restored (4) + next restores (4) + the stacked copy (4) = 12 GiB,
    # which outweighs the program's temporaries (2) on top of the placed rows.
    assert host_bytes(4, CKPT, program, devices=1, stacked=True) == 12 * GIB
    # One row per device is placed without a copy: restored (1) + next (1) + temporaries (2).
    one = ProgramMemory(arguments=CKPT, outputs=0, temporaries=2 * GIB)
    assert host_bytes(1, CKPT, one, devices=1, stacked=False) == 4 * GIB
    assert host_bytes(1, CKPT, one, devices=1, stacked=False, ahead=False) == 3 * GIB  # no next restore held
    assert host_bytes(4, CKPT, None, devices=1, stacked=True) == 12 * GIB  # accelerator: host side only
    assert host_bytes(4, CKPT, None, devices=4, stacked=False) == 8 * GIB


def test_the_largest_batch_that_fits_is_chosen_and_a_given_one_that_cannot_is_refused():
    asked: list = []
    budget = MemoryBudget(host_bytes=9 * GIB, device_bytes=None, described="9.0 GiB of RAM")
    settings = dict(step=1, per_pass=1, per_pass_given=False, checkpoint_bytes=CKPT, rows_for=lambda b: b,
                    budget=budget, local_devices=1)  # fmt: skip
    # Batch b > 1 peaks at 2b + max(b, 2) GiB: 8 -> 24, ..., 4 -> 12, 3 -> 9 (fits 9).
    plan = plan_batch(cpu_programs(asked), batch=8, batch_given=False, **settings)
    assert plan.batch == 3 and plan.host_bytes == 9 * GIB
    assert asked == [(b, 1) for b in (8, 7, 6, 5, 4, 3)]
    with pytest.raises(MemoryPlanError, match=r"batch 4 .* needs about 12\.0 GiB on the host.*smaller --batch"):
        plan_batch(cpu_programs([]), batch=4, batch_given=True, **settings)
    with pytest.raises(MemoryPlanError, match="no batch fits 1.0 GiB"):  # batch 1 needs 2 + 2 GiB
        tiny = MemoryBudget(host_bytes=GIB, device_bytes=None, described="1.0 GiB of RAM")
        plan_batch(cpu_programs([]), batch=2, batch_given=False, **{**settings, "budget": tiny})


def test_on_an_accelerator_one_checkpoint_per_pass_is_tried_before_a_smaller_batch():
    asked: list = []

    def compile_for(batch, per_pass):
        asked.append((batch, per_pass))
        temporaries = batch * 3 * GIB if per_pass is None else 3 * GIB  # all at once: a working set per row
        return fake_program(batch * CKPT, 0, temporaries)

    budget = MemoryBudget(host_bytes=100 * GIB, device_bytes=20 * GIB, described="20.0 GiB free per device")
    plan = plan_batch(compile_for, batch=8, batch_given=False, step=1, per_pass=None, per_pass_given=False,
                      checkpoint_bytes=CKPT, rows_for=lambda b: b, budget=budget, local_devices=1)  # fmt: skip
    # Batch 8: all at once 8 + 24 = 32 GiB; one per pass 8 + 3 = 11 GiB fits.
    assert (plan.batch, plan.per_pass, plan.device_bytes) == (8, 1, 11 * GIB)
    assert asked == [(8, None), (8, 1)]


@pytest.fixture(scope="module")
def small_trajectory(tmp_path_factory):
    return write_trajectory(tmp_path_factory.mktemp("memory") / "run-a", STEPS[:5])


def options(source, store, **overrides) -> ScanConfig:
    base = dict(source=str(source), store=str(store), probe=PROBE, progress=False, compilation_cache="off")
    return ScanConfig(**{**base, **overrides})


def test_the_engine_scans_with_the_batch_it_planned_and_equals_a_roomy_scan(small_trajectory, tmp_path, monkeypatch):
    # 4 devices on the ckpt axis (the 2 heads on the other 2): batches of 8 or 4.
    roomy = scan(options(small_trajectory, tmp_path / "roomy.sqlite", mesh="head=2"))
    assert roomy.memory_plan is not None and roomy.memory_plan.batch == 8
    assert roomy.memory is not None and roomy.memory.startswith("batch 8 ")
    # One byte less than batch 8 needs: the planner must take batch 4, which needs less.
    budget = roomy.memory_plan.host_bytes - 1
    monkeypatch.setattr(memory, "available_ram", lambda: int(budget / memory.HEADROOM) + 1)
    tight = scan(options(small_trajectory, tmp_path / "tight.sqlite", mesh="head=2"))
    assert tight.memory_plan.batch == 4 and tight.memory_plan.host_bytes <= budget and tight.scanned == 5
    assert_same_stores(tmp_path / "roomy.sqlite", tmp_path / "tight.sqlite")


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_stored(small_trajectory, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_ram", lambda: 1024)
    store = tmp_path / "s.sqlite"
    with pytest.raises(MemoryPlanError, match=r"no batch fits .*batch 8 .*needs about .*free memory"):
        scan(options(small_trajectory, store))
    with pytest.raises(MemoryPlanError, match=r"batch 4 .*smaller --batch"):
        scan(options(small_trajectory, store, batch=4, mesh="head=2"))
    with ResultStore.open(store, readonly=True) as results:
        assert results.runs() == [] and results.steps("run-a", "x") == []
    from jaxinduct.cli import main

    assert main(["scan", str(small_trajectory), "--store", str(store), "--batch", "4", "--no-progress",
                 "--compilation-cache", "off", "--mesh", "head=2", *["--examples", "2", "--block-len", "9", "--repeats", "4"]]) == 2  # fmt: skip
    assert "--batch" in capsys.readouterr().err
