"""The probe identity record: the exact text and hash earlier versions stored, and its parsing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxinduct.results.identity import ProbeIdentity, VerdictThresholds, identity_record, parse_identity

# A fixed input, and the (hash, text) that jaxinduct.engine.scan.probe_identity produced for it
# before the record moved here (computed once with that function; stores hold these hashes).
CONFIG = {
    "n_examples": 4, "block_len": 5, "n_repeats": 2, "seed": 7, "token_range": (3, 40),
    "pool_exclude_frequent": 0.05, "pool_exclude_rare": 0.05, "icl_late": 20, "icl_early": 4, "ablation": False,
    "thresholds": {"prefix_matching": 0.45, "copying": 0.3, "ov_copying": 0.5, "induction_qk": 0.5, "previous_token": 0.2},
}  # fmt: skip
CONFIG_HASH = "0123456789abcdef"
PROBES_TEXT = (
    '"probes": {"ablation": false, "block_len": 5, "icl_early": 4, "icl_late": 20, "n_examples": 4, "n_repeats": 2, '
    '"pool_exclude_frequent": 0.05, "pool_exclude_rare": 0.05, "seed": 7, "thresholds": {"copying": 0.3, '
    '"induction_qk": 0.5, "ov_copying": 0.5, "prefix_matching": 0.45, "previous_token": 0.2}, "token_range": [3, 40]}'
)
MAPPED = (
    "3fe9f5bd54e2e127",
    '{"mapping": "feedfacecafebeef", "probe_hash": "0123456789abcdef", '
    + PROBES_TEXT
    + ', "scores": ["copying", "prefix_matching"], "scores_version": 1}',
)
ALL_SCORES = ("c29e084c500ed2c8", '{"probe_hash": "0123456789abcdef", ' + PROBES_TEXT + ', "scores": "all", "scores_version": 1}')


def test_the_record_is_byte_for_byte_what_stores_hold():
    assert identity_record(CONFIG, CONFIG_HASH, ("prefix_matching", "copying"), 1, "feedfacecafebeef") == MAPPED
    assert identity_record(CONFIG, CONFIG_HASH, None, 1) == ALL_SCORES
    assert identity_record(CONFIG, CONFIG_HASH, (), 1, None) == ALL_SCORES  # no names kept: all, as before


def test_a_record_parses_back():
    identity = parse_identity(MAPPED[1])
    assert identity == ProbeIdentity(
        probes=json.loads(MAPPED[1])["probes"],
        thresholds=VerdictThresholds(prefix_matching=0.45),
        config_hash=CONFIG_HASH,
        scores=("copying", "prefix_matching"),
        scores_version=1,
        mapping="feedfacecafebeef",
    )
    everything = parse_identity(ALL_SCORES[1])
    assert everything.scores is None and everything.mapping is None


@pytest.mark.parametrize("text", [None, "", "{}", '{"n_examples": 4}', "[1, 2]", '{"probes": "?"}', '{"probes": {}}'])
def test_old_or_hand_made_records_get_defaults(text):
    identity = parse_identity(text)
    assert identity.thresholds == VerdictThresholds()
    assert (identity.config_hash, identity.scores, identity.scores_version, identity.mapping) == (None, None, None, None)


def test_missing_thresholds_take_their_defaults_one_by_one():
    identity = parse_identity(json.dumps({"probes": {"thresholds": {"copying": 0.25}}}))
    assert identity.thresholds == VerdictThresholds(0.4, 0.25, 0.5, 0.5, 0.2)


def test_the_thresholds_agree_with_the_probe_config():
    from jaxinduct.scores.probes import VerdictThresholds as ProbeThresholds  # imports JAX: only here

    def described(cls: type) -> list[tuple[str, object]]:
        return [(f.name, f.default) for f in dataclasses.fields(cls)]

    assert described(VerdictThresholds) == described(ProbeThresholds)
