"""What an edit shows its user, as typed objects with their renderings: :class:`EditReport` (one fact:
the model before and after) and :class:`BatchReport` (a file of requests: per request before and
after). ``to_dict()`` is what ``factedit edit --json`` prints, ``to_text()`` what ``factedit edit``
prints; the web page renders the same objects as HTML (:mod:`factedit.ui.render`).

    report = edit_fact(editor, options, settings)[1]       # factedit.app.edit
    report.before.p_new, report.after.generation, report.verified, report.to_text()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..core.requests import Request

__all__ = ["Snapshot", "EditReport", "BatchReport", "RequestOutcome", "wear_line", "wear_lines"]


@dataclass
class Snapshot:
    """The model at one moment, on one edit's prompts.

    Attributes:
        p_new, p_true: P(new target), P(true target) on the request's prompt (per-token geometric mean;
            ``p_true`` None when the request names no true target).
        generation: the greedy continuation of the request's prompt.
        paraphrase_generations: those of the paraphrases, in order.
        chat_answer: the chat model's answer to the prompt as a user message (models with a chat template
            edited on the raw prompt), else None.
    """

    p_new: float
    p_true: Optional[float]
    generation: str
    paraphrase_generations: List[str]
    chat_answer: Optional[str] = None

    def to_dict(self) -> dict:
        out = {"p_new": self.p_new}
        if self.p_true is not None:
            out["p_true"] = self.p_true
        out.update(generation=self.generation, paraphrase_generations=list(self.paraphrase_generations))
        if self.chat_answer is not None:
            out["chat_answer"] = self.chat_answer
        return out


@dataclass
class EditReport:
    """One edit of one fact: the model before and after, and what the edit did.

    ``request`` is the fact as the user wrote it; ``chat_request`` its chat-turn rendering when the edit was
    made as a chat turn. ``prompts`` are the texts whose continuations are shown (the prompt, then the
    paraphrases). ``side_effects`` is the blast radius (:mod:`factedit.app.side_effects`) when measured.
    ``total_seconds`` (the command, model load included), ``saved`` (files written: ``patch``,
    ``saved_model``) and ``kept`` (the page: whether the edit stayed applied) are filled in by the front end.
    """

    method: str
    model: str
    layers: List[int]
    request: Request
    before: Snapshot
    after: Snapshot
    chat: bool
    chat_request: Optional[Request]
    layer_rule: str
    verified: Optional[bool]
    verification: dict
    retried: bool
    delta_norm: float
    seconds: float
    guard: Optional[dict]
    rounding: Dict[str, float]
    statistics: Dict[str, dict]
    prompt_prefix: str
    timings: Dict[str, float]
    side_effects: Optional[dict] = None
    measured_side_effects: bool = False
    prompts: List[str] = field(default_factory=list)
    dtype: str = ""  # of the edited matrix (the text rendering names it when rounding cost something)
    total_seconds: Optional[float] = None
    saved: Dict[str, str] = field(default_factory=dict)
    kept: Optional[bool] = None
    wear: Dict[str, dict] = field(default_factory=dict)  # per layer: the wear meter (factedit.edit.wear)
    warnings: List[str] = field(default_factory=list)  # the collapse guard's wear warnings (the edit was kept)

    def to_dict(self) -> dict:
        """The JSON object of ``factedit edit --json``."""
        out = {"method": self.method, "model": self.model, "layers": list(self.layers),
               "request": self.request.to_dict(), "before": self.before.to_dict(), "after": self.after.to_dict(),
               "chat": self.chat}
        if self.chat_request is not None:
            out["chat_request"] = self.chat_request.to_dict()
        out.update(layer_rule=self.layer_rule, verified=self.verified, verification=self.verification,
                   retried=self.retried, delta_norm=self.delta_norm, seconds=round(self.seconds, 3), guard=self.guard,
                   rounding=self.rounding, statistics=self.statistics, prompt_prefix=self.prompt_prefix,
                   timings={k: round(v, 3) for k, v in self.timings.items()}, wear=self.wear,
                   warnings=list(self.warnings))
        if self.measured_side_effects:
            out["side_effects"] = self.side_effects
        if self.total_seconds is not None:
            out["total_seconds"] = round(self.total_seconds, 3)
        out.update(self.saved)
        if self.kept is not None:
            out.update(prompts=list(self.prompts), kept=self.kept)
        return out

    def continuations(self) -> List[tuple]:
        """``(prompt, before, after)`` of every continuation shown (the chat answer last, named as such)."""
        rows = [(p, b, a) for p, b, a in zip(self.prompts,
                                              [self.before.generation, *self.before.paraphrase_generations],
                                              [self.after.generation, *self.after.paraphrase_generations])]
        if self.after.chat_answer is not None:
            rows.append(("as a chat turn: " + self.prompts[0], self.before.chat_answer, self.after.chat_answer))
        return rows

    def to_text(self) -> str:
        """What ``factedit edit`` prints."""
        target, true = self.request.target_new, self.request.target_true
        w = max(len(target), len(true or "")) + 4
        lines = [f"factedit {self.method} on {self.model}, layer {', '.join(map(str, self.layers))} "
                 f"({self.layer_rule})" + (", as a chat turn" if self.chat else ""),
                 f"  {'':<{w}} {'before':>8} {'after':>8}",
                 f"  {'P(' + target + ')':<{w}} {self.before.p_new:>8.4f} {self.after.p_new:>8.4f}"]
        if true:
            lines.append(f"  {'P(' + true + ')':<{w}} {self.before.p_true:>8.4f} {self.after.p_true:>8.4f}")
        for p, b, a in self.continuations():
            if p.startswith("as a chat turn: "):
                lines.append(f"\n  as a chat turn (the prompt as the user's message)\n    before: {b.strip()!r}"
                             f"\n    after:  {a.strip()!r}")
            else:
                lines.append(f"\n  {p!r}\n    before: {b.strip()!r}\n    after:  {a.strip()!r}")
        lines += side_effect_lines(self.side_effects, target)
        lines.append(f"\n  ||Δ|| = {self.delta_norm:.3f}   edit {self.seconds:.1f} s "
                     f"(values {self.timings.get('values', 0):.1f} s, statistics {self.timings.get('stats', 0):.1f} s)")
        lines += wear_lines(self.wear, self.warnings)
        worst = max(self.rounding.values(), default=0.0)
        if worst > 1e-4:  # float32 weights round at ~1e-7; only half precision shows here
            lines.append(f"  written in {self.dtype}: {100 * worst:.2f}% of the update's effect on its key lost to "
                         "rounding")
        lines.append("  the edit took: " + ("yes" if self.verified else "NO")
                     + (" (after a retry)" if self.retried else ""))
        return "\n".join(lines)


@dataclass
class RequestOutcome:
    """One request of a batch: P(new) / P(true) before and after, and whether it took (its verification)."""

    prompt: str
    target_new: str
    target_true: Optional[str]
    p_new_before: float
    p_true_before: Optional[float]
    verification: dict

    @property
    def verified(self) -> bool:
        return bool(self.verification["verified"])

    @property
    def p_new(self) -> float:
        return self.verification["p_new"]

    @property
    def p_true(self) -> Optional[float]:
        return self.verification["p_true"]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "target_new": self.target_new, "target_true": self.target_true,
                "p_new_before": self.p_new_before, "p_true_before": self.p_true_before, **self.verification}


@dataclass
class BatchReport:
    """One edit of many requests (one call of a batch method, or a ROME variant's edits one after another):
    efficacy (P(new) > P(true)) before and after, and per request its :class:`RequestOutcome`."""

    method: str
    model: str
    layers: List[int]
    layer_rule: str
    seconds: float
    efficacy: Optional[float]
    efficacy_before: Optional[float]
    verified: Optional[bool]
    requests: List[RequestOutcome]
    delta_norm: float
    timings: Dict[str, float]
    rounding: Dict[str, float]
    statistics: Dict[str, dict]
    prompt_prefix: str
    saved: Dict[str, str] = field(default_factory=dict)
    wear: Dict[str, dict] = field(default_factory=dict)  # per layer: the wear meter (factedit.edit.wear)
    warnings: List[str] = field(default_factory=list)  # the collapse guard's wear warnings (the edit was kept)
    side_effects: Optional[dict] = None  # the blast radius over a sample of probes per request, when measured

    @property
    def n_verified(self) -> int:
        return sum(o.verified for o in self.requests)

    def to_dict(self) -> dict:
        """The JSON object of ``factedit edit --requests FILE --json``."""
        return {"method": self.method, "model": self.model, "layers": list(self.layers), "layer_rule": self.layer_rule,
                "n_requests": len(self.requests), "seconds": round(self.seconds, 3), "efficacy": self.efficacy,
                "efficacy_before": self.efficacy_before, "verified": self.verified, "n_verified": self.n_verified,
                "requests": [o.to_dict() for o in self.requests], "delta_norm": self.delta_norm,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}, "rounding": self.rounding,
                "statistics": self.statistics, "prompt_prefix": self.prompt_prefix, "wear": self.wear,
                "warnings": list(self.warnings), **({"side_effects": self.side_effects} if self.side_effects else {}),
                **self.saved}

    def to_text(self) -> str:
        """What ``factedit edit --requests FILE`` prints."""
        n = len(self.requests)
        eff = "n/a (no target_true)" if self.efficacy is None else f"{self.efficacy_before:.3f} -> {self.efficacy:.3f}"
        lines = [f"factedit {self.method} on {self.model}, layers {self.layers}: {n} requests in {self.seconds:.1f} s",
                 f"  efficacy (P(new) > P(true)): {eff}",
                 f"  took (verified on its own prompt): {self.n_verified} of {n}",
                 f"  ||Δ|| = {self.delta_norm:.3f}", *wear_lines(self.wear, self.warnings)]
        for o in self.requests:
            true = "" if o.p_true is None else f", P(true) {o.p_true:.4f}"
            lines.append(f"  {'ok    ' if o.verified else 'FAILED'} {o.prompt!r} -> {o.target_new!r}: "
                         f"P(new) {o.p_new:.4f}"
                         + true)
        fx = self.side_effects
        if fx:
            c, r, k = fx["collateral"], fx["ripple"], fx["sample"]
            lines += [f"\n  side effects ({fx['source']} probes; per request {k['subjects']} other subjects and "
                      f"{k['templates']} other relations): other subjects {c['changed']} of {c['probed']} answers "
                      f"changed, {c['leaked']} name their request's new target; the edited subjects in other "
                      f"relations {r['changed']} of {r['probed']} changed, {r['carried']} carry the edit"]
            for x in fx["requests"]:
                if x["flagged"]:
                    lines.append(f"  WARNING {x['request']!r} -> {x['target_new']!r} changed what the model says about "
                                 f"other subjects ({x['collateral']['changed']} changed, {x['collateral']['leaked']} "
                                 "naming its target)")
        return "\n".join(lines)


def wear_line(layer: str, w: dict) -> str:
    """One layer's wear in words: the update so far against the matrix, this edit against the earlier ones,
    and the null space left (projection methods)."""
    text = f"layer {layer}: {100 * w['relative']:.2f}% of ‖W‖ moved so far; "
    if w.get("ratio") is None:
        text += "its first edit in this history"
    else:
        text += f"this edit {w['ratio']:.2f}× the median of the {w['edits'] - 1} before it"
    if w.get("room") is not None:
        text += f"; null space left {w['room']} of {w['null_dims']} dimensions"
    return text


def side_effect_lines(fx: Optional[dict], target: str) -> List[str]:
    """The blast radius as report lines: other subjects (collateral: damage, leaks) and the edited subject's
    other relations (ripple: the edit's own consequences), the changed probes, and the flag's warning."""
    if not fx:
        return []
    if "collateral" not in fx:  # a report written before ripple and collateral were told apart
        return [f"\n  side effects ({fx['source']} probes): {fx['changed']} of {fx['probed']} answers changed"]
    c, r = fx["collateral"], fx["ripple"]
    lines = [f"\n  side effects ({fx['source']} probes)",
             f"    other subjects (collateral): {c['changed']} of {c['probed']} answers changed, {c['leaked']} now "
             f"name {target!r}",
             f"    the edited subject in other relations (ripple): {r['changed']} of {r['probed']} changed, "
             f"{r['carried']} now name {target!r}"]
    tag = {(True, False): "LEAK   ", (False, True): "carried"}
    lines += [f"    {tag.get((p['leaked'], p.get('carried', False)), 'changed')} {p['prompt']!r}: "
              f"{p['before'].strip()!r} -> {p['after'].strip()!r}" for p in fx["probes"] if p["changed"]]
    if fx.get("flagged"):
        rule = fx["flag_rule"]
        lines.append(f"  WARNING the edit changed what the model says about other subjects ({c['changed']} answers "
                     f"changed, {c['leaked']} naming {target!r}; flagged at {rule['changed']} changed or "
                     f"{rule['leaked']} naming it): check the probes above, or edit at another layer")
    return lines


def wear_lines(wear: Dict[str, dict], warnings: Sequence[str] = ()) -> List[str]:
    """The wear meter as report lines (none when not measured), then the guard's wear warnings."""
    if not wear:
        return []
    return ["  wear (update of the edited matrices since the history began):"] + [
        f"    {wear_line(layer, w)}" for layer, w in sorted(wear.items(), key=lambda kv: int(kv[0]))] + [
        f"  WARNING {text}" for text in warnings]

