"""What every ``factedit`` command shares: model options, argument types, logging, model loading."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Optional, Tuple

__all__ = ["layers_arg", "layer_arg", "arch_spec", "add_model_options", "setup_logging", "load", "method_names",
           "stats_options"]


def layer_arg(text: str):
    """A layer number, or ``traced`` (the cached causal-trace recommendation; an argparse type)."""
    if text.strip() == "traced":
        return "traced"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes a layer number or 'traced', got {text!r}") from None


def layers_arg(text: str) -> Tuple[int, ...]:
    """``"3,4,5"`` -> ``(3, 4, 5)`` (an argparse type)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got {text!r}") from None


def arch_spec(path: Optional[str]):
    """The :class:`~factedit.core.arch.ArchSpec` in a JSON file (``--arch-spec``), or ``None``."""
    if not path:
        return None
    from ..core.arch import ArchSpec
    from ..core.errors import ArchitectureError

    try:
        return ArchSpec(**json.loads(open(path, encoding="utf-8").read()))
    except (OSError, ValueError, TypeError) as e:
        raise ArchitectureError(f"cannot read architecture spec {path}: {e}") from None


def method_names(baseline: Optional[str] = None) -> str:
    """The registered editing methods for a help text, the default first."""
    from ..edit.methods.registry import METHODS

    names = [f"{m} (default)" if i == 0 else m for i, m in enumerate(METHODS)]
    return ", ".join(names + ([baseline] if baseline else []))


def add_model_options(p: argparse.ArgumentParser, corpus: bool = True, json_option: bool = True) -> None:
    """The options of every command that loads a model."""
    p.add_argument("--model", default=None, help="hub id or local directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--device", default=None,
                   help="e.g. cpu, cuda:0 (default: cpu); under torchrun, cuda means each rank's own GPU (LOCAL_RANK)")
    p.add_argument("--device-map", default=None, metavar="auto|balanced|sequential|FILE.json",
                   help="place the model with accelerate: a strategy, or a JSON file of module name -> device "
                        "(0, cuda:1, cpu, disk)")
    p.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE[,...]",
                   help="what each device may hold with --device-map, e.g. 0=20GiB,cpu=64GiB")
    p.add_argument("--offload-folder", default=None, metavar="DIR",
                   help="where weights offloaded to disk are kept (edited ones are written there)")
    if corpus:
        p.add_argument("--corpus", default=None,
                       help="text for the key statistics: .txt/.jsonl path, wikitext-103, wikipedia, model, auto (default)")
        p.add_argument("--stats-tokens", type=int, default=None,
                       help="tokens for the statistics (default from the model width)")
        p.add_argument("--stats-seq-len", type=int, default=None, metavar="N",
                       help="tokens per sequence of the statistics' forwards (default 256, whatever the context length)")
        p.add_argument("--stats-dtype", choices=("float64", "float32"), default=None,
                       help="accumulator of the statistics (default float64; float32 halves its memory)")
    p.add_argument("--arch-spec", default=None, help="JSON file naming the modules of an unknown architecture")
    p.add_argument("--prompt-prefix", default="auto", metavar="auto|none|TEXT",
                   help="what every prompt starts with: auto (default: nothing if the tokenizer adds a BOS, "
                        "else a newline, so that no subject sits at position 0), none, or a text")
    if json_option:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true")


def stats_options(args) -> dict:
    """The statistics options of the parsed arguments, as config fields (only those given)."""
    out = {"stats_corpus": args.corpus, "stats_tokens": args.stats_tokens}
    if getattr(args, "stats_seq_len", None) is not None:
        out["stats_seq_len"] = args.stats_seq_len
    if getattr(args, "stats_dtype", None) is not None:
        out["stats_dtype"] = args.stats_dtype
    return out


def load(args):
    """``(model, tokenizer)`` of the parsed model options."""
    from ..core.errors import ModelLoadError
    from ..core.models import load_model, parse_device_map, parse_max_memory

    device_map = parse_device_map(getattr(args, "device_map", None))
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    if max_memory and device_map is None:
        raise ModelLoadError("--max-memory needs --device-map (e.g. --device-map auto)")
    if device_map is not None and args.device is not None:
        raise ModelLoadError("give --device or --device-map, not both")
    device = args.device
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: each rank its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return load_model(args.model, dtype=args.dtype, device=device, device_map=device_map,
                      max_memory=max_memory, offload_folder=getattr(args, "offload_folder", None))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:
            pass
