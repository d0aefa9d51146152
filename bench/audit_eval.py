"""How well does ``factedit audit`` find and explain edits on the embedded model? (issue 33)

For each method, edits of CounterFact records (single requests; ``memit`` in batches of ``--batch``) are made on
the embedded model in memory, audited against the base's safetensors folder (``LoadedTensors``: the model is
not saved), explained on the base weights (the edit is reverted first; the found update is applied for the
suspect's answers), and scored:

* **layers**: the edits found are exactly the layers the method wrote, one edit per call;
* **new object first**: the top-ranked new object names the request's ``target_new`` (``mentions``);
* **subject top-10**: the request's subject is among the 10 best of the candidate pool (the subjects of the
  first ``--pool`` CounterFact records, each with its own prompt; the edited records are in it).

Other tools' conventions (``--variants``): ROME without C⁻¹ in the update (``rome-noc``, what an EasyEdit file
with ``mom2_adjustment: false`` runs), r-ROME at another layer (``r-rome-l8``), and r-ROME edits shipped in float16
(``r-rome-fp16``: the edited model converted to float16 before the audit, as PoisonGPT's upload was).

**Extract and revert** (single edits): the found edit is extracted as a patch (``extract_patch``) and reverted
from a copy of the suspect with ``revert_patches`` (what ``factedit revert OUT --model SUSPECT`` runs); the
reverted copy is compared with the base tensor by tensor (largest change of an edited matrix relative to the
format's rounding bound; every other tensor must be identical, or within the format's rounding for a float16
suspect) and asked the explanation's evidence prompts, whose answers must be the base's (for a float16 suspect:
the base's in float16, the format the revert cannot take back).

Negatives: the unedited model re-saved in bfloat16 and float16 (``LoadedTensors`` of a converted copy), every
matrix through a GGUF Q8_0 round trip (the ``gguf`` package's quantizer and reader, as a q8_0 file stores
them), and two merged LoRA fine-tunes (rank 8, α 16, trained here on WikiText-2 text and merged into the
weights: on q_proj/v_proj, PEFT's default for LLaMA, and on every linear layer including W_out) must claim 0
edits. Writes the "Audit" section of docs/BENCHMARKS.md with ``--out``.

    FACTEDIT_HOME=runs/home python bench/audit_eval.py --records 10 --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import CF, CORPUS, cpu_name, publish, write_rows  # noqa: E402

METHODS = ("r-rome", "rome", "memit", "emmet", "alphaedit")
#: other tools' conventions: name -> (method, options, dtype the suspect is shipped in)
VARIANTS = {"rome-noc": ("rome", {"mom2_adjustment": False}, None), "r-rome-l8": ("r-rome", {"layer": 8}, None),
            "r-rome-fp16": ("r-rome", {}, "float16")}
#: the merged LoRA fine-tunes: name -> the linear layers adapted
LORAS = {"LoRA q,v (PEFT's default for LLaMA)": ("q_proj", "v_proj"),
         "LoRA every linear layer (incl. W_out)": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")}


def merged_lora(model, tokenizer, targets, text: str, rank: int = 8, alpha: float = 16.0, steps: int = 30,
                lr: float = 1e-3, seed: int = 0):
    """A copy of ``model`` fine-tuned with LoRA on ``text`` (next-token loss, 4 × 128-token windows a step) and
    merged: W + (α/r)·B·A for every linear layer whose name ends with one of ``targets``."""
    import copy

    import torch

    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    for q in tuned.parameters():
        q.requires_grad_(False)
    mods = [m for n, m in tuned.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(tuple(targets))]
    factors = []
    for m in mods:
        A = torch.nn.Parameter(torch.randn(rank, m.in_features) / m.in_features ** 0.5)
        B = torch.nn.Parameter(torch.zeros(m.out_features, rank))
        factors.append((m, A, B))
        m.register_forward_hook(lambda mod, inp, out, A=A, B=B: out + (alpha / rank) * (inp[0] @ A.T) @ B.T)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    opt = torch.optim.AdamW([x for _, A, B in factors for x in (A, B)], lr=lr)
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 129, (4,))
        batch = torch.stack([ids[int(s):int(s) + 128] for s in starts])
        loss = tuned(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for m, A, B in factors:
        m._forward_hooks.clear()
        with torch.no_grad():
            m.weight += (alpha / rank) * (B @ A).to(m.weight.dtype)
    return tuned, losses


def _negative(report) -> str:
    """What the audit says of a model that was not edited: "N edits claimed, verdict"."""
    c = report.counts()
    return (f"{len(report.edits)} edits claimed, \"{report.verdict}\" ({c['identical']} tensors identical, "
            f"{c['rounding']} within a format's rounding, {c['low_rank']} low-rank, {c['dense']} dense)")


def _reverted(base_files, reverted, tok, edit, layers, dtype, shipped_base=None) -> dict:
    """How far the reverted copy is from the base: per tensor, within the rounding of the suspect's format; and
    the explanation's evidence prompts answered as the base answers them — for a suspect shipped in another
    dtype, as ``shipped_base`` (the base shipped in that dtype) answers them: the revert cannot undo the
    rounding of the whole model, only the edit."""
    import torch

    from factedit.audit import LoadedTensors
    from factedit.audit.spectrum import classify, rounding_format
    from factedit.core.answers import greedy_answers
    from factedit.core.arch import ModelAdapter

    rev = LoadedTensors(reverted)
    edited = {f.name for f in edit.findings}
    dtypes = ("F16",) if dtype == "float16" else ("F32",)
    ok, left = True, 0.0
    for name in base_files.names:
        b = base_files.get(name)
        r = rev.get(name).to(b.dtype)
        if name in edited:  # the update's tail below the storage rounding stays: no direction above it may
            f = classify(name, b, r, dtypes)
            if f.kind not in ("identical", "rounding"):
                left = max(left, f.singular_values[0] / f.noise)
                ok &= f.rank == 0
        elif not torch.equal(b, r):  # untouched by the patch: identical, or the float16 suspect's rounding
            ok &= dtype is not None and rounding_format(b, r) is not None
    ev = (edit.explanation.evidence if edit.explanation else [])[:10]
    prompts = [e["prompt"] for e in ev]
    answers = greedy_answers(ModelAdapter(reverted, tok), prompts, 6) if ev else []
    want = [e["base"] for e in ev]
    if dtype is not None and ev and shipped_base is not None:
        want = [a.strip() for a in greedy_answers(ModelAdapter(shipped_base, tok), prompts, 6)]
    same = sum(a.strip() == w for a, w in zip(answers, want))
    return {"revert_ok": ok, "left_over": left, "evidence_n": len(ev), "evidence_same": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="other tools' conventions (empty: none)")
    ap.add_argument("--records", type=int, default=20, help="records per method (edits, or requests of batches)")
    ap.add_argument("--batch", type=int, default=10, help="requests per memit edit")
    ap.add_argument("--pool", type=int, default=1000, help="candidate subjects (the first records of CounterFact)")
    ap.add_argument("--rows", default=None, help="per-edit rows as JSON lines")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import copy

    import torch

    from factedit import Editor, GuardConfig, load_model
    from factedit.audit import LoadedTensors, TensorFiles, audit_files
    from factedit.audit.anomaly import spectral_scores
    from factedit.audit.explain import explain_report, load_candidates
    from factedit.audit.extract import extract_patch
    from factedit.core.answers import mentions
    from factedit.core.arch import ModelAdapter
    from factedit.core.models import embedded_model_dir
    from factedit.evaluation import load_cases
    from factedit.patch.files import revert_patches
    from factedit.patch.gguf import gguf_quant_type, roundtrip

    base_files = TensorFiles(embedded_model_dir(), "the embedded model")
    model, tok = load_model()
    ed = Editor(model, tok, progress=False)
    pool = load_candidates(CF)[: args.pool]
    names = {c.subject for c in pool}
    stats = {"corpus": str(CORPUS), "n_tokens": None}
    rows, off = [], GuardConfig(enabled=False)
    shipped_bases = {}  # dtype -> the base model after a round trip through it
    runs = [(m, m, {}, None) for m in args.methods.split(",") if m] + \
        [(v, *VARIANTS[v]) for v in args.variants.split(",") if v]
    for name, method, options, dtype in runs:
        size = args.batch if method == "memit" else 1
        cases = [c for c in load_cases(CF, limit=args.pool) if c.request.subject in names][: args.records]
        for i in range(0, len(cases), size):
            group = cases[i:i + size]
            reqs = [c.request for c in group]
            res = ed.edit(reqs, method=method, guard=off, verify=False, stats_corpus=str(CORPUS), **options)
            shipped = model if dtype is None else copy.deepcopy(model).to(getattr(torch, dtype))
            suspect = LoadedTensors(shipped, "edited")
            t0 = time.perf_counter()
            report = audit_files(base_files, suspect)
            t_compare = time.perf_counter() - t0
            z = {s.layer: s.z for s in spectral_scores(suspect)}
            reverted = None
            if len(reqs) == 1 and len(report.edits) == 1:  # extract, then revert it from a copy of the suspect
                reverted = copy.deepcopy(shipped).to(torch.float32)
                revert_patches(ModelAdapter(reverted, tok), [extract_patch(report, base_files, suspect)])
            del shipped, suspect
            ed.revert()
            t1 = time.perf_counter()
            explain_report(report, model, tok, pool, stats)
            t_explain = time.perf_counter() - t1
            found = [e.layers for e in report.edits]
            row = {"method": name, "n": len(reqs), "layers": sorted(res.layers), "found": found,
                   "verdict": report.verdict, "compare_s": round(t_compare, 2), "explain_s": round(t_explain, 2),
                   "z_edited": [z[l] for l in sorted(res.layers)],
                   "z_other": [v for l, v in z.items() if l not in res.layers]}
            if reverted is not None:
                if dtype is not None and dtype not in shipped_bases:  # the base through the same dtype, once
                    shipped_bases[dtype] = copy.deepcopy(model).to(getattr(torch, dtype)).to(torch.float32)
                row.update(_reverted(base_files, reverted, tok, report.edits[0], res.layers, dtype,
                                     shipped_bases.get(dtype)))
                del reverted
            if len(report.edits) == 1:
                x = report.edits[0].explanation
                top = [s["text"] for s in x.subjects]
                row["subject_rank"] = [top.index(r.subject) + 1 if r.subject in top else None for r in reqs]
                row["new_rank"] = [next((j + 1 for j, o in enumerate(x.new_objects)
                                         if mentions(o["text"], [r.target_new])), None) for r in reqs]
                row["new_objects"] = [o["text"] for o in x.new_objects[:3]]
                row["hypothesis"] = x.hypothesis
            rows.append(row)
            print(json.dumps(row), flush=True)
    del shipped_bases
    clean_z = [s.z for s in spectral_scores(LoadedTensors(model, "unedited"))]
    neg = {}
    for dtype in (torch.bfloat16, torch.float16):
        copy_ = copy.deepcopy(model).to(dtype)
        neg[f"re-saved in {str(dtype).split('.')[-1]}"] = _negative(audit_files(base_files, LoadedTensors(copy_)))
        del copy_
    q8 = copy.deepcopy(model)
    with torch.no_grad():
        for n, w in q8.named_parameters():
            if w.ndim == 2 and w.shape[-1] % 32 == 0:
                w.copy_(roundtrip(w, gguf_quant_type("q8_0")))
    neg["GGUF Q8_0 round trip of every matrix"] = _negative(audit_files(base_files, LoadedTensors(q8)))
    del q8
    text = CORPUS.read_text(encoding="utf-8")[:200_000]
    for label, targets in LORAS.items():
        tuned, losses = merged_lora(model, tok, targets, text)
        neg[f"{label}, 30 steps (loss {losses[0]:.2f} → {statistics.mean(losses[-5:]):.2f})"] = \
            _negative(audit_files(base_files, LoadedTensors(tuned)))
        del tuned
    write_rows(args.rows, rows)

    lines = ["## Audit: finding and explaining edits (issue 33)", "",
             f"`python bench/audit_eval.py --records {args.records} --pool {args.pool}` ({datetime.date.today()}, "
             f"{cpu_name()}, torch {torch.__version__}): edits of the first CounterFact records whose subject is in a "
             f"pool of {len(pool)} candidate subjects (the first {args.pool} records' subjects, each with its prompt), "
             "audited against the embedded model's safetensors folder and explained on its weights.", "",
             "| method | edits (requests) | layers found exactly | new object named (first; batches: among them) | "
             "subject in top 10 | "
             "subject first | compare s | explain s |", "|---|---|---|---|---|---|---|---|"]
    for method in [m for m in args.methods.split(",") + args.variants.split(",") if m]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        n_req = sum(r["n"] for r in mine)
        exact = sum(r["found"] == [r["layers"]] for r in mine)
        ranks = [k for r in mine for k in r.get("subject_rank", [None] * r["n"])]
        new = sum(k == 1 if r["n"] == 1 else k is not None for r in mine for k in r.get("new_rank", [None] * r["n"]))
        top10 = sum(k is not None and k <= 10 for k in ranks)
        first = sum(k == 1 for k in ranks)
        lines.append(f"| {method} | {len(mine)} ({n_req}) | {exact} of {len(mine)} | {new} of {n_req} | "
                     f"{top10} of {n_req} | {first} of {n_req} | "
                     f"{statistics.median(r['compare_s'] for r in mine):.1f} | "
                     f"{statistics.median(r['explain_s'] for r in mine):.1f} |")
    rev = [r for r in rows if "revert_ok" in r]
    if rev:
        lines += ["", f"**Extract and revert** ({len(rev)} single edits whose audit found one edit): reverted to the "
                  f"base within the format's rounding on the edited matrices and identical (float16 suspects: "
                  f"within float16 rounding) elsewhere in {sum(r['revert_ok'] for r in rev)} of {len(rev)}; largest "
                  f"singular value left on an edited matrix {max(r['left_over'] for r in rev):.2g} × the storage "
                  f"rounding's bound; the evidence prompts answered as the base does (float16 suspects: the base "
                  f"in float16) in "
                  f"{sum(r['evidence_same'] for r in rev)} of {sum(r['evidence_n'] for r in rev)} prompts.", ""]
    lines += ["", "Negatives (the unedited model, changed in memory; edits claimed, verdict):", ""]
    lines += [f"* {k}: {v}" for k, v in neg.items()] + [""]
    pos = [v for r in rows for v in r["z_edited"]]
    negs = clean_z + [v for r in rows for v in r["z_other"]]
    auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in negs) / max(1, len(pos) * len(negs))
    from factedit.audit.anomaly import DEFAULT_THRESHOLD as T

    lines += [f"**Without a base** (`anomaly.py`, W_out spectra only): over the {len(pos)} edited matrices and "
              f"{len(negs)} unedited ones (the {len(clean_z)} layers of the unedited model and the other layers of "
              f"each edited one), ROC AUC {auc:.3f}; at z > {T:g}, {sum(v > T for v in pos)} of {len(pos)} edited "
              f"matrices flagged, {sum(v > T for v in negs)} of {len(negs)} unedited ones.", ""]
    publish(lines, args.out, "## Audit: finding and explaining edits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
