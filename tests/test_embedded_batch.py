"""Batch and sequential editing on the embedded model (slow)."""

import pytest

from conftest import CORPUS, COUNTERFACT
from factedit.cli.edit import efficacy
from factedit.core.request_files import load_requests

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_batch_of_50_counterfact_records(embedded, method):
    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=50)
    assert efficacy(ed.adapter, reqs) < 0.5  # the small model knows some of these facts already
    ed.edit(reqs, method=method, stats_corpus=str(CORPUS))
    try:
        assert efficacy(ed.adapter, reqs) >= 0.9
    finally:
        ed.revert()


def test_alphaedit_50_edits_in_10_sequential_batches_keep_the_first(embedded):
    """Retention under sequential AlphaEdit: 50 edits applied as 10 successive batches of 5, each
    update projected away from the keys of all earlier batches. At least 40 of the 50 take hold right
    after their batch, the first batch's edits that took hold still hold after all 10 batches, and
    80% of all that took hold still hold; reverting all clears the key memory. (Batches of 5 rather
    than 50 single edits: the same accumulated-key projection, with a quarter of the target
    optimisation time.)"""
    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=50, offset=100)
    batches = [reqs[i:i + 5] for i in range(0, 50, 5)]
    took = []
    try:
        for batch in batches:
            ed.edit(batch, method="alphaedit", stats_corpus=str(CORPUS))
            took.append([r for r in batch if efficacy(ed.adapter, [r]) == 1.0])
        n_took = sum(len(t) for t in took)
        assert n_took >= 40, f"only {n_took} of 50 AlphaEdit edits took hold"
        assert took[0], "no edit of the first batch took hold"
        assert efficacy(ed.adapter, took[0]) == 1.0  # the first batch, after 9 more batches
        assert efficacy(ed.adapter, [r for t in took for r in t]) >= 0.8
    finally:
        ed.revert(len(ed.history))
    assert "alphaedit" not in ed.state
