"""The blast radius of an edit (factedit.app.side_effects): probe construction checked against keys read by
a plain PyTorch hook, the flags on hand-written answers, and the report of a real edit on a tiny model."""

import json

import torch

from factedit import Editor, Patch, Request
from factedit.app.edit import edit_fact
from factedit.app.settings import EditSettings
from factedit.app.side_effects import BUILTIN_TEMPLATES, COLLATERAL_FLAG, Bank, Probe, compare, load_bank, probe_prompts
from factedit.cli import main
from factedit.core.answers import greedy_answers
from tiny import tiny_model

REQ = Request("{} is located in the city of", "Eiffel Tower", "Rome", "Paris")
SUBJECTS = ("Space Needle", "Japan", "France", "Toko Yasuda", "Danielle Darrieux", "Madrid", "Seattle", "Tokyo")


def test_bank_from_known_facts(tmp_path):
    path = tmp_path / "knowns.jsonl"
    rows = [("Paris is the capital of", "Paris", "France"), ("Rome is the capital of", "Rome", "Italy"),
            ("Tokyo is in", "Tokyo", "Japan"), ("Paris is the capital of", "Paris", "France")]
    path.write_text("\n".join(json.dumps({"prompt": p, "subject": s, "attribute": a}) for p, s, a in rows) + "\n")
    bank = load_bank(path)
    assert bank.subjects == ("Paris", "Rome", "Tokyo")
    assert bank.templates == ("{} is the capital of", "{} is in")  # most frequent first
    assert load_bank().templates == BUILTIN_TEMPLATES and load_bank().source == "built-in"


def _keys_by_hook(model, tok, layer, texts):
    """The input of layer ``layer``'s down_proj at each text's last token (a plain forward hook)."""
    got = []
    h = model.model.layers[layer].mlp.down_proj.register_forward_hook(lambda m, i, o: got.append(i[0][0, -1]))
    try:
        for t in texts:
            model(input_ids=torch.tensor([tok(t)["input_ids"]]))
    finally:
        h.remove()
    return torch.stack(got).double()


def test_same_relation_probes_are_the_nearest_subjects_in_key_space():
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    bank = Bank(SUBJECTS, ("{} is in", "The capital of {} is", REQ.prompt))
    probes = probe_prompts(ed.adapter, REQ, 1, bank, n_subjects=3, n_templates=5)
    same_rel = [p for p in probes if p.kind == "same relation"]
    # independently: keys at the subject's last token of the prompt (prefix included), cosine, top 3
    prefix_texts = [ed.tokenizer.factedit_prompt_prefix + s for s in ("Eiffel Tower",) + SUBJECTS]
    K = _keys_by_hook(model, ed.tokenizer.factedit_source, 1, prefix_texts)
    sims = torch.nn.functional.cosine_similarity(K[1:], K[:1], dim=-1)
    want = [SUBJECTS[i] for i in sims.argsort(descending=True)[:3].tolist()]
    assert [p.subject for p in same_rel] == want
    assert all(p.prompt == REQ.prompt.replace("{}", p.subject) for p in same_rel)
    same_subj = [p for p in probes if p.kind == "same subject"]
    assert [p.template for p in same_subj] == ["{} is in", "The capital of {} is"]  # the request's own is left out
    assert all(p.subject == "Eiffel Tower" for p in same_subj)


def test_flags_on_hand_written_answers():
    probes = [Probe("A is in", "same subject", "A", "{} is in"), Probe("B is in", "same relation", "B", "{} is in"),
              Probe("C is in", "same relation", "C", "{} is in")]
    fx = compare(probes, ["Paris.", "the city of Rome.", "Berlin."], ["paris", "Rome, Italy.", "Rome."], REQ)
    assert [(r["changed"], r["leaked"]) for r in fx["probes"]] == [(False, False), (True, False), (True, True)]
    assert (fx["probed"], fx["changed"], fx["leaked_target"]) == (3, 2, 1)
    assert [r["role"] for r in fx["probes"]] == ["ripple", "collateral", "collateral"]
    assert fx["flagged"] and fx["flag_rule"] == COLLATERAL_FLAG  # a collateral leak flags the edit


def test_the_edited_subjects_own_consequences_are_ripple_not_leaks():
    """After Eiffel Tower -> Rome, "the Eiffel Tower is located in Rome, Italy" is the edit generalising."""
    probes = [Probe("Eiffel Tower is in", "same subject", "Eiffel Tower", "{} is in"),
              Probe("The Eiffel Tower stands in", "same subject", "Eiffel Tower", "The {} stands in"),
              Probe("Louvre is in", "same relation", "Louvre", "{} is in")]
    fx = compare(probes, ["Paris.", "Paris, France.", "Paris."], ["Rome, Italy.", "Rome.", "Paris."], REQ)
    assert [(r["changed"], r["leaked"], r["carried"]) for r in fx["probes"]] == [
        (True, False, True), (True, False, True), (False, False, False)]
    assert fx["leaked_target"] == 0 and fx["ripple"] == {"probed": 2, "changed": 2, "carried": 2}
    assert fx["collateral"] == {"probed": 1, "changed": 0, "leaked": 0} and not fx["flagged"]
    # the flag counts collateral only: changed answers up to the rule's count, then flagged
    n = COLLATERAL_FLAG["changed"]
    others = [Probe(f"S{i} is in", "same relation", f"S{i}", "{} is in") for i in range(n)]
    for k, want in ((n - 1, False), (n, True)):
        fx = compare(others, ["Paris."] * n, ["Berlin."] * k + ["Paris."] * (n - k), REQ)
        assert fx["collateral"]["changed"] == k and fx["flagged"] is want


def test_edit_report_measures_the_blast_radius_before_and_after(home, tiny_corpus):
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, progress=False)
    bank = Bank(SUBJECTS, ("{} is in", "The capital of {} is"))
    cfg = ed.make_config("r-rome", layer=1, steps=3, stats_corpus=str(tiny_corpus), stats_tokens=600)
    before = greedy_answers(ed.adapter, [REQ.prompt.replace("{}", s) for s in SUBJECTS], 12)
    fact = EditSettings(prompt=REQ.prompt, subject=REQ.subject, target=REQ.target_new, true=REQ.target_true)
    result, report = edit_fact(ed, None, fact, config=cfg, bank=bank)
    fx = report.side_effects
    assert fx["probed"] == 6 + 2 and fx["source"] == "built-in" and result.side_effects is fx
    after_now = greedy_answers(ed.adapter, [p["prompt"] for p in fx["probes"]], 12)
    assert [p["after"] for p in fx["probes"]] == after_now
    by_prompt = dict(zip([REQ.prompt.replace("{}", s) for s in SUBJECTS], before))
    for p in fx["probes"]:
        if p["kind"] == "same relation":
            assert p["before"] == by_prompt[p["prompt"]]
    assert fx["changed"] == sum(p["changed"] for p in fx["probes"])
    assert Patch.from_result(result).meta["side_effects"] == fx  # kept with the patch
    ed.revert()
    assert greedy_answers(ed.adapter, [p["prompt"] for p in fx["probes"]], 12) == [p["before"] for p in fx["probes"]]


def test_cli_reports_side_effects_and_skips_them_on_request(tiny_dir, tiny_corpus, home, capsys):
    base = ["edit", "--model", str(tiny_dir), "--prompt", REQ.prompt, "--subject", "Eiffel Tower", "--target", "Rome",
            "--layer", "1", "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", "--steps", "2", "--json",
            "--allow-unverified"]
    assert main(base) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["side_effects"]["probed"] > 0 and {"changed", "leaked_target"} <= set(out["side_effects"])
    assert main(base + ["--no-side-effects"]) == 0
    assert "side_effects" not in json.loads(capsys.readouterr().out)
    assert main(base + ["--side-effects-bank", "/nonexistent/knowns.json"]) == 2
    assert "knowns.json" in capsys.readouterr().err


def test_strict_refuses_a_flagged_edit_with_exit_2_and_saves_nothing(tiny_dir, tiny_corpus, home, capsys, tmp_path,
                                                                       monkeypatch):
    import factedit.app.side_effects as fx_mod

    monkeypatch.setattr(fx_mod, "COLLATERAL_FLAG", {"changed": 0, "leaked": 0})  # every edit with collateral probes
    patch = tmp_path / "edit.safetensors"
    base = ["edit", "--model", str(tiny_dir), "--prompt", REQ.prompt, "--subject", "Eiffel Tower", "--target", "Rome",
            "--layer", "1", "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", "--steps", "2",
            "--allow-unverified", "--save-patch", str(patch)]
    assert main(base) == 0  # flagged: a warning, the edit kept and saved
    out = capsys.readouterr().out
    assert "WARNING the edit changed what the model says about other subjects" in out and patch.is_file()
    patch.unlink()
    assert main(base + ["--strict"]) == 2
    captured = capsys.readouterr()
    assert "--strict refuses such edits; nothing was saved" in captured.err and not patch.exists()


def test_a_batch_edit_reports_a_sample_of_probes_per_request(tiny_dir, tiny_corpus, home, capsys, tmp_path):
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "{} is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome"},
        {"prompt": "{} is located in the city of", "subject": "Colosseum", "target_new": "Paris"})))
    base = ["edit", "--model", str(tiny_dir), "--requests", str(path), "--method", "memit", "--layers", "1,2",
            "--stats-corpus", str(tiny_corpus), "--stats-tokens", "600", "--steps", "2", "--allow-unverified"]
    assert main(base + ["--json"]) == 0
    fx = json.loads(capsys.readouterr().out)["side_effects"]
    assert [x["request"] for x in fx["requests"]] == ["Eiffel Tower is located in the city of",
                                                       "Colosseum is located in the city of"]
    for x in fx["requests"]:  # the stated sample: 2 other subjects, 2 other relations of the subject
        assert x["collateral"]["probed"] == 2 and x["ripple"]["probed"] == 2
    assert fx["sample"]["subjects"] == 2 and fx["probed"] == 8
    assert fx["collateral"]["changed"] == sum(x["collateral"]["changed"] for x in fx["requests"])
    assert fx["n_flagged"] == sum(x["flagged"] for x in fx["requests"])
    assert main(base) == 0
    assert "side effects (built-in probes; per request 2 other subjects and 2 other relations)" in \
        capsys.readouterr().out
    assert main(base + ["--no-side-effects", "--json"]) == 0
    assert "side_effects" not in json.loads(capsys.readouterr().out)
