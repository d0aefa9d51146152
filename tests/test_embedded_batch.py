"""Batch and sequential editing on the embedded model (slow)."""

import pytest

from conftest import CORPUS, COUNTERFACT
from factedit.cli import _efficacy
from factedit.requests_io import load_requests

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_batch_of_50_counterfact_records(embedded, method):
    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=50)
    assert _efficacy(ed.adapter, reqs) < 0.5  # the small model knows some of these facts already
    ed.edit(reqs, method=method, stats_corpus=str(CORPUS))
    try:
        assert _efficacy(ed.adapter, reqs) >= 0.9
    finally:
        ed.revert()


def test_alphaedit_50_sequential_edits_keep_the_first(embedded):
    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=50, offset=100)
    try:
        for i, r in enumerate(reqs):
            ed.edit([r], method="alphaedit", stats_corpus=str(CORPUS))
            if i == 0:
                assert _efficacy(ed.adapter, reqs[:1]) == 1.0
        assert _efficacy(ed.adapter, reqs[:1]) == 1.0
        assert _efficacy(ed.adapter, reqs) >= 0.8
    finally:
        ed.revert(len(ed.history))
    assert "alphaedit" not in ed.state
