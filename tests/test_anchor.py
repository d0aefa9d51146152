"""Norm anchoring (NAS, issue 32) of the MEMIT family: the rescaling and the skip rule against the formula written
out here, the trimmed mean, and the anchor carried in the method state (computed once, kept, reverted)."""

import pytest
import torch

from factedit import Editor, Request
from factedit.core.errors import MethodError
from factedit.edit.anchor import ANCHOR_KEY, anchored_targets, trimmed_mean
from factedit.edit.guard import GuardConfig
from factedit.edit.methods import method_spec
from tiny import tiny_model

OFF = GuardConfig(enabled=False)
REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
        Request("The capital of {} is", "Japan", "Paris", "Tokyo"),
        Request("{} speaks", "Danielle Darrieux", "Italian")]


def test_targets_are_rescaled_to_the_anchor_and_outliers_dropped():
    torch.manual_seed(0)
    z0, v0, delta = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8) * 2
    delta[0] *= 10  # an outlier
    z_star = z0 + delta
    v = v0 + delta
    m = float(v.norm(dim=1).median())
    got, skipped, norms = anchored_targets(z_star, z0, v0, m, skip=1.5)
    for i in range(6):
        n = float(v[i].norm())
        assert norms[i].item() == pytest.approx(n)
        if n > 1.5 * m:  # dropped: the target is the residual as it is
            assert skipped[i] and torch.allclose(got[i].float(), z0[i], atol=1e-6)
        else:  # v* rescaled to norm m, same direction; the rest of the residual untouched
            assert not skipped[i]
            want = z0[i] - v0[i] + v[i] * (m / n)
            assert torch.allclose(got[i].float(), want, atol=1e-5)
            assert float((got[i] - z0[i].double() + v0[i].double()).norm()) == pytest.approx(m)
    assert skipped.any() and not skipped.all()


def test_trimmed_mean_drops_the_top_five_percent():
    assert trimmed_mean(range(1, 21)) == pytest.approx(sum(range(1, 20)) / 19)  # floor(0.05 · 20) = 1 dropped
    assert trimmed_mean([3.0] * 10 + [100.0] * 9) == pytest.approx(sum([3.0] * 10 + [100.0] * 9) / 19)  # none
    with pytest.raises(ValueError):
        trimmed_mean([])


def _kw(tiny_corpus, **extra):
    return dict(layers=(1, 2), steps=3, norm_anchor=True, norm_anchor_samples=10, guard=OFF,
                stats_corpus=str(tiny_corpus), stats_tokens=800, **extra)


def test_the_anchor_is_calibrated_once_kept_in_the_state_and_reverted(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    first = ed.edit(REQS[:2], method="memit", **_kw(tiny_corpus))
    m = float(ed.state["memit"][ANCHOR_KEY][0])
    assert m > 0 and ANCHOR_KEY in first.state_updates[0]
    assert all(x["anchor"]["anchor"] == m for x in first.info)
    second = ed.edit(REQS[2:], method="memit", **_kw(tiny_corpus))
    assert not second.state_updates  # the anchor of the first edit is used, not calibrated again
    assert all(x["anchor"]["anchor"] == m for x in second.info)
    ed.revert(1)
    assert float(ed.state["memit"][ANCHOR_KEY][0]) == m
    ed.revert(1)
    assert "memit" not in ed.state
    # AlphaEdit keeps its key memory beside the anchor
    ed.edit(REQS[:2], method="alphaedit", nullspace_threshold=1e9, **_kw(tiny_corpus))
    assert ANCHOR_KEY in ed.state["alphaedit"] and {1, 2} <= set(ed.state["alphaedit"])
    ed.revert(1)


def test_targets_far_above_the_anchor_are_not_written(home, tiny_corpus):
    ed = Editor(*tiny_model("llama"), progress=False)
    cfg = ed.make_config("memit", layers=(1, 2), steps=3, norm_anchor=True, stats_corpus=str(tiny_corpus),
                         stats_tokens=800)
    spec = method_spec("memit")
    tiny_anchor = {ANCHOR_KEY: torch.tensor([1e-6], dtype=torch.float64)}
    got = spec.compute(ed.adapter, ed.caches, REQS, cfg, tiny_anchor)
    assert all(x["anchor"]["skipped"] for x in got.info)
    # every target is its own residual, so what is left of each update is the drift of the current residual
    # between layers, far below the update of the unanchored edit
    plain = spec.compute(ed.adapter, ed.caches, REQS, ed.make_config("memit", layers=(1, 2), steps=3,
                                                                       stats_corpus=str(tiny_corpus),
                                                                       stats_tokens=800), None)
    norm = lambda c: sum(float(d.dense().norm()) for d in c.deltas)  # noqa: E731
    assert norm(got) < 1e-3 * norm(plain)


def test_bad_anchor_options_are_refused(home):
    ed = Editor(*tiny_model("llama"), progress=False)
    for bad in ({"norm_anchor_samples": 3}, {"norm_anchor_skip": 1.0}, {"norm_anchor_quantile": 0}):
        with pytest.raises(MethodError, match="norm anchoring"):
            ed.make_config("emmet", **bad)


def test_the_calibration_is_kept_on_disk_for_a_new_process(home, tiny_corpus, monkeypatch):
    """The first anchored edit of a model calibrates (100 target optimisations by default: minutes on a CPU);
    a new Editor of the same weights and settings reads the anchor from $FACTEDIT_HOME/anchors instead, and a
    damaged file there is calibrated again and replaced."""
    import factedit.edit.methods.batch as B

    calls = []
    real = B.anchor_norm
    monkeypatch.setattr(B, "anchor_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    first = Editor(*tiny_model("llama"), progress=False)
    first.edit(REQS[:2], method="memit", **_kw(tiny_corpus))
    m = float(first.state["memit"][ANCHOR_KEY][0])
    files = list((home / "anchors").glob("*.json"))
    assert calls == [1] and len(files) == 1

    second = Editor(*tiny_model("llama"), progress=False)
    second.edit(REQS[:2], method="memit", **_kw(tiny_corpus))
    assert calls == [1] and float(second.state["memit"][ANCHOR_KEY][0]) == m
    for a, b in zip(first.history[-1].deltas, second.history[-1].deltas):
        assert torch.equal(a.dense(), b.dense())

    other = Editor(*tiny_model("llama"), progress=False)  # other settings: their own calibration
    other.edit(REQS[:2], method="memit", **_kw(tiny_corpus, norm_anchor_quantile=0.9))
    assert calls == [1, 1] and len(list((home / "anchors").glob("*.json"))) == 2

    files[0].write_text("{not json")
    third = Editor(*tiny_model("llama"), progress=False)
    third.edit(REQS[:2], method="memit", **_kw(tiny_corpus))
    assert calls == [1, 1, 1] and float(third.state["memit"][ANCHOR_KEY][0]) == m
    assert '"m"' in files[0].read_text()
