import pytest
import torch

from factedit.core.arch import ModelAdapter
from factedit.core.errors import CorpusError, StatsError
from factedit.core.hooks import Hook
from factedit.stats.corpus import resolve_corpus
from factedit.stats.layer import SecondMoment, layer_stats, load_stats_file, stats_cache_path, token_chunks
from reference import second_moment
from tiny import tiny_model


def test_streaming_equals_whole_batch_float64():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 7, generator=g, dtype=torch.float64)
    acc = SecondMoment(7)
    for chunk in X.split(97):
        acc.update(chunk)
    ref = second_moment(X)  # Xᵀ X / N in NumPy float64
    assert acc.count == 1000
    assert torch.allclose(acc.sum / acc.count, ref, rtol=1e-6)


def test_merge_is_exact():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 5, generator=g)
    whole = SecondMoment(5).update(X)
    a, b = SecondMoment(5).update(X[:120]), SecondMoment(5).update(X[120:])
    sequential = SecondMoment(5).update(X[:120]).update(X[120:])
    merged = a.merge(b)
    assert merged.count == whole.count == sequential.count
    assert torch.equal(merged.sum, sequential.sum)  # same batches: bit-identical
    assert torch.allclose(merged.sum, whole.sum, rtol=1e-5, atol=1e-4)  # other batching: fp32 products
    with pytest.raises(StatsError):
        a.merge(SecondMoment(6))


def _keys_reference(ad, layer, chunks):
    """(N, C): the number of keys entering W_out at ``layer`` over ``chunks`` (one plain forward each) and their
    second moment ``Xᵀ X / N`` by the formula (reference.py), not through the accumulator under test."""
    keys = []
    for c in chunks:
        with Hook(ad.w_out(layer), retain_input=True) as t:
            ad.model(torch.tensor([c]))
        keys.append(t.input[0])
    X = torch.cat(keys)
    return X.shape[0], second_moment(X)


def test_layer_stats_match_direct_computation_and_cache(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    st = layer_stats(ad, 2, corpus=str(tiny_corpus), n_tokens=600, seq_len=32, batch_size=3, progress=False)
    chunks = list(token_chunks(tok, resolve_corpus(str(tiny_corpus)), 32, 600))
    n, ref = _keys_reference(ad, 2, chunks)
    assert st.count == n == sum(len(c) for c in chunks)
    assert torch.allclose(st.mom2.double(), ref, rtol=1e-4, atol=1e-6)
    files = list((home / "stats").rglob("*.safetensors"))
    assert len(files) == 1
    acc, meta = load_stats_file(files[0])
    assert meta["layer"] == "2" and meta["requested_tokens"] == "600" and "corpus" in meta
    assert meta["n_tokens"] == meta["count"] and int(meta["count"]) >= 600  # the tokens actually accumulated
    assert "corpus" in meta and "model_fingerprint" in meta
    # second call reads the cache (identical result)
    again = layer_stats(ad, 2, corpus=str(tiny_corpus), n_tokens=600, seq_len=32, batch_size=3, progress=False)
    assert torch.equal(again.mom2, st.mom2)


def test_resume_after_interruption(home, tiny_corpus, monkeypatch):
    model, tok = tiny_model("gpt2")
    ad = ModelAdapter(model, tok)
    kw = dict(corpus=str(tiny_corpus), n_tokens=800, seq_len=32, batch_size=2, progress=False, checkpoint_every=0.0)
    full = layer_stats(ad, 1, cache=False, **kw)

    import factedit.stats.layer as S
    real_update = S.SecondMoment.update
    calls = {"n": 0}

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_update(self, x)

    monkeypatch.setattr(S.SecondMoment, "update", flaky)
    with pytest.raises(KeyboardInterrupt):
        layer_stats(ad, 1, **kw)
    monkeypatch.setattr(S.SecondMoment, "update", real_update)
    partials = list((home / "stats").rglob("*.partial.safetensors"))
    assert len(partials) == 1
    acc, meta = load_stats_file(partials[0])
    assert 0 < acc.count < full.count
    resumed = layer_stats(ad, 1, **kw)
    assert resumed.count == full.count
    assert torch.allclose(resumed.mom2, full.mom2, rtol=1e-5, atol=1e-7)
    assert not list((home / "stats").rglob("*.partial.safetensors"))


def test_corrupt_cache_is_an_error_and_left_alone(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    layer_stats(ad, 1, corpus=str(tiny_corpus), n_tokens=300, seq_len=32, progress=False)
    path = next((home / "stats").rglob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(StatsError, match="unreadable"):
        layer_stats(ad, 1, corpus=str(tiny_corpus), n_tokens=300, seq_len=32, progress=False)
    assert path.read_bytes() == b"not a safetensors file"
    # --force recomputes and replaces atomically
    st = layer_stats(ad, 1, corpus=str(tiny_corpus), n_tokens=300, seq_len=32, progress=False, force=True)
    assert torch.isfinite(st.mom2).all()


def test_nan_statistics_rejected(home, tiny_corpus):
    from conftest import poison_stats_file

    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    layer_stats(ad, 1, corpus=str(tiny_corpus), n_tokens=300, seq_len=32, progress=False)
    poison_stats_file(next((home / "stats").rglob("*.safetensors")))
    with pytest.raises(StatsError, match="NaN"):
        layer_stats(ad, 1, corpus=str(tiny_corpus), n_tokens=300, seq_len=32, progress=False)


def test_corpus_errors(tmp_path, home):
    model, tok = tiny_model("llama")
    ad = ModelAdapter(model, tok)
    with pytest.raises(CorpusError, match="not found"):
        layer_stats(ad, 1, corpus=str(tmp_path / "missing.txt"), n_tokens=100, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        layer_stats(ad, 1, corpus=str(empty), n_tokens=100, progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    with pytest.raises(StatsError, match="no tokens"):
        layer_stats(ad, 1, corpus=str(blank), n_tokens=100, progress=False, cache=False)
    assert not (home / "stats").exists() or not list((home / "stats").rglob("*.safetensors"))


def test_jsonl_corpus_and_cache_path_keys(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "hello world"}\n{"id": 3, "body": "second doc"}\n"third"\n')
    docs = list(resolve_corpus(str(p)).open())
    assert docs == ["hello world", "second doc", "third"]
    a = stats_cache_path("fp", 3, "corpusA", 100, tmp_path)
    assert (a != stats_cache_path("fp", 3, "corpusB", 100, tmp_path)
            != stats_cache_path("fp", 4, "corpusA", 100, tmp_path))
    assert a != stats_cache_path("fp", 3, "corpusA", 200, tmp_path)


def test_documents_are_bounded_without_paragraph_breaks(tmp_path):
    from factedit.stats.corpus import MAX_DOC_CHARS

    p = tmp_path / "wall.txt"
    p.write_text("\n".join(["word " * 200] * 1000))  # ~1 MB, no blank line
    docs = list(resolve_corpus(str(p)).open())
    assert len(docs) > 10 and max(map(len, docs)) <= MAX_DOC_CHARS + 1000
    q = tmp_path / "big.jsonl"
    q.write_text('{"text": "%s"}\n' % ("x" * (3 * MAX_DOC_CHARS)))
    assert [len(d) for d in resolve_corpus(str(q)).open()] == [MAX_DOC_CHARS] * 3


def test_auto_corpus_without_network_is_reported_and_recorded(home, tiny_dir, monkeypatch, caplog, capsys, tmp_path):
    """corpus=auto never silently changes what the statistics are computed from: the fallback to
    model-sampled text is logged at warning level and recorded in the edit's result, its JSON and its
    patch."""
    import json
    import logging

    from factedit import Editor, Patch, Request, ValueConfig, load_model
    from factedit.cli import main

    monkeypatch.delenv("FACTEDIT_CORPUS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model(str(tiny_dir))
    ed = Editor(model, tok, progress=False)
    with caplog.at_level(logging.WARNING):
        r = ed.edit(Request("{} is in", "Paris", "Rome"), layer=2, stats_tokens=800, value=ValueConfig(steps=2),
                    context_lengths=((3, 2),))
    src = r.statistics["2"]
    assert src["spec"] == "auto" and src["corpus"].startswith("model-sampled")
    assert src["tokens"] == ed.caches.stats(2, None, 800).count >= 800  # the tokens actually seen
    assert "not reachable" in src["reason"] and "sampled from the model" in src["reason"]
    assert any("key statistics from model-sampled" in m for m in caplog.messages)
    assert Patch.from_result(r).meta["statistics"] == r.statistics
    code = main(["edit", "--model", str(tiny_dir), "--prompt", "{} is in", "--subject", "Paris", "--target", "Rome",
                 "--layer", "2", "--stats-tokens", "800", "--steps", "2", "--no-guard", "--json", "--allow-unverified"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["statistics"]["2"]["reason"] == src["reason"]


def test_sequence_length_and_accumulator_are_options_with_their_own_cache(home, tiny_corpus, tiny_dir, capsys):
    """Chunks never exceed the given length whatever the context length; a float32 accumulator agrees with
    float64 to float32 rounding; each choice has its own cache file; bad values are refused."""
    import json

    from factedit.cli import main

    model, tok = tiny_model("llama")  # max_position_embeddings 128
    ad = ModelAdapter(model, tok)
    seen = []
    real = ad.body.forward

    def spy(*a, **kw):
        seen.append(kw["input_ids"].shape[1])
        return real(*a, **kw)

    ad.body.forward = spy
    a = layer_stats(ad, 2, corpus=str(tiny_corpus), n_tokens=900, seq_len=40, progress=False)
    del ad.body.forward
    assert max(seen) == 40
    b = layer_stats(ad, 2, corpus=str(tiny_corpus), n_tokens=900, seq_len=40, dtype="float32", progress=False)
    assert a.count == b.count
    assert float((a.mom2 - b.mom2).norm() / a.mom2.norm()) < 1e-5
    names = sorted(p.name for p in (home / "stats").rglob("*.safetensors"))
    assert len(names) == 2 and any(n.endswith("-len40.safetensors") for n in names)
    assert any(n.endswith("-len40-float32.safetensors") for n in names)
    with pytest.raises(StatsError, match="stats_dtype"):
        layer_stats(ad, 2, corpus=str(tiny_corpus), n_tokens=900, dtype="float16", progress=False)
    with pytest.raises(StatsError, match="stats_seq_len"):
        layer_stats(ad, 2, corpus=str(tiny_corpus), n_tokens=900, seq_len=1, progress=False)
    for bad in ("1", "0"):  # 0 is refused too, not taken for the default
        code = main(["stats", "--model", str(tiny_dir), "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600",
                     "--layers", "1", "--stats-seq-len", bad])
        assert code == 2 and "stats_seq_len" in capsys.readouterr().err
    code = main(["stats", "--model", str(tiny_dir), "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600",
                 "--layers", "1", "--stats-seq-len", "64", "--stats-dtype", "float32", "--json"])
    rep = json.loads(capsys.readouterr().out)["layers"][0]
    assert rep["seq_len"] == 64 and rep["accumulator"] == "float32"
    assert rep["memory_bytes"]["sum"] == ad.d_ff ** 2 * 4 and rep["memory_bytes"]["keys"] == 8 * 64 * ad.d_ff * 4
