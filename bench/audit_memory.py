"""The memory of ``factedit audit`` on a pair of 7B-shaped checkpoints (issue 33: "memory stated for a 7B pair").

Audit reads the two models a block of rows of one tensor pair at a time (4 MiB of float64 rows; the SVD of a large
difference is a randomized one taken block by block), so its peak is set neither by the depth of the model nor by
the size of its largest tensor. This benchmark writes two LLaMA-7B-shaped checkpoints in float16 (hidden 4096, MLP
11008, vocabulary 32000, untied output head) with ``--layers`` decoder layers each, random weights; the suspect is
the base with a rank-one update of the last layer's W_out (rounded to float16 as a saved edit is), and audits them
in a fresh process (``factedit audit --no-explain --json``), reading that process's own peak resident memory (Linux
VmHWM) and wall time, beside the peak of a process that only imports what the audit imports (torch, transformers,
factedit): the difference is what the audit itself holds. Run with ``--layers 1,2`` it shows whether the peak grows
with depth: a 32-layer pair (13.5 GB of float16 per model) then needs what the 2-layer one needs.

    python bench/audit_memory.py --layers 1,2 --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_name, publish  # noqa: E402

HIDDEN, MLP, VOCAB = 4096, 11008, 32000

MAKE = r"""
import json, sys, torch
from safetensors.torch import save_file
folder, suspect, layers, hidden, mlp, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7])
g = torch.Generator().manual_seed(0)
def rand(*shape):
    return (torch.randn(*shape, generator=g) * 0.02).half()
t = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
     "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
for i in range(layers):
    p = f"model.layers.{i}."
    for m in ("q", "k", "v", "o"):
        t[p + f"self_attn.{m}_proj.weight"] = rand(hidden, hidden)
    t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = rand(mlp, hidden), rand(mlp, hidden)
    t[p + "mlp.down_proj.weight"] = rand(hidden, mlp)
    t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
    t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
          "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": 32,
          "num_key_value_heads": 32, "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": "float16",
          "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
for out in (folder, suspect):
    import os
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
name = f"model.layers.{layers - 1}.mlp.down_proj.weight"
W = t[name].float()
u, v = torch.randn(hidden, generator=g), torch.randn(mlp, generator=g)
t[name] = (W + 0.02 * W.norm() / (u.norm() * v.norm()) * torch.outer(u, v)).half()  # ‖Δ‖ = 2 % of ‖W‖
save_file(t, os.path.join(suspect, "model.safetensors"), metadata={"format": "pt"})
"""

AUDIT = r"""
import json, sys, time
from factedit.cli import main
t0 = time.perf_counter()
code = main(["audit", "--base", sys.argv[1], "--suspect", sys.argv[2], "--no-explain", "--json"])
wall = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"code": code, "wall_s": round(wall, 1), "peak_mib": round(hwm / 1024)}), file=sys.stderr)
"""

IMPORTS = r"""
import sys
from factedit.cli import main
import factedit.audit, safetensors.torch, transformers  # noqa: F401 (what an audit run has loaded)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(round(hwm / 1024))
"""


def imports_peak() -> int:
    """MiB: the peak of a process that loads what an audit loads and does nothing else."""
    p = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True)
    return int(p.stdout.strip().splitlines()[-1])


def measure(layers: int, work: Path) -> dict:
    base, suspect = work / f"base{layers}", work / f"suspect{layers}"
    subprocess.run([sys.executable, "-c", MAKE, str(base), str(suspect), str(layers), str(HIDDEN), str(MLP),
                    str(VOCAB)], check=True)
    size = (base / "model.safetensors").stat().st_size
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", AUDIT, str(base), str(suspect)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    report = json.loads(p.stdout)
    return {"layers": layers, "file_mib": round(size / 2 ** 20), "process_wall_s": round(wall, 1), **stats,
            "verdict": report["verdict"], "edits": [e["layers"] for e in report["edits"]],
            "rank": [e["rank"] for e in report["edits"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2", help="decoder layers of the pairs measured, comma-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from factedit.audit.spectrum import CHUNK_BYTES

    rows, floor = [], imports_peak()
    with tempfile.TemporaryDirectory(prefix="audit-7b-") as tmp:
        for n in (int(x) for x in args.layers.split(",")):
            rows.append(measure(n, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    big = 2 * VOCAB * HIDDEN  # bytes of the largest float16 tensor (embedding / head)
    lines = ["## Audit memory for a 7B-shaped pair (issue 33)", "",
             f"`python bench/audit_memory.py --layers {args.layers}` ({datetime.date.today()}, {cpu_name()}, torch "
             f"{torch.__version__}): two LLaMA-7B-shaped checkpoints in float16 (hidden {HIDDEN}, MLP {MLP}, "
             f"vocabulary {VOCAB}, untied head; random weights), the suspect with a rank-one update (‖Δ‖ = 2 % of "
             "‖W‖) of the last layer's W_out saved in float16; `factedit audit --no-explain --json` in a fresh "
             "process, its own peak resident memory (VmHWM); beside it, the peak of a process that only imports "
             f"what the audit imports (torch, transformers, factedit): {floor:,} MiB.", "",
             "| decoder layers | weights per model | peak memory of the audit process | of it, the audit's own | "
             "wall time | verdict | edits found |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['file_mib']:,} MiB | {r['peak_mib']:,} MiB | "
                     f"{r['peak_mib'] - floor:,} MiB | {r['wall_s']:.0f} s | {r['verdict']} | {r['edits']} "
                     f"(rank {r['rank']}) |")
    grow = rows[-1]["peak_mib"] - rows[0]["peak_mib"] if len(rows) > 1 else None
    own = max(r["peak_mib"] for r in rows) - floor
    lines += ["", f"The largest tensors are the embedding and the head, {big / 2 ** 20:.0f} MiB each in float16; "
              "no tensor is read whole: each pair is compared a block of rows at a time "
              f"({CHUNK_BYTES / 2 ** 20:g} MiB of float64), "
              "the edited W_out's SVD is a randomized one whose products with the difference are taken block by "
              "block, and the files are read with plain reads (no memory map, whose touched pages would count "
              "against the process). "
              + (f"From {rows[0]['layers']} to {rows[-1]['layers']} decoder layers the peak changed by {grow:+,} MiB, "
                 "so a 32-layer 7B pair (13.5 GB of float16 per model) peaks where these do. "
                 if grow is not None else "")
              + f"Against the issue's bound (\"a 7B pair must fit in ~2× one tensor\", 2 × {big / 2 ** 20:.0f} MiB): "
              + ("**met**" if own <= 2 * big / 2 ** 20 else "**not met**")
              + f" — the audit holds {own:,} MiB above the imports' {floor:,} MiB.", ""]
    publish(lines, args.out, "## Audit memory for a 7B-shaped pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
