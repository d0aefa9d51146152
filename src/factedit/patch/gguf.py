"""Patches into GGUF files: the edited model for llama.cpp, Ollama and ``transformers`` (``gguf_file=``).

    export_gguf(adapter, [Patch.load("eiffel.safetensors")], base_gguf, "edited.gguf", quant="q8_0")

The base is a GGUF file of the model the patches were made on (the embedded default ships as one;
llama.cpp and Ollama users have theirs). The output copies the base file's metadata, tokenizer and
every tensor byte for byte, and replaces only the edited matrices (``blk.{l}.ffn_down.weight``), each
requantized as ``quant`` (default: the type the base file stores it in; tensor types may differ
within a GGUF file). A requantized matrix is ``Q(W + Δ)`` where W is the base's own dequantized
matrix, so an update smaller than the quantization step can be rounded away: docs/RESULTS.md
measures how often an edit survives at each type (:func:`roundtrip` is the exact in-memory round
trip used there). For a Hugging Face folder base, convert the saved edited folder with llama.cpp's
``convert_hf_to_gguf.py`` instead (README).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..core.paths import atomic_path
from .files import Patch, PatchError, temporarily_applied

__all__ = ["export_gguf", "roundtrip", "GGUF_W_OUT", "QUANT_TYPES", "gguf_quant_type"]

#: ``config.model_type`` -> llama.cpp's name of W_out of layer ``{}``.
GGUF_W_OUT: Dict[str, str] = {mt: "blk.{}.ffn_down.weight" for mt in (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3")}
#: the ``--quant`` choices (the quantizations the ``gguf`` package writes, among the common ones)
QUANT_TYPES = ("f32", "f16", "q8_0", "q4_1", "q4_0", "q5_0", "q5_1")


def gguf_quant_type(name: str):
    import gguf

    if name not in QUANT_TYPES:
        raise PatchError(f"unknown GGUF quantization {name!r}; use one of {', '.join(QUANT_TYPES)}")
    return getattr(gguf.GGMLQuantizationType, name.upper())


def roundtrip(matrix: torch.Tensor, qtype) -> torch.Tensor:
    """``matrix`` (d_model, d_ff) quantized as GGUF type ``qtype`` and read back (float32), exactly what
    a reader of the exported file gets for it."""
    from gguf.quants import quantize

    return _dequantized(quantize(matrix.detach().to(torch.float32).cpu().numpy(), qtype), qtype, matrix.shape)


def _dequantized(data, qtype, shape) -> torch.Tensor:
    """GGUF tensor data of type ``qtype`` as a float32 tensor of ``shape`` (as readers dequantize it)."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype)).reshape(shape).astype(np.float32))


def _field_str(reader, key: str) -> Optional[str]:
    f = reader.fields.get(key)
    return None if f is None else str(f.contents())


def export_gguf(adapter, patches: Sequence[Patch], base_gguf, out_file, quant: Optional[str] = None,
                force: bool = False) -> dict:
    """Write the base GGUF file with the patches' matrices replaced; returns what was written.

    Refuses (nothing written) a base file whose edited matrices are not the model's (the patches'
    fingerprints are checked against ``adapter``, the base file against ``adapter``), an
    architecture without a known GGUF tensor name, and an existing ``out_file`` without ``force``.
    """
    import gguf

    out_file, base_gguf = Path(out_file), Path(base_gguf)
    if not patches:
        raise PatchError("nothing to export: no patches given")
    name_of = GGUF_W_OUT.get(adapter.model_type)
    if name_of is None:
        raise PatchError(f"no GGUF tensor name is known for the MLP output of model type {adapter.model_type!r} "
                         f"(known: {', '.join(sorted(GGUF_W_OUT))}); save the edited model (--save-model) and "
                         "convert it with llama.cpp's convert_hf_to_gguf.py")
    if out_file.exists() and not force:
        raise PatchError(f"{out_file} already exists; pass --force (Python: force=True) to replace it")
    if out_file.resolve() == base_gguf.resolve():
        raise PatchError("the output would overwrite the base GGUF file; write it elsewhere")
    qtype = gguf_quant_type(quant) if quant is not None else None
    try:
        reader = gguf.GGUFReader(str(base_gguf))
    except Exception as e:
        raise PatchError(f"{base_gguf} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    tensors = {t.name: t for t in reader.tensors}
    layers = sorted({d.layer for p in patches for d in p.deltas})
    edited = {}
    with temporarily_applied(adapter, patches):  # checks every patch's base fingerprints, in order
        for l in layers:
            name = name_of.format(l)
            t = tensors.get(name)
            if t is None:
                raise PatchError(f"{base_gguf} has no tensor {name}: not a GGUF file of this model")
            edited[name] = (l, adapter.w_out_weight(l).detach().to(torch.float32).cpu().clone(), t)
    for name, (l, W_new, t) in edited.items():
        if not torch.equal(_dequantized(t.data, t.tensor_type, W_new.shape),
                           adapter.w_out_weight(l).detach().to(torch.float32).cpu()):
            raise PatchError(f"{base_gguf}: {name} is not the matrix of the model the patches were made on "
                             "(load --model from this GGUF file, or give the GGUF file of --model)")
    arch = _field_str(reader, gguf.Keys.General.ARCHITECTURE) or "llama"
    provenance = json.dumps({"patches": [{k: p.meta.get(k) for k in ("method", "requests", "fingerprints",
                                                                     "fingerprints_after", "layers")} for p in patches],
                             "quant": quant})
    from gguf.quants import QuantError, quantize

    new_data = {}
    for name, (l, W_new, t) in edited.items():
        to = qtype if qtype is not None else t.tensor_type
        try:
            new_data[name] = (quantize(W_new.numpy(), to), to)
        except (QuantError, NotImplementedError) as e:
            raise PatchError(f"cannot write {name} as {to.name}: {e}") from None
    replaced = {}
    with atomic_path(out_file, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_key_value("factedit.provenance", provenance, gguf.GGUFValueType.STRING)
        data = {}
        for t in reader.tensors:
            if t.name in new_data:
                arr, to = new_data[t.name]
                data[t.name] = arr
                replaced[t.name] = to.name
                writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, to)
            else:
                data[t.name] = t.data
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(data[t.name], tensor_endianess=reader.endianess)
        writer.close()
    return {"file": str(out_file), "base": str(base_gguf), "replaced": replaced, "bytes": out_file.stat().st_size}
