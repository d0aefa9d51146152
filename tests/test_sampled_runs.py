"""Long sequential runs made affordable (issue 36): every k-th edit scored right after it, checkpoints at listed
edit counts re-scoring a fixed sample, a stop rule for a collapsed model; resumable like any run."""

import json

import pytest

from conftest import COUNTERFACT
from factedit import Editor
from factedit.cli import main
from factedit.evaluation import EvalConfig, GenerationConfig, RunError, run_eval
from factedit.evaluation.ability import AbilityConfig
from tiny import tiny_model

pytestmark = pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
VOLATILE = ("edit_seconds", "score_seconds", "edit_timings", "edit_peak_rss_mib", "seconds")


def _cfg(tiny_corpus, **kw):
    opts = {"stats_corpus": str(tiny_corpus), "stats_tokens": 2000, "steps": 4, "layers": (1, 2)}
    base = dict(method="memit", dataset=str(COUNTERFACT), limit=6, sequential=True, score_every=2,
                checkpoints=(2, 4), retention_sample=2, generation=GenerationConfig(length=0), gen_tokens=4,
                ability=AbilityConfig(ppl_corpus=str(tiny_corpus), ppl_tokens=300, window=64),
                method_options=tuple(sorted(opts.items())))
    base.update(kw)
    return EvalConfig(**base)


def _jsonl(path):
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in path.read_text().splitlines()]


def _editor():
    return Editor(*tiny_model("llama"), progress=False)


def test_every_kth_edit_is_scored_and_the_checkpoints_rescore_a_fixed_sample(home, tiny_corpus, tmp_path):
    ed = _editor()
    s = run_eval(ed, _cfg(tiny_corpus), tmp_path / "run")
    recs = _jsonl(tmp_path / "run" / "cases.jsonl")
    assert len(recs) == 6 and len(ed.history) == 6  # every edit made and committed
    assert [r.get("scored", True) for r in recs] == [True, False, True, False, True, False]
    unedited = json.loads((tmp_path / "run" / "unedited.json").read_text())  # the unedited side of scored edits only
    assert sorted(map(int, unedited)) == [r["case_id"] for r in recs[::2]]
    assert all("ES" in r for r in recs[::2]) and not any("ES" in r for r in recs[1::2])
    assert all(r["verified"] is not None for r in recs)  # verification is not scoring: every edit has it
    assert s["score_every"] == 2 and s["n_scored"] == 3 and "every 2th group" in s["scored"]
    assert s["ES"] == pytest.approx(100 * sum(r["ES"] for r in recs[::2]) / 3)  # over the scored edits only
    down = _jsonl(tmp_path / "run" / "downstream.jsonl")
    assert [d["n_edits"] for d in down] == [0, 2, 4, 6]  # the listed counts, then the end
    ids = [r["case_id"] for r in recs]
    fixed = [ids[0], ids[4]]  # 2 of the scored cases (0, 2, 4), evenly spaced over the run
    assert [d["retention_cases"] for d in down[1:]] == [[fixed[0]], [fixed[0]], fixed]  # the same sample throughout
    assert down[3]["retention"]["n"] == 2
    assert all(d["ability"]["perplexity"] > 0 for d in down)


def test_a_sampled_run_interrupted_anywhere_resumes_to_the_same_records(home, tiny_corpus, tmp_path, monkeypatch):
    cfg = _cfg(tiny_corpus)
    run_eval(_editor(), cfg, tmp_path / "full")
    full = _jsonl(tmp_path / "full" / "cases.jsonl"), _jsonl(tmp_path / "full" / "downstream.jsonl")
    for k in (1, 3, 4):  # die in the k+1-th edit (unscored and scored ones, before and after a checkpoint)
        out = tmp_path / f"cut{k}"
        real, calls = Editor.edit, []

        def dying(self, *a, **kw):
            calls.append(1)
            if len(calls) > k:
                raise KeyboardInterrupt
            return real(self, *a, **kw)

        with monkeypatch.context() as m:
            m.setattr(Editor, "edit", dying)
            with pytest.raises(KeyboardInterrupt):
                run_eval(_editor(), cfg, out)
        run_eval(_editor(), cfg, out)
        assert (_jsonl(out / "cases.jsonl"), _jsonl(out / "downstream.jsonl")) == full, k


def _breaking(tiny_corpus, **kw):
    """Fine-tuning with a large step and no norm bound: edits that wear a trained model down."""
    opts = {"layers": (1, 2), "steps": 10, "lr": 0.05, "norm_constraint": 10.0}
    return _cfg(tiny_corpus, method="ft", method_options=tuple(sorted(opts.items())), **kw)


def _trained(tiny_corpus):
    """The tiny model trained on the perplexity text (deterministic: the same weights every call), so that its
    perplexity there is low and edits raise it (a random model's perplexity is near the vocabulary size, and
    edits lower it as often as not)."""
    import torch

    model, tok = tiny_model("llama")
    ids = torch.tensor([tok(tiny_corpus.read_text())["input_ids"][:256]])
    torch.manual_seed(0)
    params = list(model.parameters())
    frozen = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for q, f in zip(params, frozen):
        q.requires_grad_(f)
    model.eval()
    return Editor(model, tok, progress=False)


def test_the_stop_rule_ends_a_run_at_the_first_checkpoint_past_it(home, tiny_corpus, tmp_path):
    run_eval(_trained(tiny_corpus), _breaking(tiny_corpus), tmp_path / "free")
    down = _jsonl(tmp_path / "free" / "downstream.jsonl")
    ratios = [d["ability"]["perplexity"] / down[0]["ability"]["perplexity"] for d in down]
    first = next((i for i, r in enumerate(ratios) if i and r > 1), None)
    assert first is not None, f"no checkpoint above the unedited perplexity: {ratios}"
    limit = 1 + (ratios[first] - 1) / 2  # crossed at checkpoint `first`, not before it
    assert all(r <= limit for r in ratios[1:first])
    cfg = _breaking(tiny_corpus, stop_ppl=limit)
    s = run_eval(_trained(tiny_corpus), cfg, tmp_path / "stop")
    got = _jsonl(tmp_path / "stop" / "downstream.jsonl")
    stopped_at = down[first]["n_edits"]
    assert [d["n_edits"] for d in got] == [d["n_edits"] for d in down[: first + 1]]
    assert "above" in got[-1]["stopped"] and s["stopped"]["n_edits"] == stopped_at and not s["complete"]
    assert len(_jsonl(tmp_path / "stop" / "cases.jsonl")) == stopped_at
    again = run_eval(_trained(tiny_corpus), cfg, tmp_path / "stop")  # a rerun does not continue a stopped run
    assert again["stopped"] == s["stopped"] and len(_jsonl(tmp_path / "stop" / "cases.jsonl")) == stopped_at


def test_one_batch_scores_a_sample_of_its_cases(home, tiny_corpus, tmp_path):
    """A batch of 6 requests from the original weights, 3 of its cases scored right after it (evenly spaced:
    the first, third and last), with the scores the same cases have in a run that scores all six; the others
    are edited and recorded unscored."""
    one = dict(sequential=False, score_every=1, checkpoints=(), retention_sample=0, ability=AbilityConfig(),
               cases_per_edit=6)
    s = run_eval(_editor(), _cfg(tiny_corpus, score_sample=3, **one), tmp_path / "sample")
    recs = _jsonl(tmp_path / "sample" / "cases.jsonl")
    assert [r.get("scored", True) for r in recs] == [True, False, True, False, False, True]  # 0, round(2.5) = 2, 5
    assert all("ES" not in r for r in recs if r.get("scored") is False)
    assert s["score_sample"] == 3 and s["n_scored"] == 3 and s["n"] == 6 and "3 cases of each edit" in s["scored"]
    unedited = json.loads((tmp_path / "sample" / "unedited.json").read_text())  # only what is ever scored
    assert sorted(map(int, unedited)) == sorted(r["case_id"] for r in recs if r.get("scored", True))
    every = _jsonl_by_id(run_eval(_editor(), _cfg(tiny_corpus, **one), tmp_path / "all") and
                         tmp_path / "all" / "cases.jsonl")
    for r in recs:
        if r.get("scored", True):
            assert r["ES"] == every[r["case_id"]]["ES"] and r["rewrite_lp"] == every[r["case_id"]]["rewrite_lp"]
    assert s["ES"] == pytest.approx(100 * sum(r["ES"] for r in recs if r.get("scored", True)) / 3)


def test_the_batch_table_reads_a_real_batch_run(home, tiny_corpus, tmp_path, capsys):
    """One batch of 6 as the batch-scaling runs make it (sequential, a checkpoint at the batch, 3 cases scored):
    its row in `factedit summarize` counts the scored cases and the verified requests from the records, and takes
    perplexity and known recall from the checkpoint after the batch, the phases from the edit's timings."""
    from factedit.evaluation.summarize import batch_table, load_run

    cfg = _cfg(tiny_corpus, score_every=1, cases_per_edit=6, score_sample=3, checkpoints=(6,), retention_sample=2)
    run_eval(_editor(), cfg, tmp_path / "b")
    raw = [json.loads(l) for l in (tmp_path / "b" / "cases.jsonl").read_text().splitlines()]
    phases = raw[0]["edit_timings"]
    assert {"values", "solve", "verify"} <= set(phases) and all(r["edit_timings"] == phases for r in raw)
    (tmp_path / "b" / "resources.json").write_text(json.dumps({"peak_rss_mib": 1234.4}))
    rows = batch_table([load_run(tmp_path / "b")]).splitlines()
    assert len(rows) == 3  # head, rule, one run
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    row = dict(zip(head, cells))
    down = _jsonl(tmp_path / "b" / "downstream.jsonl")[-1]
    assert row["batch"] == "6" and row["method"] == "memit" and row["scored"] == "3"
    ok = sum(bool(r["verified"]) for r in raw)
    assert row["verified"] == f"{ok} of 6"
    assert row["perplexity"] == f"{down['ability']['perplexity']:.2f}"
    assert row["solve s"] == f"{phases['solve']:.1f}" and row["run peak MiB"] == "1234"
    if raw[0].get("edit_peak_rss_mib") is not None:  # (where the platform can reset the peak)
        assert row["edit peak MiB"] == f"{raw[0]['edit_peak_rss_mib']:.0f}"
    assert float(row["edit s"]) == pytest.approx(sum(r["edit_seconds"] for r in raw), abs=0.51)
    ridged = load_run(tmp_path / "b")  # a run given `--set` options names them beside its method
    ridged.config["compare"]["method_options"]["options"] = [["ridge", "100"]]
    assert "| 6 | memit ridge=100 | 3 |" in batch_table([ridged])
    seq = tmp_path / "seq"  # a run of several edits is not one batch: no row
    run_eval(_editor(), _cfg(tiny_corpus, limit=4, checkpoints=(2,)), seq)
    assert batch_table([load_run(seq)]) == ""
    assert main(["summarize", str(tmp_path / "b"), str(seq)]) == 0
    out = capsys.readouterr().out
    batch_part = out.split("One-batch runs", 1)[1].split("plot:", 1)[0]
    assert batch_part.count("| memit |") == 1 and "| 6 | memit | 3 |" in batch_part  # the batch, not the other run


def test_a_sequential_run_of_batches_scores_a_sample_and_rescores_only_scored_cases(home, tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, score_every=1, cases_per_edit=3, score_sample=2, checkpoints=(3,), retention_sample=3)
    s = run_eval(_editor(), cfg, tmp_path / "run")
    recs = _jsonl(tmp_path / "run" / "cases.jsonl")
    assert [r.get("scored", True) for r in recs] == [True, False, True] * 2 and s["n_scored"] == 4
    assert all(r["verified"] is not None for r in recs)  # verification is not scoring: every edit has it
    scored = [r["case_id"] for r in recs if r.get("scored", True)]
    down = _jsonl(tmp_path / "run" / "downstream.jsonl")
    assert all(set(d["retention_cases"]) <= set(scored) for d in down[1:]) and down[-1]["retention"]["n"] == 3


def _jsonl_by_id(path):
    return {r["case_id"]: r for r in _jsonl(path)}


@pytest.mark.parametrize("change, message", [
    ({"score_sample": 1, "cases_per_edit": 3}, "--score-sample must be 0 (every case) or a whole number >= 2"),
    ({"score_sample": 3, "cases_per_edit": 3}, "--score-sample 3 samples the cases of each edit: it needs "
                                                "--cases-per-edit above it"),
    ({"score_every": 0}, "--score-every must be a whole number >= 1"),
    ({"score_every": 2, "sequential": False, "checkpoints": (), "retention_sample": 0},
     "--score-every is for --sequential runs"),
    ({"checkpoints": (4, 2)}, "--checkpoints must be increasing"),
    ({"checkpoints": (2, 40)}, "--checkpoints 40 is beyond the data: the run has 6 cases"),
    ({"downstream_every": 2}, "either --downstream-every K or --checkpoints"),
    ({"stop_ppl": 0.5}, "--stop-ppl must be a ratio > 1"),
    ({"stop_recall": 0.5}, "--stop-recall needs checkpoints (--checkpoints or --downstream-every) and --knowns"),
    ({"stop_recall": 1.5}, "--stop-recall must be a fraction in"),
])
def test_settings_that_make_no_sense_are_refused_before_any_edit(home, tiny_corpus, tmp_path, change, message):
    with pytest.raises(RunError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_eval(_editor(), _cfg(tiny_corpus, **change), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_refuses_checkpoints_and_batches_beyond_the_data_with_exit_2(tiny_dir, tiny_corpus, home, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", "--model", str(tiny_dir), "--method", "memit", "--dataset", str(COUNTERFACT), "--limit", "3",
                 "--sequential", "--checkpoints", "2,5", "--ppl-corpus", str(tiny_corpus), "--score-every", "2",
                 "--stats-corpus", str(tiny_corpus), "--out", str(out)])
    assert code == 2 and "--checkpoints 5 is beyond the data: the run has 3 cases" in capsys.readouterr().err
    assert not out.exists()
    code = main(["eval", "--model", str(tiny_dir), "--method", "memit", "--dataset", str(COUNTERFACT), "--limit", "3",
                 "--cases-per-edit", "5", "--stats-corpus", str(tiny_corpus), "--out", str(out)])
    assert code == 2 and "--cases-per-edit 5 is larger than the data: the run has 3 cases" in capsys.readouterr().err
    assert not out.exists()
