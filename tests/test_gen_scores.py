"""Generation-based scores (gen_ES / gen_PS / gen_NS / gen_leak), perplexity and known-fact recall:
hand-written texts for the metric, independent computations on tiny models for the rest."""

import json
import math

import pytest
import torch

from conftest import COUNTERFACT
from factedit import Editor
from factedit.core.answers import greedy_answers
from factedit.evaluation import AbilityConfig, EvalConfig, GenerationConfig, fact_recall, perplexity, run_eval
from factedit.evaluation.scoring import first_sentence, generation_case, mentions, normalize_answer, summarize_records
from tiny import tiny_model


# ---------------------------------------------------------------------- the metric, on hand-written texts
def test_normalisation_and_whole_word_matching():
    assert normalize_answer("  The United-States!  ") == "united states"
    assert normalize_answer("An apple, a day") == "apple day"
    assert mentions("He moved to Rome, Italy.", ["Rome"])
    assert mentions("the capital is the united states", ["United States"])
    assert not mentions("Romeo and Juliet", ["Rome"])  # the target inside a longer word
    assert not mentions("Parisian food", ["Paris"])
    assert mentions("It is in NYC.", ["New York City", "NYC"])  # aliases
    assert not mentions("", ["Rome"]) and not mentions("Rome", [""])


def test_stopping_rules():
    assert first_sentence(" Rome. It is a city.") == "Rome."
    assert first_sentence("Rome\nParis.") == "Rome"  # a newline stops
    assert first_sentence("Rome is nice! Yes") == "Rome is nice!"
    assert first_sentence("Is it Rome? No") == "Is it Rome?"
    assert first_sentence("about 3.5 million people. More") == "about 3.5 million people."  # not a sentence end
    assert first_sentence("\n\n Rome, Italy") == "Rome, Italy"  # leading whitespace dropped; no stop: all
    assert first_sentence("") == ""


def test_generation_case_rules():
    g = generation_case(["Rome."], ["Paris and Rome."], ["Paris.", "London."], ["paris", "Berlin."],
                        ["Rome"], ["Paris"])
    assert g["gen_ES"] == 1.0
    assert g["gen_PS"] == 0.0  # both targets present: not a success
    assert g["gen_NS"] == 0.5  # "Paris." == "paris" after normalisation; London != Berlin
    assert g["gen_leak"] == 0.0
    g = generation_case([""], [], ["Rome, surely."], ["Berlin."], ["Rome"], ["Paris"])
    assert g["gen_ES"] == 0.0 and g["gen_PS"] is None  # an empty generation fails; no paraphrases: None
    assert g["gen_leak"] == 1.0 and g["gen_NS"] == 0.0
    g = generation_case(["in Rome"], [], ["Rome."], ["Rome!"], ["Rome"])  # zsRE: no true target
    assert g["gen_ES"] == 1.0 and g["gen_leak"] == 0.0 and g["gen_NS"] == 1.0  # it said Rome before too
    with pytest.raises(ValueError):
        generation_case([], [], ["a"], [], ["Rome"])


def test_summaries_count_failed_edits_as_generation_failures():
    recs = [{"ES": 1.0, "PS": 1.0, "NS": 1.0, "gen_ES": 1.0, "gen_PS": 0.5, "gen_NS": 1.0, "gen_leak": 0.0},
            {"error": "RequestError: x"}]
    s = summarize_records(recs)
    assert s["gen_ES"] == 50.0 and s["gen_PS"] == 25.0 and s["gen_NS"] == 50.0
    assert s["gen_leak"] == 0.0  # over the edits that were made
    assert s["gap_ES"] == s["ES"] - s["gen_ES"] == 0.0 and s["gap_PS"] == 50.0 - 25.0
    assert summarize_records([{"ES": 1.0, "PS": 1.0, "NS": 1.0}])["gen_ES"] is None  # not measured: None


# ---------------------------------------------------------------------- on tiny models
def _editor(seed=0):
    model, tok = tiny_model("llama", seed=seed)
    return Editor(model, tok, progress=False)


def test_batched_greedy_answers_equal_one_prompt_at_a_time_generate():
    ed = _editor()
    prompts = ["The Eiffel Tower is located in the city of", "Rome is in", "a b c", "The capital of Japan is"]
    got = greedy_answers(ed.adapter, prompts, max_new_tokens=12, batch_rows=3)
    for p, g in zip(prompts, got):
        enc = ed.tokenizer(p, return_tensors="pt")
        out = ed.model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=ed.tokenizer.pad_token_id,
                                top_p=None, top_k=None, temperature=None)
        text = ed.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert g == first_sentence(text), (p, g, text)


def test_perplexity_and_known_recall_match_independent_computations(tiny_corpus, tmp_path):
    ed = _editor()
    ppl = perplexity(ed.adapter, tiny_corpus, n_tokens=300, window=64, batch_size=3)
    ids = ed.tokenizer(tiny_corpus.read_text(encoding="utf-8"))["input_ids"][:300]
    nll, n = 0.0, 0
    for i in range(0, len(ids), 64):
        w = torch.tensor([ids[i: i + 64]])
        if w.shape[1] < 2:
            continue
        logp = torch.log_softmax(ed.model(input_ids=w).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(1, w[0, 1:, None]).sum())
        n += w.shape[1] - 1
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)

    facts = _answered(ed)
    facts.append({"prompt": "Rome is in", "subject": "Rome", "attribute": "zzzz"})  # not its answer
    path = tmp_path / "knowns.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    from factedit.core.known_facts import load_known_facts
    from factedit.evaluation.ability import answered_facts

    known = answered_facts(ed.adapter, load_known_facts(path))
    # independently: the greedy next token after the prompt is the answer's first token
    expect = []
    for f in facts:
        ids = ed.tokenizer(f["prompt"])["input_ids"]
        top = int(ed.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        first = ed.tokenizer(f["prompt"] + " " + f["attribute"])["input_ids"][len(ids)]
        expect.append(top == first)
    assert [k.prompt for k in known] == [f["prompt"] for f, e in zip(facts, expect) if e]
    assert len(known) == len(facts) - 1
    assert fact_recall(ed.adapter, known) == 1.0


SUBJECTS = ("Eiffel Tower", "Rome", "Japan", "Toko Yasuda", "Paris", "Seattle", "Madrid", "Tokyo", "Spain", "France",
            "Italy", "Space Needle")


def _answered(ed, subjects=SUBJECTS) -> list:
    """Facts the random tiny model answers: its greedy token after a prompt, when that is a word after a space."""
    facts = []
    for subject in subjects:
        for prompt in (f"{subject} is in", f"The capital of {subject} is", f"{subject} speaks"):
            ids = ed.tokenizer(prompt)["input_ids"]
            word = ed.tokenizer.decode([int(ed.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())])
            if word.startswith(" ") and word.strip().isalpha():
                facts.append({"prompt": prompt, "subject": subject, "attribute": word.strip()})
    assert len(facts) >= 2, "the tiny model answers no prompt with a word"
    return facts


def _cf(tmp_path, n=3):
    p = tmp_path / "cf.jsonl"
    p.write_text("\n".join(COUNTERFACT.read_text(encoding="utf-8").splitlines()[:n]) + "\n")
    return p


@pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
def test_single_edit_run_carries_generation_scores(home, tiny_corpus, tmp_path):
    ed = _editor()
    opts = (("layer", 1), ("stats_corpus", str(tiny_corpus)), ("stats_tokens", 2000), ("steps", 3))
    cfg = EvalConfig(method="r-rome", dataset=str(_cf(tmp_path)), generation=GenerationConfig(length=0),
                     gen_tokens=8, method_options=opts)
    s = run_eval(ed, cfg, tmp_path / "run")
    recs = [json.loads(l) for l in (tmp_path / "run" / "cases.jsonl").read_text().splitlines()]
    unedited = json.loads((tmp_path / "run" / "unedited.json").read_text())
    for r in recs:
        assert set(r["gen_texts"]) == {"rewrite", "paraphrase", "neighborhood"}
        assert len(unedited[str(r["case_id"])]) == len(r["gen_texts"]["neighborhood"])
        for k in ("gen_ES", "gen_PS", "gen_NS", "gen_leak"):
            assert 0.0 <= r[k] <= 1.0
        new, true = r["request"]["target_new"], r["request"]["target_true"]
        want = generation_case(r["gen_texts"]["rewrite"], r["gen_texts"]["paraphrase"], r["gen_texts"]["neighborhood"],
                               unedited[str(r["case_id"])], [new], [true])
        assert {k: r[k] for k in want} == want
    for k in ("gen_ES", "gen_PS", "gen_NS", "gen_leak", "gap_ES"):
        assert s[k] is not None
    # the unedited baseline: neighbourhood answers are its own, so gen_NS is 100 and nothing leaks
    base = run_eval(ed, EvalConfig(method="none", dataset=str(_cf(tmp_path)), generation=GenerationConfig(length=0),
                                   gen_tokens=8), tmp_path / "none")
    assert base["gen_NS"] == 100.0 and base["gen_leak"] == 0.0


@pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
def test_sequential_run_tracks_perplexity_recall_and_generation_retention(home, tiny_corpus, tmp_path):
    ed = _editor()
    knowns = tmp_path / "knowns.jsonl"
    facts = _answered(ed)
    knowns.write_text("\n".join(json.dumps(f) for f in facts) + "\n")
    from factedit.core.known_facts import load_known_facts
    from factedit.evaluation.ability import answered_facts
    from factedit.evaluation.datasets import load_cases

    # the first record edits the subject of a fact the model knows (written in another case there), so that
    # the checkpoints after it leave that fact out of the recall
    known = answered_facts(ed.adapter, load_known_facts(knowns))[0].subject
    lines = _cf(tmp_path, 4).read_text(encoding="utf-8").splitlines()
    first = load_cases(_cf(tmp_path, 1))[0].request.subject
    cf = tmp_path / "cf-known.jsonl"
    cf.write_text("\n".join([lines[0].replace(first, known.upper())] + lines[1:]) + "\n", encoding="utf-8")
    subjects = [c.request.subject for c in load_cases(cf)]
    ability = AbilityConfig(ppl_corpus=str(tiny_corpus), ppl_tokens=200, window=50, knowns=str(knowns))
    ppl0 = perplexity(ed.adapter, tiny_corpus, 200, 50)
    opts = (("layer", 1), ("stats_corpus", str(tiny_corpus)), ("stats_tokens", 2000), ("steps", 3))
    cfg = EvalConfig(method="r-rome", dataset=str(cf), sequential=True, downstream_every=2,
                     ability=ability, generation=GenerationConfig(length=0), gen_tokens=6, method_options=opts)
    run_eval(ed, cfg, tmp_path / "seq")
    down = [json.loads(l) for l in (tmp_path / "seq" / "downstream.jsonl").read_text().splitlines()]
    assert [d["n_edits"] for d in down] == [0, 2, 4]
    assert down[0]["ability"]["perplexity"] == pytest.approx(ppl0, rel=1e-6)
    assert down[0]["ability"]["known_recall"] == 1.0 and down[0]["tasks"] is None
    # facts about the subjects edited so far are left out of the recall at each checkpoint, and counted

    about = lambda n: sum(f["subject"].casefold() in {s.casefold() for s in subjects[:n]} for f in facts)  # noqa: E731
    assert down[0]["ability"]["known_excluded"] == 0
    for d in down[1:]:
        assert d["ability"]["known_excluded"] <= about(d["n_edits"])
    assert down[-1]["ability"]["known_excluded"] >= 1
    # the wear meter at each checkpoint: the edited layer's cumulative update, growing with the edits
    assert down[0]["wear"] == {} and 0 < down[1]["wear"]["1"] <= down[2]["wear"]["1"] * 1.5
    last, first_ = down[-1]["ability"], down[0]["ability"]
    assert last["known_facts"] + last["known_excluded"] == first_["known_facts"]
    assert down[-1]["ability"]["perplexity"] == pytest.approx(perplexity(ed.adapter, tiny_corpus, 200, 50), rel=1e-6)
    assert all(d["retention"] is None or d["retention"]["gen_ES"] is not None for d in down)
    from factedit.evaluation.summarize import load_run, plot_runs, sequential_table

    run = load_run(tmp_path / "seq")
    assert "perplexity at end" in sequential_table([run])
    plots = {p.name for p in plot_runs([run], tmp_path / "plots")}
    assert {"sequential_ability.png", "sequential_wear.png"} <= plots
    ed.revert(len(ed.history))


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
def test_chat_generation_scores_ask_through_the_template(home, tmp_path, tiny_corpus):
    """`eval --gen-chat`: each prompt is the user's message; the answer is the model's greedy reply (as an
    independent generate() of the rendered conversation gives it), cut at the first sentence."""
    import copy

    from factedit.cli import main

    model, tok = tiny_model("llama")
    tok = copy.deepcopy(tok)  # the tiny tokenizer is shared between tests: give only this one a template
    tok.chat_template = CHAT
    ed = Editor(model, tok, progress=False)
    cfg = EvalConfig(method="none", dataset=str(_cf(tmp_path, 2)), generation=GenerationConfig(length=0),
                     gen_tokens=8, gen_chat=True)
    run_eval(ed, cfg, tmp_path / "chat")
    recs = [json.loads(l) for l in (tmp_path / "chat" / "cases.jsonl").read_text().splitlines()]
    for r in recs:
        prompt = r["request"]["prompt"].replace("{}", r["request"]["subject"])
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        enc = tok(text, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             top_p=None, top_k=None, temperature=None)
        want = first_sentence(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        assert r["gen_texts"]["rewrite"] == [want]
    plain = run_eval(Editor(model, tok, progress=False), EvalConfig(method="none", dataset=str(_cf(tmp_path, 2)),
                     generation=GenerationConfig(length=0), gen_tokens=8), tmp_path / "plain")
    assert plain["n"] == 2
    raw = [json.loads(l) for l in (tmp_path / "plain" / "cases.jsonl").read_text().splitlines()]
    assert [r["gen_texts"] for r in raw] != [r["gen_texts"] for r in recs]  # another question, other answers
    # a model without a chat template: a clear error, nothing written
    model2, tok2 = tiny_model("llama")
    code = main(["eval", "--model", str(_save(model2, tok2, tmp_path / "m")), "--method", "none", "--dataset",
                 str(_cf(tmp_path, 2)), "--gen-chat", "--out", str(tmp_path / "refused")])
    assert code == 2 and not (tmp_path / "refused").exists()


def _save(model, tok, d):
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
