"""Patches as LoRA adapters: what PEFT, transformers and vLLM load.

    export_peft(adapter, [Patch.load("eiffel.safetensors")], "eiffel-lora/")   # PeftModel.from_pretrained(base, dir)
    patches = import_peft("eiffel-lora/")                                     # the original patches, bit for bit

Every factedit update is low-rank, ``Δ = left @ rightᵀ`` per edited W_out, which is exactly LoRA's
``ΔW = (lora_alpha / r) · B A``: ``lora_B = left`` (d_model, r), ``lora_A = rightᵀ`` (r, d_ff), with
``lora_alpha = r`` so that the scale is 1 (per module through ``rank_pattern`` / ``alpha_pattern``
where ranks differ). GPT-2's Conv1D stores W_out transposed; PEFT handles it with
``fan_in_fan_out``, the factors are the same. Several patches stacked export as one adapter: per
module, their factors side by side (the sum of their updates). A dense update (fine-tuning) and,
on request, any update above a rank is exported through a truncated SVD, with its relative error
recorded.

Beside the two files PEFT reads, ``factedit_provenance.json`` keeps what the patches recorded
(method, requests, base and after-edit fingerprints, configuration), where each patch's columns sit
in the factors, and the SHA-256 of every tensor: :func:`import_peft` checks them and splits the
factors back into the original patches exactly (an SVD-compressed module comes back as its
compressed delta, marked approximate).

``vllm=True`` writes the variant vLLM's multi-LoRA serving loads: only ``lora_A`` / ``lora_B``
tensors named for the modules vLLM supports for the architecture, one rank for every module
(vLLM reads one ``r`` and one ``lora_alpha``), padded with zero columns to the nearest rank vLLM
accepts (:data:`VLLM_RANKS`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..core.paths import atomic_dir
from ..edit.deltas import LayerDelta
from .files import FORMAT, Patch, PatchError, layer_norms, temporarily_applied, tensor_sha256

__all__ = ["export_peft", "import_peft", "VLLM_RANKS", "VLLM_MODULES", "PROVENANCE", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS"]

PROVENANCE = "factedit_provenance.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_FORMAT = "factedit.peft.v1"

#: The LoRA ranks vLLM accepts for ``--max-lora-rank``.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: ``config.model_type`` -> the name vLLM gives the MLP output projection in LoRA tensor names, for
#: the architectures whose vLLM model class supports LoRA.
#: (vLLM's GPT-2, GPT-J and GPT-NeoX classes do not support LoRA; Phi-3 fuses its other projections,
#: not this one; OLMo 1/2 support LoRA in newer vLLM versions, through its Transformers backend.)
VLLM_MODULES: Dict[str, str] = {
    mt: "down_proj" for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                               "granite", "cohere", "olmo", "olmo2")
}


def _module_rank_split(left: torch.Tensor, right: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factors of ``left @ rightᵀ`` and the relative Frobenius error."""
    L, R = left.double(), right.double()
    q1, r1 = torch.linalg.qr(L)
    q2, r2 = torch.linalg.qr(R)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return _truncate(q1 @ u, s, q2 @ vh.T, rank)


def _dense_split(dense: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    return _truncate(u, s, vh.T, rank)


def _truncate(u, s, v, rank: int):
    total = float((s ** 2).sum())
    kept = min(rank, int(s.numel()))
    err = math.sqrt(max(total - float((s[:kept] ** 2).sum()), 0.0) / total) if total > 0 else 0.0
    root = s[:kept].sqrt()
    return (u[:, :kept] * root).float(), (v[:, :kept] * root).float(), err


def _module_factors(deltas: List[Tuple[int, int, LayerDelta]], svd_rank: Optional[int]):
    """Per module: ``(B, A, segments, svd)``: the concatenated factors, where each (patch, delta)
    sits in them, and ``{rank, relative_error}`` when they were compressed."""
    lowrank = all(d.right is not None for _, _, d in deltas)
    rank = sum(d.rank for _, _, d in deltas) if lowrank else None
    if lowrank and (svd_rank is None or rank <= svd_rank):
        left = torch.cat([d.left.float() for _, _, d in deltas], dim=1)
        right = torch.cat([d.right.float() for _, _, d in deltas], dim=1)
        segments, at = [], 0
        for p, i, d in deltas:
            segments.append({"patch": p, "delta": i, "start": at, "rank": d.rank})
            at += d.rank
        return left, right, segments, None
    if svd_rank is None:
        raise PatchError("a dense update (fine-tuning) has no low-rank factors: export it through a truncated SVD "
                         "with --svd RANK (Python: svd_rank=RANK); the relative error is reported")
    if lowrank:
        left, right, err = _module_rank_split(torch.cat([d.left for _, _, d in deltas], 1),
                                              torch.cat([d.right for _, _, d in deltas], 1), svd_rank)
    else:
        total = sum(d.dense().double() for _, _, d in deltas)
        left, right, err = _dense_split(total, svd_rank)
    return left, right, [], {"rank": int(left.shape[1]), "relative_error": err}


def _check_target(directory: Path, force: bool) -> None:
    if directory.exists() and not force:
        raise PatchError(f"{directory} already exists; pass --force (Python: force=True) to replace it")
    if directory.exists() and not directory.is_dir():
        raise PatchError(f"{directory} exists and is not a directory")


def _write_dir(directory: Path, files: Dict[str, bytes]) -> None:
    """Write ``files`` into ``directory`` atomically: it appears complete or not at all."""
    with atomic_dir(directory) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def _check_holds(adapter, patches: Sequence[Patch]) -> None:
    """The model's edited matrices are what the patches, applied in order, left."""
    from ..core.fingerprints import matrix_fingerprint

    last: Dict[str, Optional[str]] = {}
    for p in patches:
        for d in p.deltas:
            if not 0 <= d.layer < adapter.n_layers:
                raise PatchError(f"patch edits layer {d.layer} but the model has {adapter.n_layers} layers")
            name = adapter.w_out_name(d.layer)
            last[name] = (p.meta.get("fingerprints_after") or {}).get(name)
    for name, want in last.items():
        layer = next(d.layer for p in patches for d in p.deltas if adapter.w_out_name(d.layer) == name)
        if want is None or matrix_fingerprint(adapter.w_out_stored(layer)) != want:
            raise PatchError(f"the model does not hold these patches: {name} is not what they left")


def export_peft(adapter, patches: Sequence[Patch], directory, svd_rank: Optional[int] = None, vllm: bool = False,
                force: bool = False, base_model: Optional[str] = None, applied: bool = False) -> dict:
    """Write ``patches`` (applied in this order) as one LoRA adapter folder; returns what was written.

    Args:
        adapter: the base model the patches were made for (its fingerprints are checked).
        patches: one or more patches, oldest first.
        directory: the adapter folder (written atomically; an existing one needs ``force``).
        svd_rank: compress every module whose rank exceeds this (and export dense updates) through a
            truncated SVD; the relative error is recorded.
        vllm: the vLLM variant (see the module docstring).
        base_model: ``base_model_name_or_path`` (default: the base model's hub id when it is known, so that the
            adapter loads on any machine: the embedded default's is ``HuggingFaceTB/SmolLM2-135M-Instruct``;
            else the local folder it was loaded from). The provenance file records the hub id and the local
            path either way.
        applied: the model holds the patches already (an editor's own history): its matrices are checked
            against the fingerprints the last patch of each left instead of the base fingerprints.
    """
    from safetensors.torch import save

    from ..core.models import DEFAULT_MODEL_HUB_ID, base_model_id, model_source
    from ..core.version import __version__

    directory = Path(directory)
    if not patches:
        raise PatchError("nothing to export: no patches given")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise PatchError(f"--svd needs a positive rank, got {svd_rank!r}")
    _check_target(directory, force)
    leaf = None
    if vllm:
        leaf = VLLM_MODULES.get(adapter.model_type)
        if leaf is None:
            raise PatchError(f"vLLM has no LoRA support known to factedit for model type {adapter.model_type!r} "
                             f"(known: {', '.join(sorted(VLLM_MODULES))}); export a PEFT adapter without --vllm")
    if applied:
        _check_holds(adapter, patches)
    else:
        with temporarily_applied(adapter, patches):  # the patches fit this model, in this order (all checks of apply)
            pass
    by_layer: Dict[int, List[Tuple[int, int, LayerDelta]]] = {}
    for p_i, patch in enumerate(patches):
        for d_i, d in enumerate(patch.deltas):
            by_layer.setdefault(d.layer, []).append((p_i, d_i, d))
    modules, tensors, layout = {}, {}, {}
    for layer in sorted(by_layer):
        name = adapter.w_out_name(layer)
        B, A_t, segments, svd = _module_factors(by_layer[layer], svd_rank)
        modules[name] = (layer, B, A_t, segments, svd)
    ranks = {name: int(m[1].shape[1]) for name, m in modules.items()}
    if vllm:
        top = max(ranks.values())
        fits = [r for r in VLLM_RANKS if r >= top]
        if not fits:
            raise PatchError(f"rank {top} is above the largest LoRA rank vLLM serves ({VLLM_RANKS[-1]}); "
                             f"pass --svd {VLLM_RANKS[-1]} (or lower) to compress it")
        padded = fits[0]
    for name, (layer, B, A_t, segments, svd) in modules.items():
        if vllm:
            pad = padded - B.shape[1]
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
            A_t = torch.cat([A_t, A_t.new_zeros(A_t.shape[0], pad)], 1)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = A_t.T.contiguous().float()
        tensors[f"{key}.lora_B.weight"] = B.contiguous().float()
        layout[name] = {"layer": layer, "rank": ranks[name], "stored_rank": int(B.shape[1]),
                        "segments": segments, "svd": svd}
    r = padded if vllm else max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or base_model_id(
            adapter.model),
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": bool(adapter.spec.fan_in_fan_out), "inference_mode": True, "init_lora_weights": True,
        "target_modules": [leaf] if vllm else [adapter.spec.w_out],
        "layers_to_transform": sorted(by_layer), "layers_pattern": adapter.spec.layers.split(".")[-1],
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    if not vllm:  # ranks that differ from r: scale alpha with them, so that every module's scale is 1
        config["rank_pattern"] = {n: k for n, k in ranks.items() if k != r}
        config["alpha_pattern"] = dict(config["rank_pattern"])
    else:  # vLLM reads one r and one lora_alpha, ignores the layer keys, refuses modules_to_save / DoRA keys
        for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "use_dora", "layers_to_transform",
                  "layers_pattern"):
            config.pop(k)
    metas = [{k: v for k, v in p.meta.items() if k != "checksums"} for p in patches]
    source = model_source(adapter.model)
    base = {"base_model_name_or_path": config["base_model_name_or_path"], "hub_id": source["hub_id"],
            "local_path": source["local_path"], "overridden": base_model is not None}
    if source["hub_id"] == DEFAULT_MODEL_HUB_ID and base_model is None:
        base["note"] = ("factedit's embedded default: the dequantized Q4_1 GGUF of this hub model; its weights "
                        "differ from the hub's within the quantization error")
    provenance = {
        "format": PEFT_FORMAT, "factedit_version": __version__, "vllm": vllm, "base_model": base, "patches": metas,
        "modules": layout, "checksums": {k: tensor_sha256(v) for k, v in tensors.items()},
    }
    _write_dir(directory, {
        ADAPTER_CONFIG: json.dumps(config, indent=2).encode(),
        ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}),
        PROVENANCE: json.dumps(provenance, indent=1).encode(),
    })
    return {"directory": str(directory), "ranks": ranks, "stored_rank": r, "vllm": vllm, "n_patches": len(patches),
            "svd": {n: m["svd"] for n, m in layout.items() if m["svd"]},
            "bytes": sum((directory / f).stat().st_size for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE))}


def _read_adapter(directory: Path):
    from safetensors.torch import load_file

    if not directory.is_dir():
        raise PatchError(f"adapter folder not found: {directory}")
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        provenance = json.loads((directory / PROVENANCE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PatchError(f"{directory}: {Path(e.filename).name} is missing; only adapters written by "
                         "factedit export can be imported") from None
    except (OSError, ValueError) as e:
        raise PatchError(f"{directory}: unreadable adapter files ({e})") from None
    if not isinstance(provenance, dict) or provenance.get("format") != PEFT_FORMAT:
        raise PatchError(f"{directory}: {PROVENANCE} is not a factedit provenance file")
    try:
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as e:  # a truncated or damaged file
        raise PatchError(f"{directory}: {ADAPTER_WEIGHTS} is damaged or truncated ({type(e).__name__}: {e})") from None
    sums = provenance.get("checksums")
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise PatchError(f"{directory}: the adapter's tensors are not the ones factedit wrote")
    bad = [k for k, t in tensors.items() if tensor_sha256(t) != sums[k]]
    if bad:
        raise PatchError(f"{directory}: tensor {bad[0]!r} is damaged (its SHA-256 does not match the provenance)")
    return config, provenance, tensors


def import_peft(directory) -> List[Patch]:
    """The patches a :func:`export_peft` folder holds, checked against its provenance.

    Modules exported without compression give back the original patches' deltas bit for bit (with
    their fingerprints, so they apply and revert like the originals). An SVD-compressed module
    comes back as one compressed delta, and then every module as one delta of a single patch marked
    ``approximate`` (no after-edit fingerprints: its result is not what the original edits left).
    """
    directory = Path(directory)
    config, prov, tensors = _read_adapter(directory)
    metas, layout = prov.get("patches"), prov.get("modules")
    if not (isinstance(metas, list) and metas and isinstance(layout, dict)):
        raise PatchError(f"{directory}: the provenance lists no patches")
    r_global, alpha_global = config.get("r"), config.get("lora_alpha")
    out = [[] for _ in metas]
    approximate = []  # with any compressed module: every module as one delta of a single patch
    compressed = any(isinstance(m, dict) and m.get("svd") for m in layout.values())
    for name, m in layout.items():
        try:
            A = tensors[f"base_model.model.{name}.lora_A.weight"]
            B = tensors[f"base_model.model.{name}.lora_B.weight"]
            r = (config.get("rank_pattern") or {}).get(name, r_global)
            alpha = (config.get("alpha_pattern") or {}).get(name, alpha_global)
            if r != alpha or r != m["stored_rank"] or A.shape[0] != r or B.shape[1] != r:
                raise PatchError(f"{directory}: module {name} does not have the scale 1 factedit exports with")
            if compressed:
                approximate.append(LayerDelta(int(m["layer"]), B[:, : m["rank"]].clone(), A[: m["rank"]].T.clone()))
                continue
            for s in m["segments"]:
                cols = slice(s["start"], s["start"] + s["rank"])
                out[s["patch"]].append((s["delta"], LayerDelta(int(m["layer"]), B[:, cols].clone(), A[cols].T.clone())))
        except (KeyError, TypeError) as e:
            raise PatchError(f"{directory}: the provenance does not describe module {name} ({e})") from None
    if approximate:
        meta = dict(metas[0])
        meta.update({"format": FORMAT, "method": "+".join(m.get("method", "?") for m in metas),
                     "requests": [r for m in metas for r in m.get("requests", [])],
                     "layers": sorted({d.layer for d in approximate}), "norms": layer_norms(approximate),
                     "fingerprints_after": {}, "approximate": True,
                     "svd": {n: m["svd"] for n, m in layout.items() if m["svd"]}, "imported_from": str(directory)})
        for m in metas[1:]:  # the base of each matrix is the oldest patch's
            for k, v in (m.get("fingerprints") or {}).items():
                meta["fingerprints"].setdefault(k, v)
        return [Patch(approximate, meta)]
    patches = []
    for meta, deltas in zip(metas, out):
        deltas = [d for _, d in sorted(deltas, key=lambda x: x[0])]
        if sorted({d.layer for d in deltas}) != sorted(meta.get("layers", [])):
            raise PatchError(f"{directory}: the factors do not cover the layers of patch {meta.get('method')!r}")
        patches.append(Patch(deltas, {**meta, "imported_from": str(directory)}))
    return patches
