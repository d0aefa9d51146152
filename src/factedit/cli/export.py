"""``factedit export | import``: patches to and from the formats serving stacks load (PEFT / vLLM LoRA
adapters, GGUF files)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["cmd_export", "cmd_import"]


def cmd_export(settings) -> int:
    from ..core.errors import FactEditError
    from ..patch.files import Patch
    from ..patch.peft import export_peft

    if bool(settings["peft"]) == bool(settings["gguf"]):
        raise FactEditError("give one of --peft DIR (a LoRA adapter) or --gguf FILE (a GGUF model)")
    patches = [Patch.load(p) for p in settings["patches"]]  # all validated before the model is loaded
    model, tok = settings.model.load()
    adapter = settings.model.adapter(model, tok)
    if settings["gguf"]:
        return _export_gguf(settings, adapter, patches)
    out = export_peft(adapter, patches, settings["peft"], svd_rank=settings["svd"], vllm=settings["vllm"],
                      force=settings["force"], base_model=settings["base_model"])
    _sign(settings, out, out["directory"])
    if settings["json"]:
        print(json.dumps(out))
        return 0
    kind = "vLLM LoRA adapter" if settings["vllm"] else "PEFT LoRA adapter"
    print(f"wrote {kind} {out['directory']} ({out['bytes']:,} bytes) from {len(patches)} patch(es)")
    for name, r in out["ranks"].items():
        svd = out["svd"].get(name)
        print(f"  {name}: rank {r}" + (f" (stored as {out['stored_rank']})" if out["stored_rank"] != r else "")
              + (f", SVD relative error {svd['relative_error']:.3g}" if svd else ""))
    if "signature" in out:
        print(f"  signed: {out['signature']}")
    if settings["vllm"]:
        print(f"  serve: vllm serve BASE --enable-lora --max-lora-rank {out['stored_rank']} "
              f"--lora-modules edit={out['directory']}")
    return 0


def _export_gguf(settings, adapter, patches) -> int:
    from ..core.errors import FactEditError
    from ..core.models import DEFAULT_MODEL, embedded_gguf_path
    from ..patch.gguf import export_gguf

    base, model = settings["base_gguf"], settings.model.model
    if base is None and model and str(model).endswith(".gguf"):
        base = model
    if base is None and model in (None, DEFAULT_MODEL):
        base = embedded_gguf_path()
    if base is None:
        raise FactEditError("--gguf needs the GGUF file of the base model (--base-gguf FILE); for a Hugging Face "
                            "folder, save the edited model (factedit apply --save-model DIR) and convert it with "
                            "llama.cpp's convert_hf_to_gguf.py")
    out = export_gguf(adapter, patches, base, settings["gguf"], quant=settings["quant"], force=settings["force"])
    _sign(settings, out, out["file"])
    if settings["json"]:
        print(json.dumps(out))
    else:
        print(f"wrote {out['file']} ({out['bytes']:,} bytes) from {out['base']}; replaced "
              + ", ".join(f"{n} ({t})" for n, t in out["replaced"].items()))
    return 0


def _sign(settings, out: dict, path) -> None:
    """``--sign KEY``: sign what the export wrote (its signature path under ``out["signature"]``)."""
    if settings["sign_key"]:
        from ..core.signing import sign

        out["signature"] = str(sign(path, settings["sign_key"]))


def cmd_import(settings) -> int:
    from ..core.errors import FactEditError
    from ..core.signing import require, trust_anchors
    from ..patch.peft import import_peft
    from ..patch.stack import save_patches

    status = require(settings["peft"], trust_anchors(settings["trust"] or ()), settings["require_signature"])
    patches = import_peft(settings["peft"])
    out = Path(settings["out"])
    if out.exists() and not settings["force"]:
        raise FactEditError(f"{out} already exists; pass --force to replace it")
    if len(patches) == 1:
        patches[0].save(out)
        written = [str(out)]
    else:
        written = [str(out / n) for n in save_patches(patches, out)]
    info = {"patches": written, "approximate": any(p.meta.get("approximate") for p in patches),
            "signature": status.to_dict()}
    print(json.dumps(info) if settings["json"] else "\n".join(f"wrote {w}" for w in written)
          + ("\n  (approximate: SVD-compressed modules, cannot be reverted exactly)" if info["approximate"] else ""))
    return 0
