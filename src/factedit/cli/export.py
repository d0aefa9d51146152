"""``factedit export | import``: patches to and from the formats serving stacks load (PEFT / vLLM LoRA
adapters, GGUF files)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_model_options, arch_spec, load

__all__ = ["add_parsers", "cmd_export", "cmd_import"]


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="write patches (applied in order) as a PEFT LoRA adapter or a GGUF file")
    e.add_argument("patches", nargs="+", help="patch files, oldest first (several export as one adapter / file)")
    to = e.add_mutually_exclusive_group(required=True)
    to.add_argument("--peft", metavar="DIR", help="the adapter folder to write")
    to.add_argument("--gguf", metavar="FILE", help="the edited model as a GGUF file (from a GGUF base)")
    e.add_argument("--quant", default=None, metavar="TYPE",
                   help="GGUF type of the edited matrices: f16, q8_0, q4_1, ... (default: the base file's)")
    e.add_argument("--base-gguf", default=None, metavar="FILE",
                   help="the GGUF file of --model (default: the embedded model's, or --model itself if it is .gguf)")
    e.add_argument("--vllm", action="store_true",
                   help="the vLLM variant: one rank for all modules, padded to a rank vLLM serves")
    e.add_argument("--svd", type=int, default=None, metavar="RANK",
                   help="compress modules above RANK (and dense fine-tuning updates) by a truncated SVD")
    e.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: where --model loads from)")
    e.add_argument("--force", action="store_true", help="replace an existing adapter folder")
    add_model_options(e, corpus=False)

    i = sub.add_parser("import", help="turn an adapter that factedit exported back into patch files")
    i.add_argument("--peft", required=True, metavar="DIR", help="the adapter folder")
    i.add_argument("--out", required=True,
                   help="patch file to write (an adapter of several patches: a folder of patches + stack.json)")
    i.add_argument("--force", action="store_true", help="replace an existing output")
    i.add_argument("--json", action="store_true")


def cmd_export(args) -> int:
    from ..core.arch import ModelAdapter
    from ..patch.files import Patch
    from ..patch.peft import export_peft

    patches = [Patch.load(p) for p in args.patches]  # all validated before the model is loaded
    model, tok = load(args)
    adapter = ModelAdapter(model, tok, arch_spec(args.arch_spec), args.prompt_prefix)
    if args.gguf:
        return _export_gguf(args, adapter, patches)
    out = export_peft(adapter, patches, args.peft, svd_rank=args.svd, vllm=args.vllm, force=args.force,
                      base_model=args.base_model)
    if args.json:
        print(json.dumps(out))
        return 0
    kind = "vLLM LoRA adapter" if args.vllm else "PEFT LoRA adapter"
    print(f"wrote {kind} {out['directory']} ({out['bytes']:,} bytes) from {len(patches)} patch(es)")
    for name, r in out["ranks"].items():
        svd = out["svd"].get(name)
        print(f"  {name}: rank {r}" + (f" (stored as {out['stored_rank']})" if out["stored_rank"] != r else "")
              + (f", SVD relative error {svd['relative_error']:.3g}" if svd else ""))
    if args.vllm:
        print(f"  serve: vllm serve BASE --enable-lora --max-lora-rank {out['stored_rank']} "
              f"--lora-modules edit={out['directory']}")
    return 0


def _export_gguf(args, adapter, patches) -> int:
    from ..core.errors import FactEditError
    from ..core.models import DEFAULT_MODEL, embedded_gguf_path
    from ..patch.gguf import export_gguf

    base = args.base_gguf
    if base is None and args.model and str(args.model).endswith(".gguf"):
        base = args.model
    if base is None and args.model in (None, DEFAULT_MODEL):
        base = embedded_gguf_path()
    if base is None:
        raise FactEditError("--gguf needs the GGUF file of the base model (--base-gguf FILE); for a Hugging Face "
                            "folder, save the edited model (factedit apply --save-model DIR) and convert it with "
                            "llama.cpp's convert_hf_to_gguf.py")
    out = export_gguf(adapter, patches, base, args.gguf, quant=args.quant, force=args.force)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wrote {out['file']} ({out['bytes']:,} bytes) from {out['base']}; replaced "
              + ", ".join(f"{n} ({t})" for n, t in out["replaced"].items()))
    return 0


def cmd_import(args) -> int:
    from ..core.errors import FactEditError
    from ..patch.peft import import_peft
    from ..patch.stack import save_patches

    patches = import_peft(args.peft)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FactEditError(f"{out} already exists; pass --force to replace it")
    if len(patches) == 1:
        patches[0].save(out)
        written = [str(out)]
    else:
        written = [str(out / n) for n in save_patches(patches, out)]
    info = {"patches": written, "approximate": any(p.meta.get("approximate") for p in patches)}
    print(json.dumps(info) if args.json else "\n".join(f"wrote {w}" for w in written)
          + ("\n  (approximate: SVD-compressed modules, cannot be reverted exactly)" if info["approximate"] else ""))
    return 0
