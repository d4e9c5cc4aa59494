"""The quickstart really forms induction heads (about 4 minutes on 2 cores: `make test-slow`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinduct.scores.probes import default_token_pool, repeated_random_tokens
from jaxinduct.scores.batched import head_prefix_matching
from jaxinduct.train.trainer import get_preset, train
from jaxinduct.checkpoints import committed_steps, restore_weights

pytestmark = pytest.mark.slow


def test_quickstart_forms_token_matching_induction_heads(tmp_path):
    result = train(get_preset("quickstart"), tmp_path / "run", progress=False)
    steps = committed_steps(result.out)
    assert len(steps) >= 40
    first, _ = restore_weights(result.out, steps[0])
    last, _ = restore_weights(result.out, steps[-1])
    spec = last.spec
    pool = default_token_pool(spec)
    standard = jnp.asarray(repeated_random_tokens(pool, n_examples=16, bos_token_id=spec.bos_token_id, seed=0))
    # A different block length: a head that learned "attend 24 back" would fail here.
    other = jnp.asarray(repeated_random_tokens(pool, n_examples=16, block_len=17, bos_token_id=spec.bos_token_id, seed=1))
    before = np.asarray(head_prefix_matching(first, standard))[1:]
    after = np.asarray(head_prefix_matching(last, standard))[1:]
    after_other = np.asarray(head_prefix_matching(last, other))[1:]
    formed = (before < 0.15) & (after > 0.6) & (after_other > 0.6)
    assert formed.any(), f"before {before}, after {after}, after (R=17) {after_other}"


def test_quickstart_end_to_end_reports_the_phase_change_where_the_heads_form(tmp_path, capsys):
    from jaxinduct.results.phase import PHASE_METRICS
    from jaxinduct.quickstart import REPORT, STORE, quickstart
    from jaxinduct.results.store import ResultStore

    assert quickstart(tmp_path, progress=False) == 0
    printed = capsys.readouterr().out
    index = tmp_path / REPORT / "index.html"
    assert str(index.resolve()) in printed
    assert (tmp_path / REPORT / "quickstart" / "phase_change.png").is_file()
    with ResultStore.open(tmp_path / STORE, readonly=True) as store:
        steps, grid = store.head_score_grid("quickstart", "prefix_matching")
        phase = {str(m): float(v) for m, v in zip(*(store.model_scores("quickstart")[k] for k in ("metric", "value")))
                 if m in PHASE_METRICS}  # fmt: skip
    strongest = np.nanmax(grid.reshape(len(steps), -1), axis=1)
    first_above = int(steps[np.argmax(strongest > 0.5)])
    assert strongest.max() > 0.5
    assert phase["phase_change_start"] <= first_above <= phase["phase_change_end"], (phase, first_above)
    assert f"phase_change_start step {int(phase['phase_change_start'])}" in printed
