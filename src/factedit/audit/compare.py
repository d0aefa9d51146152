"""Compare a suspect checkpoint with its base, tensor by tensor, and say which differences are edits.

    report = audit_models("base/", "suspect/")          # AuditReport: verdict, findings, edits
    report.to_dict()                                     # what `factedit audit --json` prints

Streaming: the two models are read a block of rows of one tensor pair at a time
(:func:`~factedit.audit.spectrum.classify`); what is kept is each tensor's finding and, for a low-rank update,
its factors. Then, per decoder layer, the changes beyond rounding are grouped:

* a layer where **only the MLP output matrix W_out** changed, by a low-rank update, is an edit layer (what
  ROME, MEMIT, EMMET, AlphaEdit, UltraEdit and BadEdit-style attacks write); consecutive edit layers are one
  **edit** (MEMIT-style spans), up to :data:`MAX_SPAN` layers;
* anything else that changed — other matrices of a layer, embeddings, norms, a span of W_out updates longer
  than an edit's (a LoRA fine-tune restricted to W_out) — is a change that is not an edit, reported as found.

Verdict: ``"edited"`` when there is at least one edit, ``"changed, not an edit"`` when something changed beyond
rounding but no edit, ``"not edited"`` when every tensor is identical or within a format's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..core.arch import ARCH_SPECS
from .spectrum import DEFAULT_MAX_RANK, Finding, classify
from .tensors import AuditError, TensorFiles

__all__ = ["AuditReport", "Edit", "audit_models", "audit_files", "MAX_SPAN", "VERDICTS"]

#: the longest run of consecutive W_out updates still called one edit (MEMIT spans 5 layers, UltraEdit 6)
MAX_SPAN = 10
VERDICTS = ("edited", "changed, not an edit", "not edited")


@dataclass
class Edit:
    """Low-rank updates of W_out in consecutive layers and nothing else in those layers."""

    layers: List[int]
    findings: List[Finding]  # one per layer, in layer order
    modules: Dict[int, str]  # layer -> W_out module name (as a patch names it)
    explanation: Optional[object] = None  # an audit.explain.Explanation once explained

    @property
    def rank(self) -> int:
        return max(f.rank for f in self.findings)

    @property
    def norm(self) -> float:
        return sum(f.norm ** 2 for f in self.findings) ** 0.5

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "rank": self.rank, "norm": self.norm,
                "tensors": [f.name for f in self.findings],
                "ranks": {str(l): f.rank for l, f in zip(self.layers, self.findings)},
                "energy": {str(l): f.energy for l, f in zip(self.layers, self.findings)},
                **(self.explanation.to_dict() if self.explanation is not None else {})}


@dataclass
class AuditReport:
    base: str
    suspect: str
    model_type: Optional[str]
    findings: List[Finding]
    edits: List[Edit]
    other: List[Finding]  # changes beyond rounding that are not part of an edit
    notes: List[str] = field(default_factory=list)
    fan_in_fan_out: bool = False

    @property
    def verdict(self) -> str:
        if self.edits:
            return "edited"
        return "changed, not an edit" if self.other else "not edited"

    def counts(self) -> Dict[str, int]:
        out = {k: 0 for k in ("identical", "rounding", "low_rank", "dense")}
        for f in self.findings:
            out[f.kind] += 1
        return out

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "base": self.base, "suspect": self.suspect, "model_type": self.model_type,
                "counts": self.counts(), "tensors": [f.to_dict() for f in self.findings],
                "edits": [e.to_dict() for e in self.edits], "other_changes": [f.to_dict() for f in self.other],
                "notes": list(self.notes)}

    def to_text(self) -> str:
        c = self.counts()
        lines = [f"factedit audit: {self.verdict}",
                 f"  base {self.base}", f"  suspect {self.suspect}",
                 f"  {len(self.findings)} tensors: {c['identical']} identical, {c['rounding']} within a format's "
                 f"rounding, {c['low_rank']} low-rank updates, {c['dense']} dense changes"]
        formats = sorted({f.rounding for f in self.findings if f.rounding})
        if formats:
            lines.append(f"  rounding explained by: {', '.join(formats)} round trips")
        for i, e in enumerate(self.edits, 1):
            lines.append(f"\n  edit {i}: W_out of layer{'s' if len(e.layers) > 1 else ''} "
                         f"{', '.join(map(str, e.layers))}, rank {e.rank}, ‖Δ‖ {e.norm:.4g}")
            for l, f in zip(e.layers, e.findings):
                sv = ", ".join(f"{x:.3g}" for x in f.singular_values[:min(4, f.rank + 1)])
                lines.append(f"    layer {l}: {f.name} rank {f.rank} ({100 * f.energy:.2f}% of ‖Δ‖²), "
                             f"‖Δ‖/‖W‖ {f.relative:.3g}, singular values {sv} (noise {f.noise:.2g})")
            if e.explanation is not None:
                lines += _explanation_lines(e.explanation)
        if self.other:
            lines.append(f"\n  changes that are not edits ({len(self.other)}):")
            for f in self.other[:20]:
                what = f"rank {f.rank}" if f.kind == "low_rank" else "dense"
                lines.append(f"    {f.name}: {what}, ‖Δ‖/‖W‖ {f.relative:.3g}")
            if len(self.other) > 20:
                lines.append(f"    ... and {len(self.other) - 20} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _explanation_lines(x) -> List[str]:
    subj = ", ".join(f"{d['text']} ({d['score']:.3f})" for d in x.subjects[:5])
    lines = [f"    subjects (keys matched as {x.hypothesis}): {subj}"]
    if x.new_objects:
        lines.append("    now says: " + ", ".join(f"{d['text']!r}" for d in x.new_objects[:3])
                     + "; instead of: " + ", ".join(f"{d['text']!r}" for d in x.old_objects[:3]))
    for ev in x.evidence[:5]:
        lines.append(f"      {ev['prompt']!r}: base {ev['base']!r}, suspect {ev['suspect']!r}")
    if not x.evidence:
        lines.append("    no probed prompt of the top subjects answers differently (the subject may be outside the "
                     "candidates: give --subjects FILE)")
    return lines


def _layer_of(name: str, prefix: str) -> Optional[int]:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _check_pair(base: TensorFiles, suspect: TensorFiles) -> List[str]:
    if base.model_type != suspect.model_type:
        raise AuditError(f"the models are of different architectures ({base.model_type} and "
                         f"{suspect.model_type}): an audit compares a checkpoint with the model it was made from")
    if base.config.get("vocab_size") != suspect.config.get("vocab_size"):
        raise AuditError(f"the vocabularies differ ({base.config.get('vocab_size')} and "
                         f"{suspect.config.get('vocab_size')} tokens): not the same base model")
    b, s = set(base.names), set(suspect.names)
    tied = {"lm_head.weight"} if base.config.get("tie_word_embeddings") or suspect.config.get(
        "tie_word_embeddings") else set()
    only = sorted((b ^ s) - tied)
    if only:
        side = "base" if only[0] in b else "suspect"
        raise AuditError(f"the models hold different tensors: {only[0]} is only in the {side}"
                         + (f" (and {len(only) - 1} more)" if len(only) > 1 else ""))
    for name in sorted(b & s):
        if base.shape(name) != suspect.shape(name):
            raise AuditError(f"tensor {name} has shape {base.shape(name)} in the base and {suspect.shape(name)} in the "
                             "suspect: not the same architecture")
    return sorted(b & s)


def audit_files(base: TensorFiles, suspect: TensorFiles, max_rank: int = DEFAULT_MAX_RANK,
                max_span: int = MAX_SPAN, progress: bool = False) -> AuditReport:
    """Compare two opened models (:class:`~factedit.audit.tensors.TensorFiles`)."""
    names = _check_pair(base, suspect)
    spec = ARCH_SPECS.get(base.model_type)
    notes = []
    if spec is None:
        notes.append(f"model_type {base.model_type!r} has no known layout here: every change is listed, none is "
                     "grouped into edits")
    findings = []
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="audit", unit="tensor", disable=not progress):
        findings.append(classify(name, base.lazy(name), suspect.lazy(name), (base.dtype(name), suspect.dtype(name)),
                                 max_rank=max_rank))
    changed = [f for f in findings if f.kind in ("low_rank", "dense")]
    edits: List[Edit] = []
    if spec is not None:
        prefix = spec.layers + "."
        by_layer: Dict[int, List[Finding]] = {}
        for f in changed:
            layer = _layer_of(f.name, prefix)
            if layer is not None:
                by_layer.setdefault(layer, []).append(f)
        w_out = {l: f"{spec.layers}.{l}.{spec.w_out}" for l in by_layer}
        candidates = sorted(l for l, fs in by_layer.items()
                            if len(fs) == 1 and fs[0].kind == "low_rank" and fs[0].name == w_out[l] + ".weight")
        runs: List[List[int]] = []
        for l in candidates:
            if runs and runs[-1][-1] == l - 1:
                runs[-1].append(l)
            else:
                runs.append([l])
        for run in runs:
            if len(run) <= max_span:
                edits.append(Edit(run, [by_layer[l][0] for l in run], {l: w_out[l] for l in run}))
            else:
                notes.append(f"low-rank updates of W_out alone in {len(run)} consecutive layers ({run[0]}–{run[-1]}): "
                             f"longer than an edit's span (≤ {max_span}), like a LoRA fine-tune of W_out")
    in_edits = {id(f) for e in edits for f in e.findings}
    other = [f for f in changed if id(f) not in in_edits]
    return AuditReport(base.label, suspect.label, base.model_type, findings, edits, other, notes,
                       bool(spec and spec.fan_in_fan_out))


def audit_models(base: Optional[str], suspect: str, max_rank: int = DEFAULT_MAX_RANK, max_span: int = MAX_SPAN,
                 progress: bool = False) -> AuditReport:
    """Open both models (``--model`` names: folders, GGUF files, hub ids; ``None`` the embedded default) and
    compare them (:func:`audit_files`)."""
    return audit_files(TensorFiles.open(base), TensorFiles.open(suspect), max_rank, max_span, progress)
