"""The history of an Editor: what ``History`` owns (push, pop, take), what a saved and reloaded stack keeps
(every field of every edit), and the method state (AlphaEdit's key memory) carried through both."""

import dataclasses

import pytest
import torch

from factedit import Editor, Request
from factedit.edit.guard import GuardConfig
from factedit.edit.history import History
from factedit.edit.results import EditResult
from factedit.edit.values import ValueConfig
from tiny import tiny_model

OFF = GuardConfig(enabled=False)
REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        Request("The capital of {} is", "Japan", "Paris", "Tokyo"),
        Request("{} speaks", "Danielle Darrieux", "Italian")]


def _stats(tiny_corpus, **kw):
    return dict(stats_corpus=str(tiny_corpus), stats_tokens=800, **kw)


def _edits(ed, tiny_corpus):
    """A ROME edit of two requests (one result standing for two edits), a MEMIT batch and two AlphaEdit
    batches (stateful), one after another."""
    ed.edit(REQS[:2], method="r-rome", layer=2, value=ValueConfig(steps=3), guard=GuardConfig(), **_stats(tiny_corpus))
    ed.edit(REQS, method="memit", layers=(1, 2), steps=3, guard=OFF, **_stats(tiny_corpus))
    for reqs in (REQS[:2], REQS[2:]):
        ed.edit(reqs, method="alphaedit", layers=(1, 2), steps=3, nullspace_threshold=1e9, guard=OFF,
                **_stats(tiny_corpus))


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_a_saved_stack_reloads_every_field_of_every_edit(home, tiny_corpus, tmp_path):
    ed = Editor(*tiny_model("llama"), progress=False)
    _edits(ed, tiny_corpus)
    assert [r.method for r in ed.history] == ["r-rome", "memit", "alphaedit", "alphaedit"]
    assert len(ed.history[0].requests) == 2 and ed.history[0].guard is not None  # one result for two edits
    ed.save_history(tmp_path / "stack")
    ed2 = Editor(*tiny_model("llama"), progress=False)
    assert ed2.load_history(tmp_path / "stack") == 4
    fields = [f.name for f in dataclasses.fields(EditResult) if f.name != "applied"]
    assert {"config", "rounding", "state_updates", "info", "timings", "side_effects"} <= set(fields)
    for a, b in zip(ed.history, ed2.history):
        for name in fields:
            x, y = getattr(a, name), getattr(b, name)
            if name == "deltas":
                assert [(d.layer, d.rank) for d in x] == [(d.layer, d.rank) for d in y]
                for d, e in zip(x, y):
                    assert torch.equal(d.left, e.left) and (d.right is None) == (e.right is None)
                    assert d.right is None or torch.equal(d.right, e.right)
            elif name == "state_updates":
                assert len(x) == len(y) and all(_same_tensors(u, v) for u, v in zip(x, y))
            else:
                assert x == y, (a.method, name, x, y)
        assert type(b.config) is type(a.config)  # the config object, not its JSON
    assert ed.history[0].rounding and ed.history[2].state_updates  # the fields that were lost before
    # the reloaded editor carries the same AlphaEdit key memory, bit for bit, and reverts it edit by edit
    assert _same_tensors(ed.state["alphaedit"], ed2.state["alphaedit"])
    ed.revert(1), ed2.revert(1)
    assert _same_tensors(ed.state["alphaedit"], ed2.state["alphaedit"])
    ed2.revert(3)
    assert ed2.history == () and "alphaedit" not in ed2.state
    fresh = Editor(*tiny_model("llama"), progress=False)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(ed2.model.state_dict()[k], v), k


def test_history_push_pop_and_take_restore_the_method_state(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    _edits(ed, tiny_corpus)
    h = ed._history
    first, second = h.results[2], h.results[3]
    memory = {k: v.clone() for k, v in ed.state["alphaedit"].items()}  # both batches folded in
    weights = ed.adapter.w_out_stored(1).clone()
    taken = h.take()  # the weights stay as they are
    assert taken is second and len(h) == 3 and torch.equal(ed.adapter.w_out_stored(1), weights)
    # the state as if the newest batch had never been folded in: replayed from the base over the first batch
    after_first = {k: K @ K.T for k, K in first.state_updates[0].items()}
    assert _same_tensors(ed.state["alphaedit"], after_first)
    h.push(taken)  # folded in again: the same sums in the same order, bit for bit
    assert _same_tensors(ed.state["alphaedit"], memory)
    with pytest.raises(AttributeError):
        ed.history.append(first)  # read-only: only History changes it
    popped = h.pop()  # undone: weights and state
    assert popped is second and _same_tensors(ed.state["alphaedit"], after_first)
    assert not torch.equal(ed.adapter.w_out_stored(1), weights)

def test_merged_results_stand_for_their_parts(home, tiny_corpus):
    """A call that edits several requests one after another is one entry: one revert undoes them all."""
    ed = Editor(*tiny_model("llama"), progress=False)
    w0 = ed.adapter.w_out_stored(2).clone()
    r = ed.edit(REQS[:2], method="r-rome", layer=2, value=ValueConfig(steps=3), guard=OFF, **_stats(tiny_corpus))
    assert ed.history == (r,) and len(r.deltas) == 2 and len(r.verification) == 2
    ed.revert()
    assert torch.equal(ed.adapter.w_out_stored(2), w0) and ed.history == ()
    h = History()
    with pytest.raises(ValueError, match="cannot merge 2 edits"):
        h.merge_last(2, r)
