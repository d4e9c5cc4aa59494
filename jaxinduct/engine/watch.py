"""Following a live run: scan each checkpoint as soon as its save is committed (`jaxinduct watch`)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Annotated

import jax

from jaxinduct.checkpoints.source import open_source
from jaxinduct.engine.scan import ScanConfig, ScanError, ScanSummary, scan
from jaxinduct.flags import NO_PREFIX


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """Poll SOURCE and scan each checkpoint as soon as its save is committed (`watch`)."""

    scan: Annotated[ScanConfig, NO_PREFIX]
    poll: float = 10.0
    """seconds between looks at SOURCE"""
    until_step: int | None = None
    """stop once a step >= N is committed and every committed step is scanned"""
    idle_timeout: float | None = None
    """stop after this many seconds without a new checkpoint"""


def watch(
    options: ScanConfig,
    *,
    poll_seconds: float = WatchConfig.poll,
    until_step: int | None = WatchConfig.until_step,
    idle_timeout: float | None = WatchConfig.idle_timeout,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> ScanSummary:
    """Scan each checkpoint as soon as its save is committed, until a step >= ``until_step``
    is committed and every committed step has been scanned, or nothing new has arrived for
    ``idle_timeout`` seconds.

    Single-process. Orbax finalises a save by renaming its tmp directory, so a step that
    `steps()` lists is complete; steps still being written are never seen. A checkpoint
    that fails is recorded and reported once and not retried while watch runs (a committed
    checkpoint that cannot be read stays so); a later `scan` retries it.
    """
    if until_step is None and idle_timeout is None:
        raise ScanError("watch needs --until-step N or --idle-timeout SECONDS (or both), so that it ends")
    if jax.process_count() > 1:
        raise ScanError("watch runs in one process; use scan under jax.distributed")
    total = ScanSummary(options.run or "", "")
    last_new = time.monotonic()
    listed: list[int] = []  # the committed steps at the last scan
    failed: set[int] = set()
    waiting_logged = False
    while True:
        source = open_source(options.source, allow_empty=True, mapping=options.mapping)
        try:
            steps = source.steps()
        finally:
            source.close()
        if steps and steps != listed:  # something new: scan what is neither done nor failed
            listed = steps
            summary = scan(dataclasses.replace(options, progress=False), skip_steps=failed)
            total.run, total.probe_hash, total.selected = summary.run, summary.probe_hash, summary.selected
            for step, error in summary.failures:
                log(f"watch: step {step} failed: {error}")
            failed.update(step for step, _ in summary.failures)
            if summary.scanned or summary.failed:
                last_new = time.monotonic()
                total.scanned += summary.scanned
                total.failed += summary.failed
                total.failures += summary.failures
                log(f"watch: scanned {summary.scanned} new checkpoint(s), {summary.failed} failed (latest step {steps[-1]})")
        elif not steps and not waiting_logged:
            log(f"watch: waiting for the first checkpoint in {options.source}")
            waiting_logged = True
        if until_step is not None and listed and listed[-1] >= until_step:
            log(f"watch: step {listed[-1]} >= {until_step} is committed and every committed step is scanned; stopping")
            return total
        if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
            log(f"watch: no new checkpoint for {idle_timeout:g} s; stopping")
            return total
        time.sleep(poll_seconds)
