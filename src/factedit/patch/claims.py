"""Does a patch do what it says? Its declared requests replayed on the model it is for.

A patch's metadata (requests, "took: yes", P(new)) is written by whoever made the file, and its
checksums can be recomputed by whoever changes it; only its delta is what it is. Before a patch is
applied (``factedit apply``, the web page's upload) and when it is inspected, each declared request is
scored on the base and on the base with the delta added (temporarily, reverted bit for bit):

* what the patch records of each request after the edit (P(new), whether it took) must be what the delta
  gives, up to rounding (the model is the one the patch was made on: its fingerprints are checked);
* a request the patch says took must take by the rule of :mod:`factedit.edit.verify` (the new target
  greedy or at P ≥ 0.5, and above the true target); one it records nothing about must become more likely;
* the delta must make at least one declared new target more likely: an edit that raises none of its
  targets is not the edit it says (a batch edit may leave some of its requests where they were).

    report = check_claims(adapter, patch)
    report.ok, report.problems, report.rows

A patch whose delta plants something besides its declared edit still passes when the declared edit is
real too: the check says the description is true, not that it is the whole truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

from ..core.requests import Request
from ..edit.verify import verify_requests
from .files import Patch, temporarily_applied

__all__ = ["ClaimReport", "check_claims", "RECORD_RTOL"]

#: how far the recorded P(new) after the edit may be from the replayed one (rounding of a different machine)
RECORD_RTOL = 0.05
#: the least rise of P(new) that counts as "more likely" (relative)
RISE = 1e-3


@dataclass
class ClaimReport:
    """The replay of a patch's declared requests: per request P(new) / P(true) before and after, and what
    contradicts the metadata (``problems``; empty: the claims hold)."""

    rows: List[dict] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    checked: bool = True
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.checked and not self.problems

    def describe(self) -> str:
        if not self.checked:
            return f"claims not checked: {self.reason}"
        if self.ok:
            return f"claims hold: the delta does what the patch says on its {len(self.rows)} declared request(s)"
        return "claims FAIL: " + "; ".join(self.problems)

    def to_dict(self) -> dict:
        return {"checked": self.checked, "ok": self.ok, "reason": self.reason, "problems": list(self.problems),
                "requests": list(self.rows)}


def _adapter_for(adapter, patch: Patch):
    """The adapter reading prompts as the patch's edit did (its recorded prompt prefix)."""
    recorded = patch.meta.get("prompt_prefix")
    if recorded is None or recorded == adapter.prompt_prefix:
        return adapter
    from ..core.arch import ModelAdapter
    from ..core.tokens import source_tokenizer

    return ModelAdapter(adapter.model, source_tokenizer(adapter.tokenizer), adapter.spec, recorded or "none")


def check_claims(adapter, patch: Patch) -> ClaimReport:
    """Replay ``patch``'s declared requests on ``adapter``'s model (which must be the patch's base: its
    fingerprints are checked, as :func:`~factedit.patch.files.apply_patch` does; a different base gives a
    report that says so, ``checked`` False)."""
    from .files import PatchError

    try:
        reqs = [Request(**r) for r in patch.meta.get("requests") or []]
    except (TypeError, ValueError) as e:
        return ClaimReport(problems=[f"its declared requests are malformed ({e})"])
    if not reqs:
        return ClaimReport(problems=["it declares no request"])
    ad = _adapter_for(adapter, patch)
    before = verify_requests(ad, reqs)
    try:
        with temporarily_applied(adapter, [patch]):
            after = verify_requests(ad, reqs)
    except PatchError as e:
        return ClaimReport(checked=False, reason=str(e).split(";")[0])
    recorded = patch.meta.get("verification") or []
    report = ClaimReport()
    rose = 0
    for i, (r, b, a) in enumerate(zip(reqs, before, after)):
        report.rows.append({"prompt": r.text, "target_new": r.target_new, "target_true": r.target_true,
                            "p_new_before": b["p_new"], "p_new_after": a["p_new"], "p_true_before": b["p_true"],
                            "p_true_after": a["p_true"], "verified": a["verified"]})
        what = f"{r.text!r} -> {r.target_new!r}"
        more = a["p_new"] > b["p_new"] * (1 + RISE)
        rose += more
        said = recorded[i] if i < len(recorded) and isinstance(recorded[i], dict) else {}
        if not said and not more:
            report.problems.append(f"the delta does not make {what} more likely (P(new) {b['p_new']:.4g} -> "
                                   f"{a['p_new']:.4g})")
        if said.get("verified") and not a["verified"]:
            report.problems.append(f"it says {what} took, but it does not take (P(new) {a['p_new']:.4g}"
                                   + ("" if a["p_true"] is None else f", P(true) {a['p_true']:.4g}") + ")")
        p_said = said.get("p_new")
        if isinstance(p_said, (int, float)) and not math.isclose(p_said, a["p_new"], rel_tol=RECORD_RTOL,
                                                                  abs_tol=1e-3):
            report.problems.append(f"it records P(new) {p_said:.4g} after the edit for {what}, the delta gives "
                                   f"{a['p_new']:.4g}")
    if not rose:
        report.problems.append("the delta makes none of its declared new targets more likely")
    return report
