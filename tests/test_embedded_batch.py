"""Batch and sequential editing on the embedded model (slow)."""

import pytest
import torch

from conftest import COUNTERFACT, STATS
from factedit import GuardConfig
from factedit.app.edit import efficacy
from factedit.core.request_files import load_requests

pytestmark = pytest.mark.slow
OFF = GuardConfig(enabled=False)  # the guard is tested on its own (test_embedded_patch.py, test_guard.py)


@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_batch_of_20_counterfact_records(embedded, method):
    """One batch edit of 20 records reaches efficacy >= 0.9 from below 0.5. Twenty requests is a real
    batch for the solver (a rank-20 update per layer over the 5-layer span, 20 keys against C), and
    the 0.9 bar leaves room for at most 2 failures; larger batches are measured in
    bench/bench_batch.py. The targets are optimised once for both methods (memoised per weights)."""
    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=20)
    assert efficacy(ed.adapter, reqs) < 0.5  # the small model knows some of these facts already
    ed.edit(reqs, method=method, guard=OFF, **STATS)
    try:
        assert efficacy(ed.adapter, reqs) >= 0.9
    finally:
        ed.revert()


def test_alphaedit_24_edits_in_6_sequential_batches_keep_the_first(embedded):
    """Retention under sequential AlphaEdit: 24 edits applied as 6 successive batches of 4, each
    update projected away from the keys of all earlier batches (the key memory grows with every
    batch). At least 80% take hold right after their batch, the first batch's edits that took hold
    still hold after the 5 later batches, and 80% of all that took hold still hold; reverting all
    clears the key memory. Six batches are enough for the property: the first batch's keys must
    survive five projected updates, each of which would overwrite them without the projection; the
    80% bars are the same as with the 50 edits of earlier versions."""
    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=24, offset=100)
    batches = [reqs[i:i + 4] for i in range(0, 24, 4)]
    took = []
    try:
        for batch in batches:
            ed.edit(batch, method="alphaedit", guard=OFF, **STATS)
            took.append([r for r in batch if efficacy(ed.adapter, [r]) == 1.0])
        n_took = sum(len(t) for t in took)
        assert n_took >= 0.8 * 24, f"only {n_took} of 24 AlphaEdit edits took hold"
        assert took[0], "no edit of the first batch took hold"
        assert efficacy(ed.adapter, took[0]) == 1.0  # the first batch, after 5 more batches
        assert efficacy(ed.adapter, [r for t in took for r in t]) >= 0.8
    finally:
        ed.revert(len(ed.history))
    assert "alphaedit" not in ed.state


def test_ultraedit_50_sequential_edits_revert_bit_exactly_and_reload_as_a_stack(embedded, tmp_path):
    """Issue 32: 50 sequential UltraEdit edits (one request each, the normaliser carried across them), then
    ``revert(50)``: the weights are bit-identical to the unedited model's and the method state is gone. The
    same 50 saved as a patch stack and loaded into the unedited model give the same weights and the same
    running statistics, bit for bit. Most of the edits take (the bar is loose: the method's efficacy is
    measured by the runs of docs/RESULTS.md, not here)."""
    from factedit import Editor

    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=50, offset=300)
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    try:
        for r in reqs:
            ed.edit(r, method="ultraedit", guard=OFF, verify=False, stats_corpus=STATS["stats_corpus"])
        took = efficacy(ed.adapter, reqs)
        assert took >= 0.6, f"only {took:.0%} of 50 UltraEdit edits hold after all 50"
        state = {k: v.clone() for k, v in ed.state["ultraedit"].items()}
        edited = {k: v.clone() for k, v in ed.model.state_dict().items()}
        ed.save_history(tmp_path / "stack")
    finally:
        ed.revert(len(ed.history))
    assert "ultraedit" not in ed.state
    assert all(torch.equal(before[k], v) for k, v in ed.model.state_dict().items())
    other = Editor(ed.model, ed.tokenizer, progress=False)  # the same (unedited) model, a fresh history
    try:
        assert other.load_history(tmp_path / "stack") == 50
        assert all(torch.equal(edited[k], v) for k, v in other.model.state_dict().items())
        assert state.keys() == other.state["ultraedit"].keys()
        assert all(torch.equal(state[k], other.state["ultraedit"][k]) for k in state)
    finally:
        other.revert(len(other.history))
    assert all(torch.equal(before[k], v) for k, v in ed.model.state_dict().items())


def test_rls_a_second_batch_refits_and_keeps_the_first(embedded):
    """RLS (issue 32): two sequential batches of 6 CounterFact records. The second batch refits every edit so
    far against the original weights, so the first batch still holds after it; reverting both restores the
    original weights bit for bit and clears the memory. (Two batches are enough for the property: the second
    refit must keep the first batch's asks; more batches cost a target optimisation each.)"""
    import torch

    ed = embedded
    reqs = load_requests(COUNTERFACT, limit=12, offset=200)
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    try:
        for i in range(0, 12, 6):
            ed.edit(reqs[i:i + 6], method="rls", guard=OFF, **STATS)
        assert efficacy(ed.adapter, reqs) >= 0.8
        assert efficacy(ed.adapter, reqs[:6]) >= 0.8  # the first batch, after the second
    finally:
        ed.revert(len(ed.history))
    assert "rls" not in ed.state
    assert all(torch.equal(before[k], v) for k, v in ed.model.state_dict().items())
