"""The wear meter (issue 32) against figures computed here from the weights themselves: the cumulative update
relative to the original matrices, this edit's norm against the median of the earlier ones, AlphaEdit's room
left in the null space, and the wear carried by patches."""

import statistics

import torch

from factedit import Editor, Request
from factedit.edit.guard import GuardConfig
from factedit.edit.wear import cumulative_wear
from tiny import tiny_model

OFF = GuardConfig(enabled=False)
REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        Request("The capital of {} is", "Japan", "Paris", "Tokyo"),
        Request("{} speaks", "Danielle Darrieux", "Italian")]


def _stats(tiny_corpus):
    return dict(stats_corpus=str(tiny_corpus), stats_tokens=800)


def _w(ed, layer):
    return ed.adapter.w_out_stored(layer).detach().double().clone()


def test_relative_wear_and_the_running_median_match_the_weights(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    original = {layer: _w(ed, layer) for layer in (1, 2, 3)}
    norms = {1: [], 2: [], 3: []}
    results = []
    for layers, reqs in (((1, 2), REQS[:1]), ((2,), REQS[1:2]), ((2, 3), REQS[2:]), ((2,), REQS[:1])):
        before = {layer: _w(ed, layer) for layer in layers}
        res = ed.edit(reqs, method="memit", layers=layers, steps=3, guard=OFF, **_stats(tiny_corpus))
        results.append(res)
        assert sorted(res.wear) == [str(layer) for layer in layers]
        for layer in layers:
            got = res.wear[str(layer)]
            now = _w(ed, layer)
            edit_norm = float((now - before[layer]).norm())
            assert abs(got["edit_norm"] - edit_norm) <= 1e-4 * edit_norm  # the exact Δ against its float32 write
            rel = float((now - original[layer]).norm()) / float(original[layer].norm())
            assert abs(got["relative"] - rel) <= 1e-9 + 1e-6 * rel
            median = statistics.median(norms[layer]) if norms[layer] else None
            assert got["edits"] == len(norms[layer]) + 1
            if median is None:
                assert got["median_norm"] is None and got["ratio"] is None
            else:
                assert abs(got["median_norm"] - median) <= 1e-4 * median
                assert abs(got["ratio"] - edit_norm / median) <= 1e-3 * edit_norm / median
            assert got["null_dims"] is None and got["room"] is None  # MEMIT projects nothing
            norms[layer].append(edit_norm)
    # what a long run records at a checkpoint: the cumulative wear of every touched layer
    cum = cumulative_wear(ed.adapter, ed.history)
    assert sorted(cum) == ["1", "2", "3"]
    for layer in (1, 2, 3):
        want = float((_w(ed, layer) - original[layer]).norm()) / float(original[layer].norm())
        assert abs(cum[str(layer)] - want) <= 1e-9 + 1e-6 * want
    # after a revert the history's wear is measured from the same originals
    ed.revert(1)
    assert abs(cumulative_wear(ed.adapter, ed.history)["2"] - results[2].wear["2"]["relative"]) < 1e-9
    ed.revert(len(ed.history))
    assert cumulative_wear(ed.adapter, ed.history) == {}


def test_alphaedit_room_left_is_the_null_space_the_key_memory_leaves(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    # α relative to the tiny model's key energy (the paper's absolute 10 is above every key of it)
    kw = dict(method="alphaedit", layers=(1, 2), steps=3, nullspace_threshold=1e9, alpha_scale=0.02, guard=OFF,
              **_stats(tiny_corpus))
    first = ed.edit(REQS[:2], **kw)
    second = ed.edit(REQS[2:], **kw)
    d_ff = ed.adapter.d_ff
    for res, n_keys in ((first, 2), (second, 3)):
        for layer in ("1", "2"):
            assert res.wear[layer]["null_dims"] == d_ff  # the threshold keeps every direction
            assert 0 < d_ff - res.wear[layer]["room"] <= n_keys  # at most one direction per stored key
    # by hand: eigenvalues of the key memory (P = I here) above α = alpha_scale · tr(C)
    cfg = ed.make_config("alphaedit", layers=(1, 2), nullspace_threshold=1e9, alpha_scale=0.02, **_stats(tiny_corpus))
    for layer in (1, 2):
        C = ed.caches.mom2(layer, **cfg.stats_args).double()
        alpha = cfg.alpha_scale * float(torch.trace(C))
        used = int((torch.linalg.eigvalsh(ed.state["alphaedit"][layer].double()) > alpha).sum())
        assert second.wear[str(layer)]["room"] == d_ff - used


def test_patches_carry_the_wear_and_old_patches_get_it_measured(home, tiny_corpus, tmp_path):
    ed = Editor(*tiny_model("llama"), progress=False)
    ed.edit(REQS[:1], method="memit", layers=(1, 2), steps=3, guard=OFF, **_stats(tiny_corpus))
    ed.edit(REQS[1:2], method="memit", layers=(2,), steps=3, guard=OFF, **_stats(tiny_corpus))
    ed.save_history(tmp_path / "stack")
    ed2 = Editor(*tiny_model("llama"), progress=False)
    ed2.load_history(tmp_path / "stack")
    assert [r.wear for r in ed2.history] == [r.wear for r in ed.history]
    # a patch without the wear (written before the meter) gets it measured as it is applied
    from factedit.patch.files import Patch

    patches = [Patch.from_result(r) for r in ed.history]
    for p in patches:
        p.meta.pop("wear")
    ed3 = Editor(*tiny_model("llama"), progress=False)
    ed3.apply_patches(patches)
    for a, b in zip(ed.history, ed3.history):
        for layer, w in a.wear.items():
            assert abs(b.wear[layer]["relative"] - w["relative"]) < 1e-9
            assert abs(b.wear[layer]["edit_norm"] - w["edit_norm"]) <= 1e-9 * w["edit_norm"]
