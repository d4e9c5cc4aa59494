"""What the readers present of each score comes from the score registry."""

from __future__ import annotations

from jaxinduct.report import headline


def test_the_readers_columns_keep_their_order():
    # `show`'s columns and the report's maps as they were before the registry chose them.
    assert headline.context_columns() == [
        ("prefix_matching", "prefix"), ("copying", "copy"), ("ov_copying", "ov_copy"), ("previous_token", "prev"),
        ("induction_qk_positivity", "qk_pos"),
    ]  # fmt: skip
    assert headline.verdict_columns() == [("induction_behaviour", "behav"), ("induction_mechanism", "mech")]
    assert headline.map_metrics() == [
        ("prefix_matching", (0.0, 1.0)), ("copying", (-1.0, 1.0)), ("ov_copying", (-1.0, 1.0)),
        ("induction_qk_positivity", (-1.0, 1.0)),
    ]  # fmt: skip
    assert headline.model_metrics() == ("icl_score", "induction_loss")


def test_scores_are_named_in_words_and_ablations_found_by_family():
    assert headline.words("ov_copying") == "OV copying"  # a label
    assert headline.words("duplicate_token") == "duplicate token"  # none: the name, spaced
    assert headline.ablation_metrics() == ["ablation_icl_delta", "ablation_icl_delta_pattern_preserving"]
