"""Evaluation runs on tiny models: resumability, sequential vs single-edit semantics, downstream
scoring, summaries, CLI errors."""

import json

import pytest
import torch

from conftest import COUNTERFACT
from factedit import Editor
from factedit.core.fingerprints import matrix_fingerprint
from factedit.evaluation import DownstreamConfig, EvalConfig, GenerationConfig, RunError, run_eval
from factedit.evaluation.downstream import label_logprobs
from tiny import tiny_model

pytestmark = pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
VOLATILE = ("edit_seconds", "score_seconds", "edit_timings", "edit_peak_rss_mib")


def _editor(kind="llama"):
    model, tok = tiny_model(kind)
    return Editor(model, tok, progress=False)


def _cfg(tiny_corpus, method="r-rome", **kw):
    opts = {"stats_corpus": str(tiny_corpus), "stats_tokens": 2000, "steps": 4}
    opts.update({"layers": (1, 2)} if method in ("memit", "emmet", "alphaedit", "rls") else {"layer": 1})
    if method == "alphaedit":  # a tiny random model's keys have no null space at the paper's threshold
        opts["nullspace_threshold"] = 1e9
    base = dict(method=method, dataset=str(COUNTERFACT), limit=4, generation=GenerationConfig(length=24),
                method_options=tuple(sorted(opts.items())))
    base.update(kw)
    return EvalConfig(**base)


def _records(d):
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE}
            for l in (d / "cases.jsonl").read_text().splitlines()]


def _downstream_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    rows = [{"sentence": s, "label": l} for s, l in (("good", 1), ("bad", 0), ("fine", 1), ("awful", 0), ("nice", 1))]
    (d / "sst2.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


class Boom(Exception):
    pass


def _interrupt_after(monkeypatch, k):
    """Make the k+1-th scoring call raise (the process 'dies' in the middle of a run)."""
    import factedit.evaluation.runner as R

    real, calls = R.score_cases, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) > k:
            raise Boom()
        return real(*a, **kw)

    monkeypatch.setattr(R, "score_cases", flaky)


@pytest.mark.parametrize("chunk", [1, 2])
def test_resume_matches_uninterrupted_run(home, tiny_corpus, tmp_path, monkeypatch, chunk):
    cfg = _cfg(tiny_corpus, chunk=chunk)  # chunks of `chunk` cases scored together: one scoring call each
    full = run_eval(_editor(), cfg, tmp_path / "full")
    with monkeypatch.context() as m:
        _interrupt_after(m, 2 // chunk)
        with pytest.raises(Boom):
            run_eval(_editor(), cfg, tmp_path / "cut")
    assert len(_records(tmp_path / "cut")) == 2
    with open(tmp_path / "cut" / "cases.jsonl", "a") as f:
        f.write('{"case_id": 2, "group": 2, "ES"')  # a torn line from a write cut short
    resumed = run_eval(_editor(), cfg, tmp_path / "cut")
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")
    assert [r["case_id"] for r in _records(tmp_path / "full")] == [0, 1, 2, 3]
    assert ({k: resumed[k] for k in ("n", "ES", "PS", "NS", "S", "GE")}
            == {k: full[k] for k in ("n", "ES", "PS", "NS", "S", "GE")})
    again = run_eval(_editor(), cfg, tmp_path / "cut")  # a finished run: nothing to do
    assert again["n"] == 4 and len(_records(tmp_path / "cut")) == 4


def test_resume_refuses_another_configuration(home, tiny_corpus, tmp_path):
    run_eval(_editor(), _cfg(tiny_corpus, limit=2), tmp_path / "r")
    with pytest.raises(RunError, match=r"different configuration \(limit: saved 2, now 1"):
        run_eval(_editor(), _cfg(tiny_corpus, limit=1), tmp_path / "r")  # more cases extend a run; fewer do not
    with pytest.raises(RunError, match=r"different configuration \(gen_tokens: saved"):
        run_eval(_editor(), _cfg(tiny_corpus, limit=2, gen_tokens=3), tmp_path / "r")


def test_single_edits_start_from_original_weights(home, tiny_corpus, tmp_path):
    ed = _editor()
    w0 = ed.adapter.w_out_weight(1).clone()
    run_eval(ed, _cfg(tiny_corpus), tmp_path / "r")
    recs = _records(tmp_path / "r")
    fp0 = matrix_fingerprint(w0)
    assert [r["base_fingerprints"]["model.layers.1.mlp.down_proj"] for r in recs] == [fp0] * 4
    assert all(r["n_edits_before"] == 0 for r in recs)
    assert torch.equal(ed.adapter.w_out_weight(1), w0) and not ed.history


def test_sequential_accumulates_and_resumes(home, tiny_corpus, tmp_path, monkeypatch):
    tasks = _downstream_dir(tmp_path)
    cfg = _cfg(tiny_corpus, sequential=True, downstream_dir=str(tasks), downstream_every=2,
               downstream=DownstreamConfig(tasks=("sst2",), n=2, shots=1))
    ed = _editor()
    w0 = ed.adapter.w_out_weight(1).clone()
    progress = []
    run_eval(ed, cfg, tmp_path / "full", on_group=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # edited groups, committed or waiting for their GE
    recs = _records(tmp_path / "full")
    fps = [r["base_fingerprints"]["model.layers.1.mlp.down_proj"] for r in recs]
    assert fps[0] == matrix_fingerprint(w0) and len(set(fps)) == 4  # each edit sees the previous ones
    assert [r["n_edits_before"] for r in recs] == [0, 1, 2, 3] and len(ed.history) == 4
    down = [json.loads(l) for l in (tmp_path / "full" / "downstream.jsonl").read_text().splitlines()]
    assert [d["n_edits"] for d in down] == [0, 2, 4]
    assert down[0]["retention"] is None and down[2]["retention"]["n"] == 4
    assert set(down[1]["tasks"]) == {"sst2", "mean"}

    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(Boom):
            run_eval(_editor(), cfg, tmp_path / "cut")
    ed2 = _editor()
    run_eval(ed2, cfg, tmp_path / "cut")  # re-applies the 3 saved edits, then does the 4th
    assert _records(tmp_path / "cut") == recs
    assert torch.equal(ed2.adapter.w_out_weight(1), ed.adapter.w_out_weight(1))
    down2 = [json.loads(l) for l in (tmp_path / "cut" / "downstream.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in d.items() if k != "seconds"} for d in down2] == \
        [{k: v for k, v in d.items() if k != "seconds"} for d in down]


def test_retention_sample_is_evenly_spaced_with_both_ends():
    from factedit.evaluation.runner import retention_cases

    cases = list(range(1000))
    got = retention_cases(cases, 50)
    assert len(got) == 50 and got[0] == 0 and got[-1] == 999 and got == sorted(set(got))
    gaps = {b - a for a, b in zip(got, got[1:])}
    assert gaps <= {20, 21}  # 999 / 49 = 20.4: as even as whole positions allow
    assert retention_cases(cases[:7], 3) == [0, 3, 6]
    assert retention_cases(cases[:5], 0) == cases[:5] and retention_cases(cases[:5], 5) == cases[:5]
    assert retention_cases(cases[:5], 9) == cases[:5]


def test_sequential_checkpoint_re_scores_the_sample_on_the_weights_of_that_moment(home, tiny_corpus, tmp_path):
    """With retention_sample 2 the checkpoint after 4 edits re-scores the first and the fourth edit,
    on the final weights: the same scores as scoring those two cases directly then."""
    from factedit.evaluation.datasets import load_cases
    from factedit.evaluation.score_model import score_cases
    from factedit.evaluation.scoring import summarize_records

    cfg = _cfg(tiny_corpus, sequential=True, downstream_every=4, retention_sample=2,
               downstream_dir=str(_downstream_dir(tmp_path)),
               downstream=DownstreamConfig(tasks=("sst2",), n=2, shots=1))
    ed = _editor()
    run_eval(ed, cfg, tmp_path / "run")
    down = [json.loads(l) for l in (tmp_path / "run" / "downstream.jsonl").read_text().splitlines()]
    assert [d["n_edits"] for d in down] == [0, 4]
    cases = load_cases(str(COUNTERFACT), limit=4)
    assert down[1]["retention_cases"] == [cases[0].case_id, cases[3].case_id]
    unedited = {int(k): v for k, v in json.loads((tmp_path / "run" / "unedited.json").read_text()).items()}
    direct = summarize_records(score_cases(ed.adapter, [cases[0], cases[3]], batch_size=cfg.score_batch,
                                           unedited=unedited, gen_tokens=cfg.gen_tokens))
    assert down[1]["retention"]["n"] == 2
    for k in ("ES", "PS", "NS", "gen_ES", "gen_PS", "gen_NS", "gen_leak"):
        assert down[1]["retention"][k] == direct[k], k


def test_runs_in_one_process_share_downstream_accuracy_of_identical_weights(home, tiny_corpus, tmp_path,
                                                                           monkeypatch):
    """Two sequential runs on one Editor: the tasks at 0 edits (same weights) are evaluated once and
    the second run records the same accuracy; after edits they are evaluated again."""
    import factedit.evaluation.runner as R

    calls = []
    real = R.evaluate_tasks
    monkeypatch.setattr(R, "evaluate_tasks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    tasks = _downstream_dir(tmp_path)
    # 9 edits: more weight fingerprints (target memos) than a memo kind keeps, none of them downstream's
    kw = dict(limit=9, sequential=True, downstream_dir=str(tasks), downstream_every=9,
              downstream=DownstreamConfig(tasks=("sst2",), n=2, shots=1), generation=GenerationConfig(length=0))
    ed = _editor()
    run_eval(ed, _cfg(tiny_corpus, **kw), tmp_path / "a")
    assert len(calls) == 2  # at 0 and at 9 edits
    ed.revert(len(ed.history))
    run_eval(ed, _cfg(tiny_corpus, "p-rome", **kw), tmp_path / "b")
    assert len(calls) == 3  # 0 edits: shared; 9 edits (different weights): evaluated
    down = [[json.loads(l) for l in (tmp_path / d / "downstream.jsonl").read_text().splitlines()] for d in "ab"]
    assert down[0][0]["tasks"] == down[1][0]["tasks"] and [d["n_edits"] for d in down[1]] == [0, 9]


def _leaves(state, prefix=()):
    for k, v in state.items():
        yield from (_leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])


@pytest.mark.parametrize("method, extra, keys", [
    ("alphaedit", {}, {(1,), (2,)}),
    ("alphaedit", {"norm_anchor": True, "norm_anchor_samples": 10}, {(1,), (2,), ("anchor",)}),
    ("rls", {}, {(1, "A"), (1, "B"), (2, "A"), (2, "B")}),
], ids=["alphaedit", "alphaedit-norm-anchored", "rls"])
def test_sequential_resume_restores_method_state(home, tiny_corpus, tmp_path, monkeypatch, method, extra, keys):
    """The method state comes back whole after an interruption: AlphaEdit's per-layer key memory, the norm anchor
    kept under a name beside the layers, RLS's per-layer A and B (nested under the layer)."""
    cfg = _cfg(tiny_corpus, method, sequential=True, cases_per_edit=2, generation=GenerationConfig(length=0))
    if extra:
        cfg = _cfg(tiny_corpus, method, sequential=True, cases_per_edit=2, generation=GenerationConfig(length=0),
                   method_options=tuple(sorted({**dict(cfg.method_options), **extra}.items())))
    ed = _editor()
    run_eval(ed, cfg, tmp_path / "full")
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(Boom):
            run_eval(_editor(), cfg, tmp_path / "cut")
    ed2 = _editor()
    run_eval(ed2, cfg, tmp_path / "cut")
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")
    if extra.get("norm_anchor"):  # each record says how its request was anchored; the summary counts the skips
        m, recs = float(ed.state[method]["anchor"][0]), _records(tmp_path / "full")
        assert all(r["anchor"]["anchor"] == m and isinstance(r["anchor"]["skipped"], bool) for r in recs)
        summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
        assert summary["anchored_requests"] == len(recs)
        assert summary["anchor_skipped"] == sum(r["anchor"]["skipped"] for r in recs)
    else:
        assert not any("anchor" in r for r in _records(tmp_path / "full"))
    full, resumed = dict(_leaves(ed.state[method])), dict(_leaves(ed2.state[method]))
    assert set(resumed) == set(full) == keys
    for k in full:
        assert torch.equal(resumed[k], full[k])
    for l in (1, 2):
        assert torch.equal(ed2.adapter.w_out_weight(l), ed.adapter.w_out_weight(l))


@pytest.mark.parametrize("damage", ["missing", "torn", "foreign"])
def test_a_run_whose_method_state_is_missing_or_damaged_is_refused(home, tiny_corpus, tmp_path, monkeypatch, damage):
    """Committed AlphaEdit edits need their key memory to continue: without it (or with a file that is not it)
    the resume stops with a clear error, and the run's files stay as they were."""
    cfg = _cfg(tiny_corpus, "alphaedit", sequential=True, cases_per_edit=2, generation=GenerationConfig(length=0))
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(Boom):
            run_eval(_editor(), cfg, tmp_path / "cut")
    stack = json.loads((tmp_path / "cut" / "patches" / "stack.json").read_text())
    state = tmp_path / "cut" / "patches" / stack["state"]
    if damage == "missing":
        state.unlink()
    elif damage == "torn":
        state.write_bytes(state.read_bytes()[:100])
    else:  # a valid safetensors file holding something else
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(state), metadata={"group": "0", "paths": json.dumps([[1]])})
    before = {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.is_file()}
    with pytest.raises(RunError, match="method state of this run's committed edits is missing or damaged"):
        run_eval(_editor(), cfg, tmp_path / "cut")
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.is_file()} == before


def test_a_run_whose_patch_stack_was_lost_starts_again(home, tiny_corpus, tmp_path):
    """Records and checkpoints kept without the patch stack (as the batch methods' long runs are kept in
    the repository): the run cannot re-apply its edits, so it drops them and its checkpoints and starts
    again, ending exactly as an uninterrupted run."""
    import shutil

    tasks = _downstream_dir(tmp_path)
    cfg = _cfg(tiny_corpus, "memit", sequential=True, cases_per_edit=2, downstream_dir=str(tasks), downstream_every=2,
               downstream=DownstreamConfig(tasks=("sst2",), n=2, shots=1), generation=GenerationConfig(length=0))
    ed = _editor()
    run_eval(ed, cfg, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "lost")
    shutil.rmtree(tmp_path / "lost" / "patches")
    ed2 = _editor()
    run_eval(ed2, cfg, tmp_path / "lost")
    assert _records(tmp_path / "lost") == _records(tmp_path / "full")

    def strip(d):
        return [{k: v for k, v in json.loads(l).items() if k != "seconds"}
                for l in (d / "downstream.jsonl").read_text().splitlines()]

    assert strip(tmp_path / "lost") == strip(tmp_path / "full")  # each checkpoint once, measured again
    for l in (1, 2):
        assert torch.equal(ed2.adapter.w_out_weight(l), ed.adapter.w_out_weight(l))


def test_batch_method_edits_groups(home, tiny_corpus, tmp_path):
    run_eval(_editor(), _cfg(tiny_corpus, "memit", cases_per_edit=3, generation=GenerationConfig(length=0)),
             tmp_path / "m")
    recs = _records(tmp_path / "m")
    assert [r["group"] for r in recs] == [0, 0, 0, 1]
    assert recs[0]["delta_norm"] == recs[2]["delta_norm"] != recs[3]["delta_norm"]
    assert len(recs[0]["base_fingerprints"]) == 2 and "GE" not in recs[0]


def test_inconsistent_settings_are_refused():
    for kw, msg in ((dict(method="r-rome", cases_per_edit=2), "one case at a time"),
                    (dict(method="none", sequential=True), "needs an editing method"),
                    (dict(downstream_every=5), "needs --sequential"),
                    (dict(sequential=True, downstream_every=5), "needs something to measure: --downstream DIR"),
                    (dict(method="nope"), "unknown method"),
                    (dict(chunk=0), "--chunk and --target-batch must be >= 1"),
                    (dict(prefetch_batch=0), "--chunk and --target-batch must be >= 1"),
                    (dict(retention_sample=-1), "--retention-sample must be a whole number >= 0"),
                    (dict(retention_sample=1), "cannot hold the first and the latest"),
                    (dict(retention_sample=5), r"--retention-sample needs checkpoints \(--downstream-every")):
        with pytest.raises(RunError, match=msg):
            EvalConfig(dataset="x", **kw).check()


def test_label_logprobs_match_hand_computation():
    """Each label's summed log-prob after the prompt, from a plain forward per (prompt, label): the
    one-forward path (single-token labels) and the teacher-forced path (multi-token labels) agree with it."""
    from factedit.core.tokens import encode_with_target

    ed = _editor("gpt2")
    tok = ed.tokenizer
    prompts = ["Review: good\nSentiment:", "The capital of Japan is Tokyo. Answer:"]
    demos = "Review: bad\nSentiment: Paris\n\n"  # a shared prefix: run once, reused through the KV cache
    cases = [(labels, prefix) for labels in (("Paris", "city", "the"), ("xylophone", "quartz"))
             for prefix in ("", demos)]
    for labels, prefix in cases:
        full = [prefix + p for p in prompts]
        got = label_logprobs(ed.adapter, full, labels, batch_size=2)  # padded batches
        for i, p in enumerate(full):
            for j, lab in enumerate(labels):
                ids, idx = encode_with_target(tok, p, lab)
                with torch.no_grad():
                    logp = torch.log_softmax(ed.model(input_ids=torch.tensor([ids])).logits[0], -1)
                ref = sum(float(logp[k - 1, ids[k]]) for k in idx)
                assert float(got[i, j]) == pytest.approx(ref, abs=1e-4)
    from factedit.evaluation.downstream import MIN_SHARED_PREFIX, _common_prefix

    assert _common_prefix([tok(demos + p)["input_ids"] for p in prompts]) >= MIN_SHARED_PREFIX  # cache path taken
    assert len(encode_with_target(tok, prompts[0], "city")[1]) == 1  # the first set takes the one-forward path
    assert len(encode_with_target(tok, prompts[0], "quartz")[1]) > 1  # the second is teacher-forced


def test_downstream_accuracy_counts_argmax_labels(monkeypatch, tmp_path):
    import factedit.evaluation.downstream as D

    task = D.load_task(_downstream_dir(tmp_path), "sst2", n=4, shots=1)
    # hand-made scores: examples are good(1), bad(0), fine(1), awful(0) minus the demo; predict 1 for all
    monkeypatch.setattr(D, "label_logprobs", lambda a, p, l, b=16: torch.tensor([[0.0, 1.0]] * len(p)))
    res = D.evaluate_task(None, task)
    gold = [l for _, l in task.examples]
    assert res["predictions"] == [1] * len(gold) and res["accuracy"] == sum(gold) / len(gold)


def test_summarize_table_and_plots(home, tiny_corpus, tmp_path, capsys):
    from factedit.cli import main

    tasks = _downstream_dir(tmp_path)
    run_eval(_editor(), _cfg(tiny_corpus, "none", limit=2, generation=GenerationConfig(length=0)), tmp_path / "base")
    run_eval(_editor(), _cfg(tiny_corpus, limit=3, sequential=True, downstream_dir=str(tasks), downstream_every=1,
                             downstream=DownstreamConfig(tasks=("sst2",), n=2, shots=1),
                             generation=GenerationConfig(length=0)), tmp_path / "seq")
    code = main(["summarize", str(tmp_path / "base"), str(tmp_path / "seq"), "--plots", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("| run | method | mode | n | ES | PS | NS | S |")
    assert (lines[2].startswith("| base | none | single | 2 |")
            and lines[3].startswith("| seq | r-rome | sequential | 3 |"))
    seq_head = next(i for i, l in enumerate(lines) if l.startswith("| run | method | edits | ES after edit"))
    head = [c.strip(" |") for c in lines[seq_head].split(" | ")]
    row = lines[seq_head + 2].split(" | ")
    cell = dict(zip(head, (c.strip(" |") for c in row)))
    assert lines[seq_head + 3] == "" and lines[seq_head + 4] == "Checkpoints of seq:"  # only the sequential run
    down = [json.loads(l) for l in (tmp_path / "seq" / "downstream.jsonl").read_text().splitlines()]
    ck = lines[seq_head + 6: seq_head + 6 + 2 + len(down)]
    ck_head = [c.strip(" |") for c in ck[0].split(" | ")]
    assert ck_head[:8] == ["edits", "ES", "PS", "NS", "gen-ES", "gen-PS", "gen-NS", "gen leak"]
    assert "perplexity" not in ck_head and "downstream mean" in ck_head  # nothing measured: no column
    for d, line in zip(down, ck[2:]):  # one row per checkpoint, its retention re-scored on all earlier edits
        c = dict(zip(ck_head, (x.strip(" |") for x in line.split(" | "))))
        assert c["edits"] == str(d["n_edits"]) and c["downstream mean"] == f"{100 * d['tasks']['mean']:.1f}"
        assert c["ES"] == ("–" if d["retention"] is None else f"{d['retention']['ES']:.1f}")
        assert c["re-scored"] == ("–" if d["retention"] is None else "all")
    assert lines[seq_head + 6 + 2 + len(down)] == "" or lines[seq_head + 6 + 2 + len(down)].startswith("plot: ")
    assert row[0] == "| seq" and row[2] == "3" and row[4] == f"{down[-1]['retention']['ES']:.1f}"
    assert cell["downstream mean at 0"] == f"{100 * down[0]['tasks']['mean']:.1f}"
    assert cell["downstream mean at end"] == f"{100 * down[-1]['tasks']['mean']:.1f}"
    assert cell["gen-ES at end"] == f"{down[-1]['retention']['gen_ES']:.1f}"  # generation-based retention
    assert row[7] == "–"  # GE not sampled (length 0)
    from factedit.evaluation.summarize import load_run, score_panels

    assert score_panels([load_run(tmp_path / "seq")]) == [("ES", "gen_ES"), ("PS", "gen_PS"), ("NS", "gen_NS")]
    for name in ("sequential_scores.png", "sequential_downstream.png", "sequential_delta_norm.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["summarize", str(tmp_path / "base"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["method"] == "none"


def test_cli_errors_exit_2(tmp_path, capsys):
    from factedit.cli import main

    assert main(["eval", "--method", "rome", "--cases-per-edit", "4", "--dataset", str(COUNTERFACT),
                 "--out", str(tmp_path / "x")]) == 2
    assert "one case at a time" in capsys.readouterr().err
    assert main(["summarize", str(tmp_path)]) == 2
    assert "not an evaluation run" in capsys.readouterr().err


def test_summarize_mode_names_the_batch_size(tmp_path):
    from factedit.evaluation.summarize import Run

    def mode(**compare):
        return Run(tmp_path, {"compare": compare}, {}, [], []).mode

    assert mode(cases_per_edit=25) == "single, batches of 25"
    assert mode(cases_per_edit=10, sequential=True) == "sequential, batches of 10"
    assert mode(cases_per_edit=1, sequential=True) == "sequential" and mode() == "single"
    assert mode(batch_size=25) == "single, batches of 25"  # runs written before the option was renamed


def test_cli_eval_set_reaches_the_method_config(tiny_dir, home, tmp_path, capsys):
    from factedit.cli import main

    out = tmp_path / "ft"
    argv = ["eval", "--method", "ft", "--model", str(tiny_dir), "--dataset", str(COUNTERFACT), "--limit", "1",
            "--ge-length", "0", "--set", "norm_constraint=0.01", "--set", "lr=1e-3", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    compare = json.loads((out / "config.json").read_text())["compare"]
    assert compare["method_config"]["norm_constraint"] == 0.01 and compare["method_config"]["lr"] == 1e-3
    assert compare["method_options"]["options"] == [["norm_constraint", "0.01"], ["lr", "1e-3"]]
    record = json.loads((out / "cases.jsonl").read_text().splitlines()[0])
    assert 0 < record["delta_norm"] <= 0.01  # ‖Δ‖/numel ≤ the L∞ bound
    assert main(argv[:-4] + ["--set", "norm_constraint=1", "--out", str(out)]) == 2  # a different config: no resume
    assert "holds a run with a different configuration (method_config" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert main(argv[:-4] + ["--set", "norm_constrain=1", "--out", str(bad)]) == 2
    assert "has no option 'norm_constrain'" in capsys.readouterr().err and not bad.exists()


@pytest.mark.parametrize("sequential", [False, True])
def test_a_case_whose_edit_raised_is_a_failure_in_every_score(home, tiny_corpus, tmp_path, monkeypatch, sequential):
    """An edit that raises (a request the method cannot edit) counts: in n, in `errors`, and as 0 in
    ES, PS, NS (and so in S), in single-edit and sequential runs alike."""
    from factedit.core.errors import RequestError

    ed = _editor()
    cfg = _cfg(tiny_corpus, sequential=sequential, generation=GenerationConfig(length=0))
    run_eval(ed, cfg, tmp_path / "ok")
    if sequential:
        ed.revert(len(ed.history))
    real_compute, real_edit = ed.compute, ed.edit
    bad_subject = json.loads(COUNTERFACT.read_text(encoding="utf-8").splitlines()[1])["subject"]

    def failing(real):
        def call(requests, *a, **kw):
            if any(r.subject == bad_subject for r in requests):
                raise RequestError("injected: this request cannot be edited")
            return real(requests, *a, **kw)
        return call

    monkeypatch.setattr(ed, "compute", failing(real_compute))
    monkeypatch.setattr(ed, "edit", failing(real_edit))
    s = run_eval(ed, cfg, tmp_path / "bad")
    recs = {r["case_id"]: r for r in _records(tmp_path / "bad")}
    assert s["n"] == 4 and s["errors"] == 1 and sum("error" in r for r in recs.values()) == 1
    good = [r for r in _records(tmp_path / "ok") if r["request"]["subject"] != bad_subject]
    for key in ("ES", "PS", "NS"):  # the other three cases score as in the clean run; the failure adds 0
        assert s[key] == pytest.approx(100 * sum(r[key] for r in good) / 4), key
    assert s["S"] is not None


def test_every_run_states_its_mode_in_one_line(home, tiny_corpus, tmp_path, capsys):
    from factedit.cli import main
    from factedit.evaluation.runner import mode_text

    assert mode_text(False, 1) == "each case edited alone on the original weights (reverted after scoring)"
    assert mode_text(False, 4).startswith("cases edited in batches of 4, each batch on the original weights")
    assert mode_text(True, 1).startswith("cases edited one by one, accumulated")
    assert mode_text(True, 10).startswith("cases edited in batches of 10, accumulated")
    summary = run_eval(_editor(), _cfg(tiny_corpus, "memit", limit=4, cases_per_edit=2, sequential=True,
                                       generation=GenerationConfig(length=0)), tmp_path / "run")
    assert summary["mode"] == mode_text(True, 2)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["mode"] == mode_text(True, 2)
    assert main(["summarize", str(tmp_path / "run"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    runs = got["runs"] if isinstance(got, dict) else got  # with plots: {"runs", "plots"}
    assert runs[0]["mode"] == mode_text(True, 2)


def _same_up_to_rounding(a, b, rel: float = 1e-5) -> bool:
    """Records equal field by field, floats within ``rel`` (relative; 1e-7 absolute near zero)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=rel, abs=1e-7)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_up_to_rounding(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same_up_to_rounding(x, y, rel) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("sequential", [False, True])
def test_a_run_extended_to_more_cases_continues_as_if_run_at_once(home, tiny_corpus, tmp_path, sequential):
    """A larger --limit on an existing run continues it over the new cases (config.json records the extension);
    the records equal those of one run over all of them."""
    kw = dict(sequential=sequential, generation=GenerationConfig(length=0), gen_tokens=4)
    run_eval(_editor(), _cfg(tiny_corpus, limit=2, **kw), tmp_path / "grown")
    first = _records(tmp_path / "grown")
    s = run_eval(_editor(), _cfg(tiny_corpus, limit=4, **kw), tmp_path / "grown")
    run_eval(_editor(), _cfg(tiny_corpus, limit=4, **kw), tmp_path / "whole")
    grown = _records(tmp_path / "grown")
    # one by one, the new cases are scored in a batch of their own, not beside the first ones: their log-probs
    # can differ by the rounding of batched float32 products (seen on an AMD EPYC: 1e-7 relative)
    assert grown[:2] == first and _same_up_to_rounding(grown, _records(tmp_path / "whole")) and s["n"] == 4
    saved = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert saved["compare"]["limit"] == 4 and [(e["from"], e["to"]) for e in saved["extended"]] == [(2, 4)]
    with pytest.raises(RunError, match="can be extended to more cases, not cut to fewer"):
        run_eval(_editor(), _cfg(tiny_corpus, limit=3, **kw), tmp_path / "grown")


def test_a_run_whose_last_batch_would_change_is_not_extended(home, tiny_corpus, tmp_path):
    kw = dict(cases_per_edit=2, generation=GenerationConfig(length=0), gen_tokens=4)
    run_eval(_editor(), _cfg(tiny_corpus, "memit", limit=3, **kw), tmp_path / "run")
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(RunError, match="--limit 3, not a whole number of groups of 2 cases"):
        run_eval(_editor(), _cfg(tiny_corpus, "memit", limit=4, **kw), tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_a_batch_leaves_out_a_prompt_asked_again_as_a_failure(home, tiny_corpus, tmp_path):
    """CounterFact asks a few prompts twice with other answers. A batch method writes one answer per prompt, so an
    evaluation batch holding both leaves the later case out, recorded as a failed edit with why, instead of the
    whole batch failing; the cases it keeps are edited and scored exactly as in a batch without the repeats.
    Fine-tuning, which has no such rule, edits them all."""
    lines = COUNTERFACT.read_text(encoding="utf-8").splitlines()[:4]
    recs = [json.loads(l) for l in lines]
    contra = dict(recs[1], case_id=4, target_new="Buddhism")  # the prompt of case 1, another answer
    dup = dict(recs[2], case_id=5)  # case 2 again, the same answer
    data = tmp_path / "repeats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs + [contra, dup]), encoding="utf-8")
    gen = GenerationConfig(length=0)
    s = run_eval(_editor(), _cfg(tiny_corpus, "memit", dataset=str(data), limit=6, cases_per_edit=6, generation=gen),
                 tmp_path / "six")
    got = {r["case_id"]: r for r in _records(tmp_path / "six")}
    assert s["n"] == 6 and s["errors"] == 2 and s["left_out"] == 2
    assert got[4]["left_out"] and "contradictory requests in one batch" in got[4]["error"]
    assert "case 1 asks it first" in got[4]["error"] and "'Buddhism'" in got[4]["error"]
    assert got[5]["left_out"] and "duplicate requests" in got[5]["error"] and "ES" not in got[5]
    run_eval(_editor(), _cfg(tiny_corpus, "memit", dataset=str(data), limit=4, cases_per_edit=4, generation=gen),
             tmp_path / "four")
    clean = {r["case_id"]: r for r in _records(tmp_path / "four")}
    for i in range(4):  # the same batch of four requests: the same update, the same scores
        assert got[i]["rewrite_lp"] == clean[i]["rewrite_lp"] and got[i]["delta_fro"] == clean[i]["delta_fro"]
    assert s["ES"] == pytest.approx(100 * sum(clean[i]["ES"] for i in range(4)) / 6)  # the two count as 0
    ft = run_eval(_editor(), _cfg(tiny_corpus, "ft", dataset=str(data), limit=6, cases_per_edit=6, generation=gen),
                  tmp_path / "ft")
    assert ft["errors"] == 0 and "left_out" not in ft
