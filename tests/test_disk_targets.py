"""The batch methods' optimised targets kept on disk (``EditCaches.disk_targets``, issue 36: a batch of 10,000
requests optimises for hours and must not lose them to an interruption): read back by a new process bit for bit,
only the missing ones optimised, a damaged chunk optimised again, other weights or settings not mixed in."""

import pytest
import torch

from factedit import Editor, Request, ValueConfig
from tiny import tiny_model

REQS = [Request("{} is located in the city of", "Eiffel Tower", "Rome"),
        Request("{} is in", "Space Needle", "Tokyo"),
        Request("The capital of {} is", "Japan", "Paris"),
        Request("{} speaks", "Danielle Darrieux", "Italian")]


@pytest.fixture
def counted(monkeypatch):
    """The requests each target optimisation was asked for (the real optimisation runs)."""
    import factedit.edit.methods.batch as B

    seen, real = [], B.optimize_values
    monkeypatch.setattr(B, "optimize_values", lambda problem, cfg: seen.append(problem.n_req) or
                        real(problem, cfg))
    return seen


def _editor(disk=True):
    ed = Editor(*tiny_model("llama"), progress=False)
    ed.caches.disk_targets = disk
    return ed


def _compute(ed, reqs, tiny_corpus, **kw):
    return ed.compute(reqs, method="memit", layers=(1, 2), stats_corpus=str(tiny_corpus), stats_tokens=800,
                      value=ValueConfig(steps=4), batch_size=2, **kw)


def test_a_new_process_reads_the_targets_back_and_optimises_only_the_missing(home, tiny_corpus, counted):
    first = _compute(_editor(), REQS[:3], tiny_corpus)
    chunks = list((home / "targets").glob("*/*.safetensors"))
    assert sum(counted) == 3 and len(chunks) == 2  # chunks of at most 2, one file each

    counted.clear()
    again = _compute(_editor(), REQS[:3], tiny_corpus)  # a new Editor: nothing in memory
    assert counted == []
    for a, b in zip(first.deltas, again.deltas):
        assert torch.equal(a.dense(), b.dense())
    assert [x["steps"] for x in again.info] == [x["steps"] for x in first.info]

    more = _compute(_editor(), REQS, tiny_corpus)  # one request more: only it is optimised
    assert counted == [1]
    plain = _compute(_editor(disk=False), REQS, tiny_corpus)  # all four optimised in this process, in memory
    for a, b in zip(more.deltas, plain.deltas):
        assert torch.allclose(a.dense(), b.dense(), rtol=1e-4, atol=1e-7)  # chunked differently: float rounding


def test_a_damaged_chunk_is_optimised_again(home, tiny_corpus, counted):
    _compute(_editor(), REQS[:2], tiny_corpus)
    (chunk,) = (home / "targets").glob("*/*.safetensors")
    chunk.write_bytes(b"torn")
    counted.clear()
    _compute(_editor(), REQS[:2], tiny_corpus)
    assert counted == [2] and chunk.stat().st_size > 4  # written again whole


def test_other_settings_or_weights_do_not_share_targets_and_off_writes_nothing(home, tiny_corpus, counted):
    _compute(_editor(disk=False), REQS[:2], tiny_corpus)
    assert not (home / "targets").exists()
    _compute(_editor(), REQS[:2], tiny_corpus)
    counted.clear()
    _compute(_editor(), REQS[:2], tiny_corpus, essence_prompts=("{} is",))  # other settings
    assert counted == [2]
    ed = _editor()
    ed.edit(REQS[3:], method="memit", layers=(1, 2), stats_corpus=str(tiny_corpus), stats_tokens=800,
            value=ValueConfig(steps=4), verify=False)
    counted.clear()
    _compute(ed, REQS[:2], tiny_corpus)  # the weights changed: their own targets
    assert counted == [2]
    # original weights (the edit's own target joined them), other settings, edited weights
    assert len(list((home / "targets").iterdir())) == 3
