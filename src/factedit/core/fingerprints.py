"""Identities of weights: a sampled hash of a whole model (cache keys) and the exact hash of
one matrix (patch base checks).

    model_fingerprint(model)                 # 16 hex chars; changes when any weight changes
    model_fingerprint(model, upto_layer=5)   # only what determines layer 5's keys
    matrix_fingerprint(W)                    # SHA-256 of dtype, shape and bytes
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch

from .arch import spec_for
from .offload import named_weights, read

__all__ = ["model_fingerprint", "matrix_fingerprint"]


def model_fingerprint(model, upto_layer: Optional[int] = None, spec=None) -> str:
    """A short hash identifying the model's weights (config + strided samples of parameters).

    With ``upto_layer`` only the parameters that determine the keys of that layer take part
    (embeddings and layers ``0..upto_layer``), so an edit to a later layer does not change it.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
              "quantization_config", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    arch = spec_for(model, spec)
    layers_prefix = arch.layers + "."
    own_w_out = f"{layers_prefix}{upto_layer}.{arch.w_out}."
    for name, module, local, p in named_weights(model):  # offloaded weights are read where accelerate keeps them
        if upto_layer is not None and name.startswith(own_w_out):
            continue  # W_out of the layer itself does not change its keys
        if upto_layer is not None and name.startswith(layers_prefix):
            idx = int(name[len(layers_prefix):].split(".", 1)[0])
            if idx > upto_layer:
                continue
        flat = read(module, local).reshape(-1)
        step = max(1, flat.numel() // 65536)
        sample = flat[::step].to(device="cpu", dtype=torch.float32)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def matrix_fingerprint(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (bit-exact identity of a weight matrix)."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    x = t.detach().cpu().contiguous().reshape(-1)  # row-major bytes, whatever the strides (also of size-1 dims)
    h.update(x.view(torch.uint8).numpy().tobytes() if x.dtype != torch.bfloat16
             else x.view(torch.int16).numpy().tobytes())
    return h.hexdigest()
