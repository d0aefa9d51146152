"""``factedit capacity`` (issue 36): the measured curve of a sequential run and how many more edits before it passes a
threshold. The statistics are checked against closed forms and a brute-force band computed here; the command
against run directories with known curves and against a real run."""

import json
import math

import pytest

from conftest import COUNTERFACT
from factedit.cli import main
from factedit.evaluation.capacity import QUANTITIES, capacity, fit_log_linear, inverse_band, t_quantile
from factedit.evaluation.store import RunError
from factedit.evaluation.summarize import load_run


# ---------------------------------------------------------------------- statistics
@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995])
def test_t_quantile_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-8)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-8)
    assert t_quantile(1 - p, 3) == pytest.approx(-t_quantile(p, 3), rel=1e-8)


def test_t_quantile_tables_and_the_normal_limit():
    assert t_quantile(0.95, 4) == pytest.approx(2.131847, abs=1e-6)  # printed tables
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert t_quantile(0.95, 1e7) == pytest.approx(1.6448536, abs=1e-5)  # the normal quantile
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_an_exact_exponential_is_fitted_exactly():
    pts = [(n, 80 * math.exp(-n / 500)) for n in (100, 200, 400, 700)]
    fit = fit_log_linear(pts)
    assert fit.slope == pytest.approx(-1 / 500) and fit.intercept == pytest.approx(math.log(80))
    assert fit.r2 == pytest.approx(1.0) and fit.s2 == pytest.approx(0.0, abs=1e-20)
    with pytest.raises(ValueError, match="two checkpoints"):
        fit_log_linear([(100, 5.0), (100, 4.0)])
    with pytest.raises(ValueError, match="above 0"):
        fit_log_linear([(100, 5.0), (200, 0.0)])


def _band_set(pts, level_y, t, grid):
    """The n of ``grid`` whose confidence band contains level_y, computed from the textbook formulas directly."""
    ns = [n for n, _ in pts]
    ys = [math.log(y) for _, y in pts]
    m = len(ns)
    nb, yb = sum(ns) / m, sum(ys) / m
    sxx = sum((n - nb) ** 2 for n in ns)
    b = sum((n - nb) * (y - yb) for n, y in zip(ns, ys)) / sxx
    a = yb - b * nb
    s = math.sqrt(sum((y - a - b * n) ** 2 for n, y in zip(ns, ys)) / (m - 2))
    return [n for n in grid if abs(level_y - a - b * n) <= t * s * math.sqrt(1 / m + (n - nb) ** 2 / sxx)]


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
def test_the_interval_is_the_set_of_edits_whose_band_holds_the_threshold(noise):
    wobble = [1, -1, 0.5, -0.3, 0.8, -0.9]
    pts = [(n, 90 * math.exp(-n / 800 + noise * w)) for n, w in zip(range(500, 1100, 100), wobble)]
    fit, t = fit_log_linear(pts), t_quantile(0.95, len(pts) - 2)
    level_y = math.log(20.0)
    grid = [500 + 2 * i for i in range(20000)]
    inside = _band_set(pts, level_y, t, grid)
    lo, hi = inverse_band(fit, level_y, t, 500)
    if math.isinf(hi):  # the slope is not distinguishable from 0: the set reaches the grid's end
        assert inside[-1] == grid[-1] and lo == pytest.approx(inside[0], abs=2)
    else:
        assert lo == pytest.approx(inside[0], abs=2) and hi == pytest.approx(inside[-1], abs=2)
        crossing = (level_y - fit.intercept) / fit.slope
        assert lo < crossing < hi


# ---------------------------------------------------------------------- one run
def _run(tmp_path, curve, name="run", sequential=True, key=("ability", "known_recall")):
    """A run directory whose checkpoints record ``curve`` ({edits: value}) under ``key``."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"compare": {"method": "emmet", "sequential": sequential}}))
    (d / "downstream.jsonl").write_text("".join(json.dumps({"n_edits": n, key[0]: {key[1]: v}}) + "\n"
                                                for n, v in curve.items()))
    return d


def _decay(tau=700.0, start=1.0, ns=range(0, 1100, 100), noise=0.0):
    wobble = [0, 0.4, -0.6, 0.9, -0.2, 0.5, -0.8, 0.3, -0.4, 0.7, -0.5]
    return {n: start * math.exp(-n / tau + noise * w) for n, w in zip(ns, wobble)}


def test_a_threshold_already_crossed_is_read_off_the_measurements(tmp_path):
    run = load_run(_run(tmp_path, _decay()))
    est = capacity(run, "recall", threshold=70)
    pts = dict(est.points)
    assert pts[200] == pytest.approx(100 * math.exp(-200 / 700))  # shown in percent
    n0, n1 = 200, 300  # 75.1 % then 65.1 %
    want = n0 + (n1 - n0) * (70 - pts[n0]) / (pts[n1] - pts[n0])
    assert est.reached == pytest.approx(want) and est.crossing is None and "between 200 and 300" in est.note


def test_an_exponential_trend_is_extrapolated_to_its_crossing(tmp_path):
    run = load_run(_run(tmp_path, _decay(noise=0.02)))
    est = capacity(run, "recall", threshold=10)
    assert est.reached is None and est.fit_from == 600  # the later half: 600 … 1000
    fit = fit_log_linear([(n, v) for n, v in est.points if n >= 600])
    assert est.crossing == pytest.approx((math.log(10) - fit.intercept) / fit.slope)
    assert est.crossing == pytest.approx(700 * math.log(10), rel=0.05)  # the curve's own crossing, 1,612
    assert est.more == pytest.approx(est.crossing - 1000)
    lo, hi = est.interval
    assert 1000 <= lo < est.crossing < hi < math.inf
    wide = capacity(run, "recall", threshold=10, level=0.99).interval
    assert wide[0] <= lo and wide[1] >= hi  # a higher level, a wider interval
    est_all = capacity(run, "recall", threshold=10, fit_from=100)
    assert est_all.fit_from == 100 and est_all.fit["m"] == 10


def test_perplexity_rises_toward_one_point_one_five_times_the_unedited_by_default(tmp_path):
    curve = {n: 30 * math.exp(n / 5000) for n in range(0, 600, 100)}
    run = load_run(_run(tmp_path, curve, key=("ability", "perplexity")))
    est = capacity(run, "perplexity")
    assert est.threshold == pytest.approx(34.5) and est.worse == "above"
    assert est.crossing == pytest.approx(5000 * math.log(1.15), rel=1e-6)
    assert est.interval is not None  # an exact fit: a point interval
    assert est.interval[0] == pytest.approx(est.interval[1], rel=1e-6)


def test_no_trend_toward_the_threshold_predicts_no_crossing(tmp_path):
    curve = {n: 0.9 + 0.01 * (n % 200 == 0) + n / 1e5 for n in range(0, 700, 100)}  # rising recall
    est = capacity(load_run(_run(tmp_path, curve)), "recall", threshold=50)
    assert est.crossing is None and est.reached is None and "no trend" in est.note


@pytest.mark.parametrize("quantity", sorted(QUANTITIES))
def test_every_quantity_reads_its_own_field(tmp_path, quantity):
    q = QUANTITIES[quantity]
    run = load_run(_run(tmp_path, {0: 0.9, 100: 0.8, 200: 0.7}, key=q.read))
    assert [v for _, v in capacity(run, quantity, threshold=1e-3 if q.worse == "below" else 1e3).points] == \
        pytest.approx([q.scale * v for v in (0.9, 0.8, 0.7)])


def test_runs_it_cannot_read_a_curve_from_are_refused(tmp_path):
    with pytest.raises(RunError, match="sequential run with at least two checkpoints"):
        capacity(load_run(_run(tmp_path, _decay(), name="single", sequential=False)), "recall")
    with pytest.raises(RunError, match="at least two checkpoints that measured perplexity"):
        capacity(load_run(_run(tmp_path, _decay(), name="recall_only")), "perplexity")
    run = load_run(_run(tmp_path, _decay(), name="ok"))
    with pytest.raises(RunError, match="--fit-from 1000: fewer than two checkpoints"):
        capacity(run, "recall", threshold=5, fit_from=1000)
    with pytest.raises(RunError, match="unknown quantity"):
        capacity(run, "loss")
    with pytest.raises(RunError, match="--level"):
        capacity(run, "recall", level=1.0)
    with pytest.raises(RunError, match="--threshold must be above 0"):
        capacity(run, "recall", threshold=0)
    late = load_run(_run(tmp_path, {n: 30 * math.exp(n / 5000) for n in range(100, 500, 100)}, name="late",
                         key=("ability", "perplexity")))
    with pytest.raises(RunError, match="no unedited perplexity"):
        capacity(late, "perplexity")


def test_the_choices_of_the_option_are_the_quantities():
    from factedit.app.options import option

    assert tuple(option("quantity").choices) == tuple(QUANTITIES)


# ---------------------------------------------------------------------- the command
def test_cli_prints_the_chart_and_the_answer_and_writes_the_plot(tmp_path, capsys):
    a, b = _run(tmp_path, _decay(noise=0.02), "emmet"), _run(tmp_path, _decay(tau=2000, noise=0.02), "alphaedit")
    plots = tmp_path / "plots"
    assert main(["capacity", str(a), str(b), "--threshold", "20", "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "o emmet   x alphaedit   · trend   - threshold" in out
    for d in (a, b):
        est = capacity(load_run(d), "recall", threshold=20)
        assert (f"{d.name}: known-fact recall (% of the unedited model's) drops below 20: at about "
                f"{est.crossing:,.0f} edits, {est.more:,.0f} more than the 1,000 measured, 90% interval "
                f"{est.interval[0]:,.0f} – {est.interval[1]:,.0f}") in out
    assert 1000 < capacity(load_run(a), "recall", threshold=20).crossing < 1300  # 700 · ln 5 = 1,127 without noise
    assert (plots / "capacity_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["capacity", str(a), "--threshold", "20", "--plots", str(plots), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    est = got["estimates"][0]
    assert est["run"] == "emmet" and est["reached"] is None and len(est["interval"]) == 2
    assert est["points"][0] == [0, 100.0] and got["plot"] == str(plots / "capacity_recall.png")


def test_cli_refuses_a_single_run_with_exit_2_and_writes_nothing(tmp_path, capsys):
    d = _run(tmp_path, _decay(), "single", sequential=False)
    assert main(["capacity", str(d), "--plots", str(tmp_path / "plots")]) == 2
    assert "a capacity curve needs a sequential run" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()
    with pytest.raises(SystemExit) as e:
        main(["capacity", str(d), "--quantity", "loss"])
    assert e.value.code == 2


@pytest.mark.skipif(not COUNTERFACT.is_file(), reason="shared data not found")
def test_cli_reads_the_checkpoints_a_real_sequential_run_wrote(home, tiny_corpus, tmp_path, capsys):
    from factedit import Editor
    from factedit.evaluation import EvalConfig, GenerationConfig, run_eval
    from factedit.evaluation.ability import AbilityConfig
    from tiny import tiny_model

    opts = {"stats_corpus": str(tiny_corpus), "stats_tokens": 2000, "steps": 4, "layers": (1, 2)}
    cfg = EvalConfig(method="memit", dataset=str(COUNTERFACT), limit=4, sequential=True, score_every=2,
                     checkpoints=(2,), retention_sample=2, generation=GenerationConfig(length=0), gen_tokens=2,
                     ability=AbilityConfig(ppl_corpus=str(tiny_corpus), ppl_tokens=200, window=64),
                     method_options=tuple(sorted(opts.items())))
    run_eval(Editor(*tiny_model("llama"), progress=False), cfg, tmp_path / "run")
    down = [json.loads(x) for x in (tmp_path / "run" / "downstream.jsonl").read_text().splitlines()]
    assert main(["capacity", str(tmp_path / "run"), "--quantity", "perplexity", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimates"][0]
    assert est["points"] == [[d["n_edits"], pytest.approx(d["ability"]["perplexity"])] for d in down]
    assert est["threshold"] == pytest.approx(1.15 * down[0]["ability"]["perplexity"])
    assert (tmp_path / "run" / "plots" / "capacity_perplexity.png").is_file()  # inside the run by default
    assert main(["capacity", str(tmp_path / "run"), "--quantity", "ES", "--threshold", "200", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimates"][0]
    assert [p[0] for p in est["points"]] == [d["n_edits"] for d in down if d.get("retention")]
    assert est["reached"] == est["points"][0][0]  # every score is below 200: past it from the first checkpoint
