"""How many more edits a model takes: the measured curve of a sequential run, and where its trend crosses a
threshold ("how many more edits before known-fact recall drops below 70 %?").

A checkpoint of a sequential run (``downstream.jsonl``) records the earlier edits re-scored, perplexity and
known-fact recall at that number of edits. :func:`capacity` fits the last part of that curve with an
exponential trend (a straight line in log y against the number of edits, least squares) and solves for the
number of edits where the fitted line reaches the threshold; the interval is the inverse of the line's
confidence band (Fieller's interval: every n whose band contains the threshold), at ``level`` with Student's t
on the fit's residual degrees of freedom. A threshold the measured curve already crossed is read off the
measurements instead (interpolated between the two checkpoints around it), with no extrapolation.

    run = load_run("runs/long/emmet")
    est = capacity(run, "recall", threshold=70)
    est.crossing, est.interval   # e.g. 1,640 edits (1,420 – 1,930)
    print(render(est))

What the interval does not cover: a trend that changes shape beyond the measurements (a collapse
accelerates; the exponential fit then over-estimates what is left), and the sampling noise of the quantity
itself beyond the scatter of the checkpoints around the line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .store import RunError

__all__ = ["QUANTITIES", "Quantity", "Estimate", "points", "fit_log_linear", "inverse_band", "t_quantile",
           "capacity", "render", "ascii_chart", "plot_capacity"]


@dataclass(frozen=True)
class Quantity:
    """A quantity a checkpoint records: where it is, how it is shown, which way is worse."""

    name: str
    label: str
    worse: str                                   # "below" (recall, scores) or "above" (perplexity)
    default: Optional[float]                     # the default threshold; None: from the unedited value
    read: Tuple[str, str]                        # (section of the checkpoint record, key)
    scale: float = 100.0                         # record value -> shown value (recall is a fraction, scores percent)


#: the quantities ``factedit capacity --quantity`` takes; defaults are the targets of issue 36 (recall ≥ 70 % of the
#: unedited model's, retention ES ≥ 90, gen-ES ≥ 70, perplexity within +15 % of the unedited model's)
QUANTITIES: Dict[str, Quantity] = {q.name: q for q in (
    Quantity("recall", "known-fact recall (% of the unedited model's)", "below", 70.0, ("ability", "known_recall")),
    Quantity("perplexity", "perplexity (held-out text)", "above", None, ("ability", "perplexity"), 1.0),
    *(Quantity(k.replace("_", "-"), f"{k.replace('_', '-')} of earlier edits re-scored", "below",
               70.0 if k.startswith("gen") else 90.0, ("retention", k), 1.0) for k in
      ("ES", "PS", "NS", "gen_ES", "gen_PS", "gen_NS")),
)}
#: the perplexity threshold without one given: this factor times the unedited model's
PERPLEXITY_FACTOR = 1.15


def points(downstream: Sequence[dict], quantity: Quantity) -> List[Tuple[int, float]]:
    """``(edits, value)`` of every checkpoint that measured ``quantity``, in order of edits (the unedited
    model's checkpoint, edits = 0, included where recorded)."""
    section, key = quantity.read
    out = {}
    for d in downstream:
        v = (d.get(section) or {}).get(key)
        if v is not None and d.get("n_edits") is not None:
            out[int(d["n_edits"])] = quantity.scale * float(v)
    return sorted(out.items())


# ---------------------------------------------------------------------- statistics, pure
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on its distribution
    function, to 1e-10)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while _t_cdf(lo, df) > p:
        lo *= 2.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    while hi - lo > 1e-10 * max(1.0, abs(hi)):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class LineFit:
    """``log y = intercept + slope · n`` fitted by least squares on ``m`` points."""

    intercept: float
    slope: float
    m: int
    mean_n: float
    sxx: float                                   # Σ (n − n̄)²
    s2: float                                    # residual variance, Σ r² / (m − 2); nan when m = 2
    r2: float

    def log_value(self, n: float) -> float:
        return self.intercept + self.slope * n


def fit_log_linear(pts: Sequence[Tuple[float, float]]) -> LineFit:
    """Least squares of ``log y`` on ``n`` over ``pts`` (``(n, y)``, y > 0, at least two distinct n)."""
    if len(pts) < 2 or len({n for n, _ in pts}) < 2:
        raise ValueError("a trend needs at least two checkpoints at different numbers of edits")
    if any(y <= 0 for _, y in pts):
        raise ValueError("an exponential trend needs values above 0")
    ns = [float(n) for n, _ in pts]
    ys = [math.log(y) for _, y in pts]
    m = len(pts)
    mean_n, mean_y = sum(ns) / m, sum(ys) / m
    sxx = sum((n - mean_n) ** 2 for n in ns)
    slope = sum((n - mean_n) * (y - mean_y) for n, y in zip(ns, ys)) / sxx
    intercept = mean_y - slope * mean_n
    rss = sum((y - intercept - slope * n) ** 2 for n, y in zip(ns, ys))
    tss = sum((y - mean_y) ** 2 for y in ys)
    return LineFit(intercept, slope, m, mean_n, sxx, rss / (m - 2) if m > 2 else float("nan"),
                   1.0 - rss / tss if tss > 0 else 1.0)


def inverse_band(fit: LineFit, level_y: float, t: float, start: float = -math.inf) -> Tuple[float, float]:
    """The ``n`` from ``start`` on whose confidence band of the line (± t · s · √(1/m + (n − n̄)²/Sxx)) contains
    ``level_y`` (Fieller's interval), as ``(low, high)`` (the hull of that set; ``high = inf`` when the slope
    is not distinguishable from 0 at that t: the line may then never reach ``level_y``). ``(nan, nan)``:
    no such n."""
    if not math.isfinite(fit.s2):
        return (start, math.inf)
    b = fit.slope
    d = level_y - fit.intercept - b * fit.mean_n           # centred: the band contains level_y where
    qa = b * b - t * t * fit.s2 / fit.sxx                  # qa·u² + qb·u + qc ≤ 0, u = n − n̄
    qb, qc = -2.0 * b * d, d * d - t * t * fit.s2 / fit.m
    u0 = start - fit.mean_n

    def inside(u: float) -> bool:
        return qa * u * u + qb * u + qc <= 0

    disc = qb * qb - 4 * qa * qc
    if qa > 0:                                             # a bounded interval between the roots
        r = math.sqrt(max(disc, 0.0))
        u1, u2 = (-qb - r) / (2 * qa), (-qb + r) / (2 * qa)
        if u2 < u0:
            return (math.nan, math.nan)
        return (fit.mean_n + max(u1, u0), fit.mean_n + u2)
    if qa == 0 or disc <= 0:                               # a half-line or everything
        return (start, math.inf) if inside(u0) or qa < 0 else (math.nan, math.nan)
    r = math.sqrt(disc)                                    # qa < 0: outside the roots
    u1, u2 = sorted(((-qb - r) / (2 * qa), (-qb + r) / (2 * qa)))
    return (start if inside(u0) else fit.mean_n + u2, math.inf)


# ---------------------------------------------------------------------- one run
@dataclass
class Estimate:
    """Where one run's curve of one quantity crosses the threshold."""

    run: str
    quantity: str
    label: str
    worse: str
    threshold: float
    points: List[Tuple[int, float]]
    last_edits: int
    reached: Optional[float] = None              # measured: the edits where the curve crossed (interpolated)
    crossing: Optional[float] = None             # extrapolated: the fitted trend's crossing
    interval: Optional[Tuple[float, float]] = None   # its confidence interval (high may be inf)
    level: float = 0.9
    fit_from: Optional[int] = None               # the first checkpoint of the fit
    fit: Optional[dict] = None                   # intercept, slope, r2, m
    note: str = ""
    more: Optional[float] = None                 # crossing − last_edits

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["points"] = [list(p) for p in self.points]
        d["interval"] = None if self.interval is None else [None if math.isinf(x) else x for x in self.interval]
        return d


def _worse(value: float, threshold: float, worse: str) -> bool:
    return value < threshold if worse == "below" else value > threshold


def capacity(run, quantity: str = "recall", threshold: Optional[float] = None, level: float = 0.9,
             fit_from: Optional[int] = None) -> Estimate:
    """The estimate of ``run`` (a :class:`~factedit.evaluation.summarize.Run`) for ``quantity`` (a key of
    :data:`QUANTITIES`). ``threshold`` defaults to the quantity's (perplexity: 1.15 × the unedited model's,
    which then must have been measured); ``fit_from``: fit the checkpoints from this many edits on (default:
    the later half of the checkpoints after the unedited one, at least three)."""
    if quantity not in QUANTITIES:
        raise RunError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")
    if not 0.5 <= level < 1.0:
        raise RunError(f"--level must be in [0.5, 1), got {level}")
    q = QUANTITIES[quantity]
    pts = points(run.downstream, q)
    if not run.sequential or len([p for p in pts if p[0] > 0]) < 2:
        needs = {"recall": " and --knowns", "perplexity": " and --ppl-corpus"}.get(quantity, "")
        raise RunError(f"{run.path}: a capacity curve needs a sequential run with at least two checkpoints that "
                       f"measured {quantity} (factedit eval --sequential with --checkpoints or --downstream-every"
                       f"{needs})")
    if threshold is None:
        if q.default is not None:
            threshold = q.default
        elif pts[0][0] == 0:
            threshold = PERPLEXITY_FACTOR * pts[0][1]
        else:
            raise RunError(f"{run.path}: no unedited perplexity recorded to set the threshold from; give --threshold")
    if not threshold > 0:
        raise RunError(f"--threshold must be above 0 (the trend is exponential), got {threshold}")
    est = Estimate(run.path.name, quantity, q.label, q.worse, float(threshold), pts, pts[-1][0], level=level)
    for (n0, y0), (n1, y1) in zip(pts, pts[1:]):
        if _worse(y1, threshold, q.worse) and not _worse(y0, threshold, q.worse):
            est.reached = n0 + (n1 - n0) * (threshold - y0) / (y1 - y0)
            est.note = f"measured: crossed between {n0} and {n1} edits"
            return est
    if _worse(pts[0][1], threshold, q.worse):
        est.reached = float(pts[0][0])
        est.note = f"measured: already past the threshold at {pts[0][0]} edits"
        return est
    edited = [p for p in pts if p[0] > 0]
    if fit_from is None:
        k = max(3, (len(edited) + 1) // 2)
        fit_pts = edited[-k:]
    else:
        fit_pts = [p for p in edited if p[0] >= fit_from]
        if len(fit_pts) < 2:
            raise RunError(f"--fit-from {fit_from}: fewer than two checkpoints from there on (the last is at "
                           f"{edited[-1][0]} edits)")
    est.fit_from = fit_pts[0][0]
    try:
        fit = fit_log_linear(fit_pts)
    except ValueError as e:
        raise RunError(f"{run.path}: {e}") from None
    est.fit = {"intercept": fit.intercept, "slope": fit.slope, "r2": fit.r2, "m": fit.m,
               "per_100_edits": math.exp(100 * fit.slope)}
    toward = fit.slope < 0 if q.worse == "below" else fit.slope > 0
    if not toward:
        est.note = "no trend toward the threshold in the fitted checkpoints: no crossing predicted"
        return est
    log_t = math.log(threshold)
    est.crossing = (log_t - fit.intercept) / fit.slope
    est.more = est.crossing - est.last_edits
    if fit.m > 2:
        est.interval = inverse_band(fit, log_t, t_quantile(0.5 + level / 2, fit.m - 2), float(est.last_edits))
        est.note = (f"extrapolated: exponential trend of the {fit.m} checkpoints from {est.fit_from} edits on "
                    f"(×{math.exp(100 * fit.slope):.3f} per 100 edits, R² {fit.r2:.3f})")
        if math.isnan(est.interval[0]):
            est.interval = None
            est.note += "; the trend's band leaves the threshold behind the measurements: no interval"
        elif math.isinf(est.interval[1]):
            est.note += f"; at {level:.0%} the trend may never reach the threshold"
    else:
        est.note = "extrapolated from two checkpoints: no interval (fit more checkpoints)"
    return est


# ---------------------------------------------------------------------- output
def _num(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{x:,.0f}"


def render(est: Estimate) -> str:
    """The answer in words: one or two lines."""
    thr = f"{'drops below' if est.worse == 'below' else 'rises above'} {est.threshold:g}"
    head = f"{est.run}: {est.label} {thr}"
    if est.reached is not None:
        return f"{head}: at about {_num(est.reached)} edits ({est.note})"
    if est.crossing is None:
        return f"{head}: not within the measured {est.last_edits:,} edits ({est.note})"
    iv = "" if est.interval is None else \
        f", {est.level:.0%} interval {_num(est.interval[0])} – {_num(est.interval[1])}"
    return (f"{head}: at about {_num(est.crossing)} edits, {_num(est.more)} more than the {est.last_edits:,} "
            f"measured{iv}\n  ({est.note})")


def _curve(est: Estimate, upto: float, k: int = 40) -> List[Tuple[float, float]]:
    """The fitted trend from its first checkpoint to ``upto`` edits (for charts)."""
    if not est.fit:
        return []
    a, b, n0 = est.fit["intercept"], est.fit["slope"], est.fit_from
    return [(n, math.exp(a + b * n)) for n in (n0 + (upto - n0) * i / k for i in range(k + 1))]


def _x_end(ests: Sequence[Estimate]) -> float:
    """The chart's right edge: the last checkpoint, or a predicted crossing up to 3× further."""
    last = max(e.last_edits for e in ests)
    ends = [min(e.crossing * 1.1, 3 * last) for e in ests if e.crossing is not None]
    return max([last, *ends])


def ascii_chart(ests: Sequence[Estimate], width: int = 64, height: int = 16) -> str:
    """The curves in the terminal: one mark per run at each checkpoint, ``·`` for the fitted trend, ``-`` for the
    threshold."""
    marks = "ox+*#@%&"
    x1 = _x_end(ests)
    ys = [y for e in ests for _, y in e.points] + [e.threshold for e in ests]
    ys += [y for e in ests for _, y in _curve(e, x1)]
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y1 = y0 + 1.0
    grid = [[" "] * width for _ in range(height)]

    def put(n: float, y: float, ch: str, over: bool = True) -> None:
        c = min(width - 1, max(0, round(n / x1 * (width - 1))))
        r = min(height - 1, max(0, round((y1 - y) / (y1 - y0) * (height - 1))))
        if over or grid[r][c] == " ":
            grid[r][c] = ch

    for e in ests:
        for c in range(width):
            put(c / (width - 1) * x1, e.threshold, "-", over=False)
    for e in ests:
        for n, y in _curve(e, x1):
            put(n, y, "·", over=False)
    for i, e in enumerate(ests):
        for n, y in e.points:
            put(n, y, marks[i % len(marks)])
    label_w = max(len(f"{y1:.4g}"), len(f"{y0:.4g}"))
    lines = []
    for r, row in enumerate(grid):
        lab = f"{y1:.4g}" if r == 0 else f"{y0:.4g}" if r == height - 1 else ""
        lines.append(f"{lab:>{label_w}} |{''.join(row)}")
    lines.append(" " * label_w + " +" + "-" * width)
    lines.append(" " * label_w + f"  0{'edits':^{width - 2 - len(_num(x1))}}{_num(x1)}")
    legend = "   ".join(f"{marks[i % len(marks)]} {e.run}" for i, e in enumerate(ests))
    lines.append(f"{legend}   · trend   - threshold")
    return "\n".join(lines)


def plot_capacity(ests: Sequence[Estimate], path) -> Path:
    """One PNG: each run's measured curve, its fitted trend (dashed) to the predicted crossing, the interval
    (a bar at the threshold) and the threshold."""
    from .summarize import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x1 = _x_end(ests)
    for i, e in enumerate(ests):
        color = f"C{i}"
        ax.plot(*zip(*e.points), marker="o", ms=3, color=color, label=e.run)
        curve = _curve(e, x1)
        if curve:
            ax.plot(*zip(*curve), "--", color=color, lw=1)
        if e.interval is not None:
            hi = min(e.interval[1], x1)
            ax.plot([e.interval[0], hi], [e.threshold] * 2, color=color, lw=5, alpha=0.35)
    for thr in sorted({e.threshold for e in ests}):
        ax.axhline(thr, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="edits", ylabel=ests[0].label, title=f"capacity: {ests[0].label}")
    if ests[0].quantity == "perplexity":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
