"""Causal tracing on tiny random models: exact identities, a hand-written reference, token
classes, caches, plots, the CLI and bad input. One short test on the embedded model."""

import contextlib
import json

import pytest
import torch

from factedit.cli import main
from factedit.core.arch import ModelAdapter
from factedit.core.errors import LayerError, RequestError, TraceError
from factedit.core.hooks import Hook
from factedit.core.known_facts import load_known_facts
from factedit.trace.average import TOKEN_CLASSES, TraceAverage, token_classes
from factedit.trace.cache import LayerRecommendation, load_recommendation, noise_sigma, save_recommendation, trace_dir
from factedit.trace.causal import (
    CausalTracer,
    TraceConfig,
    gaussian_noise,
    prepare_prompt,
    restore_set,
    trace_prompt,
    window_layers,
)
from tiny import ARCHS, tiny_model

PROMPT = "The capital of Japan is Tokyo. The Space Needle is in the city of"
SUBJECT = "Space Needle"


@pytest.fixture(scope="module")
def tiny_adapters():
    return {a: ModelAdapter(*tiny_model(a)) for a in ARCHS}


def _tracer(ad, sigma=0.5, samples=3, prompt=PROMPT, subject=SUBJECT):
    tp = prepare_prompt(ad.tokenizer, prompt, subject)
    return tp, CausalTracer(ad, tp.ids, tp.subject_range, sigma, samples, seed=1)


@torch.no_grad()
def _reference(ad, tp, noise, sites, answer):
    """Plain full forwards, one noise sample at a time, hooks written out by hand."""
    s, e = tp.subject_range
    ids = torch.tensor([list(tp.ids)])
    clean = {}
    with contextlib.ExitStack() as st:
        tr = {(k, l, t): st.enter_context(Hook(ad.component(k, l), retain_output=True)) for k, l, t in sites}
        ad.model(input_ids=ids)
    clean = {key: t.output[0, key[2]].clone() for key, t in tr.items()}
    probs = []
    for n in noise:
        def add(h, n=n):
            h = h.clone()
            h[0, s:e] += n
            return h

        def put(key):
            def edit(h):
                h = h.clone()
                h[0, key[2]] = clean[key]
                return h
            return edit

        with contextlib.ExitStack() as st:
            st.enter_context(Hook(ad.embed, edit_output=add))
            for key in sites:
                st.enter_context(Hook(ad.component(key[0], key[1]), edit_output=put(key)))
            logits = ad.model(input_ids=ids).logits[0, -1]
        probs.append(torch.softmax(logits.float(), -1)[answer])
    return float(torch.stack(probs).double().mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_restores_match_reference(arch, tiny_adapters):
    ad = tiny_adapters[arch]
    tp, tr = _tracer(ad)
    s, e = tp.subject_range
    T, L = len(tp.ids), ad.n_layers
    ans = tr.greedy_answer
    sets = [[("hidden", 1, e - 1)], [("hidden", L - 1, T - 1)], [("mlp", 0, s), ("mlp", 1, s)],
            [("attn", 2, e), ("attn", 3, e)], [("mlp", 2, T - 1)], [("hidden", 0, s), ("attn", 3, T - 2)], []]
    got = tr.restored(sets, ans, batch_tokens=64)  # small batches: several chunks per group
    noise = gaussian_noise(3, e - s, tr.width, 0.5, seed=1)
    want = [_reference(ad, tp, noise, st, ans) for st in sets]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=2e-5, atol=1e-7)
    assert got[-1] == pytest.approx(tr.p_corrupt(ans), rel=1e-5)  # empty set = corrupted run


@pytest.mark.parametrize("arch", ARCHS)
def test_restoring_every_token_of_a_layer_gives_clean(arch, tiny_adapters):
    ad = tiny_adapters[arch]
    tp, tr = _tracer(ad, sigma=2.0)
    T, L = len(tp.ids), ad.n_layers
    ans = tr.greedy_answer
    assert abs(tr.p_corrupt(ans) - tr.p_clean(ans)) > 1e-4  # the noise does something
    sets = [[("hidden", l, t) for t in range(T)] for l in range(L)]
    sets.append([("hidden", l, t) for l in range(L) for t in range(T)])
    got = tr.restored(sets, ans)
    torch.testing.assert_close(got, torch.full_like(got, tr.p_clean(ans)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_zero_noise_gives_zero_effect(arch, tiny_adapters):
    ad = tiny_adapters[arch]
    r = trace_prompt(ad, PROMPT, SUBJECT, config=TraceConfig(samples=2, window=2), sigma=0.0)
    assert r.p_corrupt == pytest.approx(r.p_clean, rel=1e-5)
    for k in ("hidden", "mlp", "attn"):
        torch.testing.assert_close(r.scores[k], torch.full_like(r.scores[k], r.p_clean), rtol=1e-5, atol=1e-8)


def test_trace_cells_match_restore_sets(tiny_adapters):
    """Each heatmap cell is the restore set of its (token, layer); pre-subject rows are P_corrupt."""
    ad = tiny_adapters["llama"]
    cfg = TraceConfig(samples=3, window=3, seed=1)
    r = trace_prompt(ad, PROMPT, SUBJECT, config=cfg, sigma=0.5)
    tp, tr = _tracer(ad)
    s, _ = tp.subject_range
    assert r.scores["mlp"].shape == (len(tp.ids), ad.n_layers)
    cells = [(k, t, l) for k in ("hidden", "mlp", "attn") for t in (s, len(tp.ids) - 1) for l in (0, 3)]
    got = tr.restored([restore_set(k, t, l, 3, ad.n_layers) for k, t, l in cells], r.answer_id)
    for (k, t, l), v in zip(cells, got.tolist()):
        assert r.scores[k][t, l] == pytest.approx(v, rel=1e-5)  # batched differently: float32 rounding
    assert s > 0 and torch.all(r.scores["hidden"][:s] == r.p_corrupt)


def test_trace_selected_token_classes(tiny_adapters):
    ad = tiny_adapters["qwen2"]
    full = trace_prompt(ad, PROMPT, SUBJECT, config=TraceConfig(kinds=("mlp",), samples=2, window=2), sigma=0.5)
    part = trace_prompt(ad, PROMPT, SUBJECT, sigma=0.5,
                        config=TraceConfig(kinds=("mlp",), samples=2, window=2, classes=("last_subject",)))
    e = full.subject_range[1]
    torch.testing.assert_close(part.scores["mlp"][e - 1], full.scores["mlp"][e - 1], rtol=1e-6, atol=1e-9)
    rest = torch.cat([part.scores["mlp"][: e - 1], part.scores["mlp"][e:]])
    assert bool(rest.isnan().all())
    assert part.recommended_layer == full.recommended_layer
    assert part.to_dict()["mlp"][0] == [None] * ad.n_layers
    with pytest.raises(TraceError, match="token classes"):
        TraceConfig(classes=("subject",)).check(4)


def test_window_clipping():
    assert list(window_layers(0, 10, 30)) == [0, 1, 2, 3, 4]
    assert list(window_layers(3, 10, 30)) == list(range(0, 8))
    assert list(window_layers(12, 10, 30)) == list(range(7, 17))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    assert list(window_layers(27, 10, 30)) == list(range(22, 30))
    assert list(window_layers(5, 1, 30)) == [5]
    assert list(window_layers(2, 4, 4)) == [0, 1, 2, 3]
    assert restore_set("mlp", 7, 0, 4, 4) == [("mlp", 0, 7), ("mlp", 1, 7)]
    assert restore_set("attn", 7, 3, 4, 4) == [("attn", 1, 7), ("attn", 2, 7), ("attn", 3, 7)]
    assert restore_set("hidden", 7, 3, 4, 4) == [("hidden", 3, 7)]


def test_window_edges_in_trace(tiny_adapters):
    ad = tiny_adapters["gpt2"]  # 4 layers; window 4 at layer 0 -> 0..1, at layer 3 -> 1..3
    r = trace_prompt(ad, PROMPT, SUBJECT, config=TraceConfig(kinds=("mlp",), samples=2, window=4), sigma=0.5)
    tp = prepare_prompt(ad.tokenizer, PROMPT, SUBJECT)
    tr = CausalTracer(ad, tp.ids, tp.subject_range, 0.5, 2, seed=0)
    t = r.subject_range[1] - 1
    first, last, wrong = tr.restored([[("mlp", 0, t), ("mlp", 1, t)], [("mlp", m, t) for m in (1, 2, 3)],
                                      [("mlp", m, t) for m in (0, 1, 2)]], r.answer_id)
    assert r.scores["mlp"][t, 0] == pytest.approx(float(first), rel=1e-6)
    assert r.scores["mlp"][t, 3] == pytest.approx(float(last), rel=1e-6)
    assert r.scores["mlp"][t, 3] != pytest.approx(float(wrong), rel=1e-6)


def _subject_range(prompt, subject):
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tp = prepare_prompt(tok, prompt, subject)
    s, e = tp.subject_range
    assert tok.decode(list(tp.ids[s:e])).strip() == subject  # the range covers exactly the subject
    return len(tp.ids), tp.subject_range


def test_token_classes_one_token_subject_mid_prompt():
    n, (s, e) = _subject_range("The city of Paris is in the country of", "Paris")
    assert e - s == 1 and s > 0
    c = token_classes(n, (s, e))
    assert c["first_subject"] == c["last_subject"] == [s]
    assert c["middle_subject"] == []
    assert c["first_subsequent"] == [e]
    assert c["further"] == list(range(e + 1, n - 1))
    assert c["last"] == [n - 1]


def test_token_classes_multi_token_subject_at_start_and_end():
    n, (s, e) = _subject_range("Autonomous University of Madrid is in", "Autonomous University of Madrid")
    assert s == 0 and e - s >= 4
    c = token_classes(n, (s, e))
    assert c["first_subject"] == [0] and c["last_subject"] == [e - 1]
    assert c["middle_subject"] == list(range(1, e - 1))
    assert c["first_subsequent"] == [e] and c["last"] == [n - 1] and c["further"] == list(range(e + 1, n - 1))
    n, (s, e) = _subject_range("Who plays the guitar? Toko Yasuda", "Toko Yasuda")
    assert e == n and s > 0
    c = token_classes(n, (s, e))
    assert c["first_subsequent"] == [] and c["further"] == [] and c["last"] == c["last_subject"] == [n - 1]


def test_token_classes_closed_form():
    assert token_classes(8, (2, 5)) == {"first_subject": [2], "middle_subject": [3], "last_subject": [4],
                                        "first_subsequent": [5], "further": [6], "last": [7]}
    c = token_classes(6, (4, 5))  # one token after the subject: first subsequent and last
    assert c["first_subsequent"] == c["last"] == [5] and c["further"] == []
    with pytest.raises(TraceError):
        token_classes(4, (3, 6))


def _fake(scores, subject_range, p_corrupt):
    from factedit.trace.causal import TraceResult

    T, L = scores.shape
    return TraceResult("p", "s", ["x"] * T, subject_range, "a", 0, 1.0, p_corrupt,
                       {"hidden": scores, "mlp": scores * 2, "attn": scores * 3})


def test_average_by_class_closed_form():
    a = torch.arange(14, dtype=torch.float64).reshape(7, 2)  # 7 tokens, 2 layers: row t = [2t, 2t + 1]
    b = torch.ones(3, 2, dtype=torch.float64)
    avg = TraceAverage(2).update(_fake(a, (1, 4), 0.5)).update(_fake(b, (0, 1), 0.25))
    eff = avg.effects("hidden")
    i = TOKEN_CLASSES.index
    assert eff[i("first_subject")].tolist() == [((2 - .5) + (1 - .25)) / 2, ((3 - .5) + (1 - .25)) / 2]
    assert eff[i("middle_subject")].tolist() == [4 - .5, 5 - .5]  # only the first fact has one
    assert eff[i("last_subject")].tolist() == [((6 - .5) + (1 - .25)) / 2, ((7 - .5) + (1 - .25)) / 2]
    assert eff[i("first_subsequent")].tolist() == [((8 - .5) + (1 - .25)) / 2, ((9 - .5) + (1 - .25)) / 2]
    assert eff[i("further")].tolist() == [10 - .5, 11 - .5]  # token 5 of fact a only
    assert eff[i("last")].tolist() == [((12 - .5) + (1 - .25)) / 2, ((13 - .5) + (1 - .25)) / 2]
    assert avg.counts.tolist() == [2, 1, 2, 2, 1, 2]
    assert avg.p_corrupt == pytest.approx(0.375) and avg.n == 2
    assert avg.recommended_layer == 1
    assert avg.to_dict()["mlp"][i("middle_subject")] == [2 * 4 - .5, 2 * 5 - .5]


def test_prepare_prompt_and_bad_input(tiny_adapters):
    tok = tiny_adapters["llama"].tokenizer
    tp = prepare_prompt(tok, "{} is in the city of", SUBJECT, "Seattle")
    assert tp.text == "Space Needle is in the city of" and tp.subject_range[0] == 1  # after the prompt prefix
    assert tp.answer_id == prepare_prompt(tok, tp.text, SUBJECT, " Seattle").answer_id
    with pytest.raises(RequestError, match="does not occur"):
        prepare_prompt(tok, "The Eiffel Tower is in", SUBJECT)
    with pytest.raises(RequestError, match="empty"):
        prepare_prompt(tok, "   ", SUBJECT)
    with pytest.raises(RequestError, match="empty"):
        prepare_prompt(tok, "The Space Needle is in", SUBJECT, " ")
    with pytest.raises(RequestError, match="not a continuation"):
        prepare_prompt(tok, "The Space Needle is in the city of ", SUBJECT, "Seattle")  # " " merges
    ad = tiny_adapters["llama"]
    with pytest.raises(LayerError, match="larger than the model"):
        trace_prompt(ad, PROMPT, SUBJECT, config=TraceConfig(window=5), sigma=0.1)
    with pytest.raises(TraceError, match="samples"):
        trace_prompt(ad, PROMPT, SUBJECT, config=TraceConfig(samples=0), sigma=0.1)


def test_noise_sigma_cache(tiny_adapters, home):
    ad = tiny_adapters["llama"]
    subjects = ["Space Needle", "Japan"]
    ids = [i for s in subjects for i in ad.tokenizer(s, add_special_tokens=False)["input_ids"]]
    want = 3 * float(ad.embed(torch.tensor(ids)).double().std())
    assert noise_sigma(ad, subjects=subjects) == pytest.approx(want, rel=1e-12)
    files = list(trace_dir(ad).glob("noise-*.json"))
    assert len(files) == 1
    files[0].write_text("{not json")
    assert noise_sigma(ad, subjects=subjects) == pytest.approx(want, rel=1e-12)  # recomputed
    files[0].write_text(json.dumps({"embedding_std": -1.0, "n_subjects": 2}))
    assert noise_sigma(ad, factor=1.0, subjects=subjects) == pytest.approx(want / 3, rel=1e-12)
    assert json.loads(files[0].read_text())["embedding_std"] == pytest.approx(want / 3, rel=1e-12)


def test_recommendation_cache(tiny_adapters, home):
    ad = tiny_adapters["llama"]
    assert load_recommendation(ad) is None
    rec = LayerRecommendation(2, (0.1, 0.2, 0.3, 0.0), 7, 3, 2, "facts.json")
    path = save_recommendation(ad, rec)
    assert load_recommendation(ad) == rec
    assert load_recommendation(tiny_adapters["gpt2"]) is None  # another model: not used
    for bad in ("[1, 2", json.dumps([1]), json.dumps({**json.loads(path.read_text()), "layer": 9}),
                json.dumps({**json.loads(path.read_text()), "curve": [0.1]})):
        path.write_text(bad)
        assert load_recommendation(ad) is None



def test_cli_trace_single(tiny_dir, home, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["trace", "--model", str(tiny_dir), "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
                 "--window", "2", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    obj = json.loads(captured.out)
    assert json.loads((out / "trace.json").read_text())["tokens"] == obj["tokens"]
    T = len(obj["tokens"])
    for k in ("hidden", "mlp", "attn"):
        assert len(obj[k]) == T and all(len(row) == 4 for row in obj[k])
        assert (out / f"{k}.png").read_bytes()[:4] == b"\x89PNG"
    assert obj["layers"] == [0, 1, 2, 3] and 0 <= obj["recommended_layer"] < 4
    assert obj["p_clean"] > 0 and obj["p_corrupt"] > 0


def test_cli_trace_dataset_writes_recommendation(tiny_dir, home, tmp_path, capsys):
    from factedit.core.models import load_model

    model, tok = load_model(str(tiny_dir))
    ad = ModelAdapter(model, tok)
    tok = ad.tokenizer  # prompts as the model reads them (the prompt prefix)
    facts = []
    for prompt, subject in [("Toko Yasuda is in", "Toko Yasuda"), ("The capital of Japan is", "Japan"),
                            ("Seattle is in", "Seattle"), ("Eiffel Tower is located in", "Eiffel Tower"),
                            *[(f"{s} {r}", s) for s in ("Rome", "France", "Tokyo", "Paris", "Italy", "Spain")
                              for r in ("is in", "is located in the city of", "speaks")]]:  # a random model: try many
        tp = prepare_prompt(tok, prompt, subject)
        h = ad.body(input_ids=torch.tensor([list(tp.ids)])).last_hidden_state[:, -1]
        greedy = int(ad.logits(h).argmax())
        answer = tok.decode([greedy])
        if answer.strip() and prepare_prompt(tok, prompt, subject, answer).answer_id == greedy:
            facts.append({"prompt": prompt, "subject": subject, "attribute": answer})
    assert len(facts) >= 3
    facts.insert(1, {"prompt": "The capital of Japan is", "subject": "Japan", "attribute": "zzzz"})  # not known
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts))
    assert len(load_known_facts(path)) == len(facts)
    from factedit.trace.average import known_facts

    loaded = load_known_facts(path)
    by_one = [f.id for f in known_facts(ad, loaded, batch_size=1)]
    assert by_one == [f.id for f in known_facts(ad, loaded)] and "1" not in by_one and len(by_one) == len(facts) - 1
    out = tmp_path / "avg"
    code = main(["trace", "--model", str(tiny_dir), "--dataset", str(path), "--limit", "2", "--kind", "mlp",
                 "--classes", "last_subject", "--samples", "2", "--window", "2", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    obj = json.loads(captured.out)
    assert obj["n_facts"] == 2 and obj["hidden"] is None and len(obj["mlp"]) == len(TOKEN_CLASSES)
    assert obj["mlp"][0] == [None] * 4 and None not in obj["mlp"][TOKEN_CLASSES.index("last_subject")]
    assert (out / "average_mlp.png").exists() and len((out / "facts.jsonl").read_text().splitlines()) == 2
    rec = load_recommendation(ad)
    assert rec is not None and rec.layer == obj["recommended_layer"] and rec.n_facts == 2

    from factedit import Editor

    assert Editor(model, tok, progress=False).make_config("r-rome", layer="traced").layer == rec.layer


@pytest.mark.parametrize("argv,match", [
    (["--prompt", "The Eiffel Tower is in", "--subject", SUBJECT], "does not occur"),
    (["--prompt", "", "--subject", SUBJECT], "empty"),
    (["--prompt", PROMPT + " ", "--subject", SUBJECT, "--answer", "Seattle"], "not a continuation"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--window", "40"], "larger than the model"),
    (["--prompt", PROMPT], "give --prompt and --subject"),
    (["--dataset", "/nonexistent/known.json"], "cannot read"),
])
def test_cli_trace_bad_input(argv, match, tiny_dir, home, tmp_path, capsys):
    code = main(["trace", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "factedit: error:" in err and match in err


@pytest.mark.slow
def test_embedded_hidden_trace(embedded, home):
    ad = embedded.adapter
    cfg = TraceConfig(kinds=("hidden",), samples=3)
    tp = prepare_prompt(ad.tokenizer, "The capital of Japan is", "Japan", "Tokyo")
    tr = CausalTracer(ad, tp.ids, tp.subject_range, noise_sigma(ad), cfg.samples)
    p_clean, p_corrupt = tr.p_clean(tp.answer_id), tr.p_corrupt(tp.answer_id)
    assert p_clean > 0.3 and p_corrupt < 0.5 * p_clean
    T, L = len(tp.ids), ad.n_layers
    last, subj = tr.restored([[("hidden", L - 1, T - 1)], [("hidden", 3, tp.subject_range[1] - 1)]], tp.answer_id)
    assert float(last) == pytest.approx(p_clean, rel=1e-4)
    assert float(subj) > p_corrupt + 0.5 * (p_clean - p_corrupt)  # early layers at the subject carry the fact


def test_default_layer_is_the_same_everywhere_and_traced_is_asked_for(tiny_dir, tiny_corpus, home, tmp_path,
                                                                      capsys):
    """The default layer is the depth rule in Python, `factedit edit` and `factedit eval` alike (a cached
    causal-trace recommendation does not change it behind the user's back); `--layer traced` /
    ``layer="traced"`` edits the recommended layer; the rule is printed and recorded."""
    from factedit import Editor, Patch, Request
    from factedit.core.models import load_model

    edit = ["edit", "--model", str(tiny_dir), "--prompt", "{} is located in the city of", "--subject", "Eiffel Tower",
            "--target", "Rome", "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", "--steps", "2",
            "--no-guard", "--json", "--allow-unverified"]
    ad = ModelAdapter(*load_model(str(tiny_dir)))
    save_recommendation(ad, LayerRecommendation(2, (0.0, 0.1, 0.3, 0.2), 5, 3, 4, "facts.json"))
    assert main(edit) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == [1] and out["layer_rule"].startswith("depth rule")  # round(0.17 * 4) = 1
    assert main(edit + ["--layer", "traced"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == [2] and out["layer_rule"] == "causal-trace recommendation (5 facts from facts.json)"
    assert main(edit + ["--layer", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["layer_rule"] == "given"
    model, tok = load_model(str(tiny_dir))
    ed = Editor(model, tok, progress=False)
    assert ed.make_config("r-rome").layer == 1 and ed.make_config("r-rome", layer="traced").layer == 2
    r = ed.edit(Request("{} is in", "Paris", "Rome"), layer="traced", stats_corpus=str(tiny_corpus), stats_tokens=600,
                steps=2)
    assert Patch.from_result(r).meta["config"]["layer_rule"].startswith("causal-trace")
    from factedit.cli import parse
    from factedit.cli.eval import eval_config

    settings = parse(["eval", "--dataset", "x.jsonl", "--out", str(tmp_path / "r"), "--layer", "traced"])
    assert dict(eval_config(settings).method_options)["layer"] == "traced"
    (trace_dir(ad) / "recommendation.json").write_text("{broken")
    assert main(edit + ["--layer", "traced"]) == 2  # asked for, not there: a clear error
    assert "no causal-trace recommendation" in capsys.readouterr().err
