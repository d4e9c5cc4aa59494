"""The probe identity record: what a results store keeps about how its scores were made.

Every scan records one JSON text per probe hash (``probe_configs`` table): the probe
configuration, the probes' own config hash (which covers the dataset's content), which
scores were kept, the scores' version and, for a source read through a mapping, the
mapping's digest. Its hash is the probe hash that keys every score row, so the text must
stay byte-for-byte what earlier versions wrote: a store's existing hashes must keep
matching a rescan with the same probes.

``identity_record`` builds the (hash, JSON) pair; ``parse_identity`` reads a stored text
back into a typed ``ProbeIdentity``, with defaults for whatever an old or hand-made
record lacks. Pure Python (no JAX): readers of a store use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

ALL_SCORES = "all"  # the record's "scores" value when every score was kept


@dataclasses.dataclass(frozen=True)
class VerdictThresholds:
    """When a head counts as an induction head (docs/scores.md, "Verdicts"). Strict: score > threshold.

    Part of the probe configuration (`jaxinduct.scores.probes.ProbeConfig.thresholds`) and
    of its recorded identity; defined here, without JAX, so that readers of a store share it.
    """

    # Each default sits several times above what a randomly initialised head scores
    # (docs/scores.md, "Baselines"): prefix_matching ~0.03, |copying| < 0.2,
    # |ov_copying|, |induction_qk_positivity| < 0.3, previous_token ~0.04-0.06.
    prefix_matching: float = 0.4
    """behaviour: a head attends to the token after earlier copies of its token (prefix_matching) ..."""
    copying: float = 0.3
    """... and raises the logits of what it attends to (copying)"""
    ov_copying: float = 0.5
    """mechanism: a copying OV circuit (ov_copying) ..."""
    induction_qk: float = 0.5
    """... a positive induction QK term (induction_qk_positivity, per head) ..."""
    previous_token: float = 0.2
    """... and a head of an earlier layer scoring this previous_token"""


@dataclasses.dataclass(frozen=True)
class ProbeIdentity:
    """A stored probe identity, parsed; fields an older record lacks hold their defaults."""

    probes: Mapping[str, Any]  # the probe configuration as recorded (ProbeConfig's fields)
    thresholds: VerdictThresholds  # probes["thresholds"], typed
    config_hash: str | None  # the probes' config hash (config plus dataset content)
    scores: tuple[str, ...] | None  # the scores kept, sorted; None: all of them
    scores_version: int | None
    mapping: str | None  # digest of the checkpoint mapping the source was read through


def identity_record(
    probe_config: Mapping[str, Any],
    config_hash: str,
    scores: Sequence[str] | None,
    scores_version: int,
    mapping_digest: str | None = None,
) -> tuple[str, str]:
    """(probe hash, JSON text) identifying a scan's results.

    probe_config: the probe configuration as a dict (``dataclasses.asdict(ProbeConfig)``);
    scores: the score names kept, or None (or empty) for all of them.
    """
    record: dict[str, Any] = {
        "probes": dict(probe_config),
        "probe_hash": config_hash,
        "scores": sorted(scores) if scores else ALL_SCORES,
        "scores_version": scores_version,
    }
    if mapping_digest is not None:  # absent without a mapping: unmapped hashes stay as they were
        record["mapping"] = mapping_digest
    text = json.dumps(record, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


def parse_identity(text: str | None) -> ProbeIdentity:
    """The record of a stored JSON text (None: no record); defaults for what it lacks.

    Tolerant on purpose: a store written by an older jaxinduct, or by hand in a test, may
    hold any JSON there, and a reader should still show the run with default thresholds.
    """
    recorded = json.loads(text) if text else {}
    if not isinstance(recorded, dict):
        recorded = {}
    probes = recorded.get("probes")
    probes = probes if isinstance(probes, dict) else {}
    found = probes.get("thresholds")
    found = found if isinstance(found, dict) else {}
    defaults = VerdictThresholds()
    thresholds = VerdictThresholds(
        **{f.name: float(found.get(f.name, getattr(defaults, f.name))) for f in dataclasses.fields(VerdictThresholds)}
    )
    scores = recorded.get("scores")
    return ProbeIdentity(
        probes=probes,
        thresholds=thresholds,
        config_hash=recorded.get("probe_hash"),
        scores=tuple(scores) if isinstance(scores, list) else None,
        scores_version=recorded.get("scores_version"),
        mapping=recorded.get("mapping"),
    )
