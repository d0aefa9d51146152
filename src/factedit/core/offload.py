"""Weights that accelerate keeps away from their module: where a module runs, and reading and
writing a parameter wherever it is stored.

A model dispatched by accelerate (``device_map=...``) carries an ``AlignDevicesHook`` on its
modules. A module whose weights are *offloaded* holds ``meta`` tensors; the hook loads the real
ones from its ``weights_map`` before each forward (a CPU state dict, or files in the offload folder,
or the checkpoint's own safetensors file) and drops them after. So an edit must write where the
hook reads:

    execution_device(layer)        # cuda:0 for a layer on cuda:0 *or* offloaded with cuda:0 execution
    W = read(down_proj)            # the weight's values wherever they are kept (CPU copy if offloaded)
    write(down_proj, "weight", W2) # in place, in the CPU state dict, or a new .dat file (atomic)

A checkpoint's own file is never written: an offloaded weight read from it gets its edited values
as ``<key>.dat`` in the offload folder, and the hook's index points there from then on.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator, Tuple

import torch
from torch import nn

from .errors import FactEditError
from .paths import atomic_path, atomic_write_text

__all__ = ["align_hook", "execution_device", "precise_dtype", "is_offloaded", "read", "write", "named_weights"]


def align_hook(module: nn.Module):
    """The accelerate ``AlignDevicesHook`` on ``module`` (inside a ``SequentialHook`` too), or None."""
    hook = getattr(module, "_hf_hook", None)
    stack = [hook] if hook is not None else []
    while stack:
        h = stack.pop(0)
        if hasattr(h, "execution_device") and hasattr(h, "weights_map"):
            return h
        stack.extend(getattr(h, "hooks", ()) or ())
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device, else that of its first tensor that is
    not on ``meta`` (parameters, then buffers; CPU for a module without either)."""
    hook = align_hook(module)
    if hook is not None and hook.execution_device is not None:
        dev = hook.execution_device
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    for sub in module.modules():  # offloaded children carry the execution device on their hooks
        hook = align_hook(sub)
        if hook is not None and hook.execution_device is not None:
            return execution_device(sub)
    return torch.device("cpu")


def precise_dtype(device) -> torch.dtype:
    """The dtype of sums and solves on ``device``: float64, except where the device has none (MPS:
    float32)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def is_offloaded(module: nn.Module, name: str = "weight") -> bool:
    """True when parameter ``name`` of ``module`` is a ``meta`` placeholder loaded by a hook."""
    hook = align_hook(module)
    p = getattr(module, name)
    return hook is not None and bool(getattr(hook, "offload", False)) and p.device.type == "meta"


def _slot(module: nn.Module, name: str) -> Tuple[object, str]:
    """The mapping that holds ``module``'s offloaded ``name`` and its key there."""
    wm = align_hook(module).weights_map
    if wm is None:
        raise FactEditError(f"{type(module).__name__}.{name} is on the meta device and no hook holds its values")
    prefix = getattr(wm, "prefix", None)
    if prefix is not None and hasattr(wm, "dataset"):
        return wm.dataset, prefix + name
    return wm, name


def read(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The values of ``module.<name>``: the parameter itself when resident (a view: do not write
    to it), else the hook's stored values (CPU)."""
    p = getattr(module, name)
    if not is_offloaded(module, name):
        return p.detach()
    store, key = _slot(module, name)
    return store[key].detach()


def _store_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _write_dat(folder: Path, key: str, value: torch.Tensor) -> dict:
    """``value`` as accelerate's ``<key>.dat`` memory-map file in ``folder`` (atomic); its index entry."""
    import numpy as np

    v = value.detach().to("cpu").contiguous()
    raw = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
    arr = raw.numpy()
    try:
        with atomic_path(folder / f"{key}.dat") as tmp:
            mm = np.memmap(tmp, dtype=arr.dtype, mode="w+", shape=arr.shape if arr.shape else (1,))
            mm[...] = arr if arr.shape else arr.reshape(1)
            mm.flush()
            del mm
    except OSError as e:
        raise FactEditError(f"the offload folder {folder} is not writable ({e.strerror or e}); the edited weight "
                            f"{key} cannot be stored there (nothing was changed)") from None
    return {"dtype": _store_dtype(value.dtype), "shape": list(value.shape)}


def write(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Store ``value`` as ``module.<name>`` where the model reads it (same dtype and shape): copied
    in place into a resident parameter or a CPU-offloaded one; an offloaded weight on disk is
    written as a new ``.dat`` file in the offload folder (atomically) and the hook's index updated."""
    p = getattr(module, name)
    if tuple(value.shape) != tuple(p.shape) or value.dtype != p.dtype:
        raise FactEditError(f"cannot store a {value.dtype} {tuple(value.shape)} tensor as {name} "
                            f"({p.dtype} {tuple(p.shape)})")
    if not is_offloaded(module, name):
        with torch.no_grad():
            p.copy_(value.to(p.device))
        return
    store, key = _slot(module, name)
    memory = getattr(store, "state_dict", None)
    if memory is not None and key in memory:  # accelerate's loader: its in-memory part first
        store = memory
    index = getattr(store, "index", None)
    if index is not None and key in index:  # accelerate's loader, on disk
        folder = getattr(store, "save_folder", None)
        if folder is None:
            raise FactEditError(f"the offloaded weight {key} has no offload folder to be written to; "
                                "load the model with an offload folder (--offload-folder DIR)")
        folder = Path(folder)
        index[key] = _write_dat(folder, key, value)
        index_file = folder / "index.json"
        if index_file.is_file():  # keep the folder's own index true (it names what the .dat files are)
            on_disk = json.loads(index_file.read_text())
            on_disk[key] = index[key]
            atomic_write_text(index_file, json.dumps(on_disk, indent=2))
        return
    if isinstance(store, MutableMapping):
        held = store[key]
        with torch.no_grad():
            held.copy_(value.to(held.device))
        return
    raise FactEditError(f"do not know how to write the offloaded weight {key} ({type(store).__name__})")


def named_weights(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, torch.Tensor]]:
    """``(full name, module, name, parameter)`` of every parameter once, in ``named_parameters()``
    order; read the values with :func:`read` (offloaded ones are ``meta`` here)."""
    seen = set()
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{prefix}.{name}" if prefix else name), module, name, p

