"""The hyperparameter files users already have: the ROME / MEMIT research repositories' JSON and EasyEdit's YAML
for ROME, R-ROME, MEMIT, EMMET and AlphaEdit, read as they are (``--hparams FILE``; docs/MIGRATING.md).

    hp = read_hparams("hparams/ROME/gpt2-medium.json")
    hp.method, hp.options            # "rome", MethodOptions(layer=8, fields=(("value.steps", 20), ...))
    for row in hp.rows: ...          # (their key, their value, our option, our value, note): `factedit hparams FILE`

Every key of the file is mapped onto an option of ours, or checked (module templates, the loss layer), or named
as meaningless here (device, stats_dir, ...) in :attr:`Hparams.warnings`; an unknown key, a method we do not
have, a value we cannot honour, is a :class:`~factedit.core.errors.MethodError`. The module templates are
checked against the model in :func:`check_modules` (called by ``make_config``): the file must edit the matrix
factedit edits, and every module it names must exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ...core.errors import MethodError
from .options import MethodOptions

__all__ = ["Hparams", "read_hparams", "apply_hparams", "check_modules", "ALG_NAMES"]

#: EasyEdit's alg_name -> our method (its ROME is the original code's update: our `rome`)
ALG_NAMES = {"ROME": "rome", "R-ROME": "r-rome", "MEMIT": "memit", "EMMET": "emmet", "AlphaEdit": "alphaedit"}
#: keys that set a field of our value-optimisation config
VALUE_KEYS = {"v_num_grad_steps": "value.steps", "v_lr": "value.lr", "v_weight_decay": "value.weight_decay",
              "clamp_norm_factor": "value.clamp_norm_factor", "kl_factor": "value.kl_factor"}
#: module templates (checked against the model, not options)
MODULE_KEYS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
               "lm_head_module")
#: keys with no meaning here, and why
IGNORED = {"device": "the device comes from --device / the model's placement",
           "model_parallel": "placement comes from --device-map",
           "fp16": "the dtype comes from --dtype", "stats_dir": "statistics are cached under $FACTEDIT_HOME",
           "model_name": "the model comes from --model",
           "P_loc": "the null-space projector is computed from the statistics and cached under $FACTEDIT_HOME",
           "alg_name": None}
BATCH = ("memit", "emmet", "alphaedit")


@dataclass
class Hparams:
    """A hyperparameter file read and mapped (:func:`read_hparams`)."""

    path: str
    method: str
    options: MethodOptions
    rows: List[Tuple[str, Any, Optional[str], Any, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    modules: Dict[str, str] = field(default_factory=dict)
    loss_layer: Optional[int] = None


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MethodError(f"cannot read hparams file {path}: {e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json / yaml parse errors
        raise MethodError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise MethodError(f"{path}: an hparams file is a mapping of keys to values")
    return data


def _number(key: str, value, kind=float):
    """YAML 1.1 reads ``5e-1`` as text: numbers are converted here, anything else refused."""
    if isinstance(value, bool):
        raise MethodError(f"hparams {key}: expected a number, got {value!r}")
    try:
        out = kind(value) if kind is float else int(value)
    except (TypeError, ValueError):
        raise MethodError(f"hparams {key}: expected a number, got {value!r}") from None
    if kind is int and float(value) != out:
        raise MethodError(f"hparams {key}: expected a whole number, got {value!r}")
    return out


def _method_of(data: dict, path: Path, method: Optional[str]) -> str:
    alg = data.get("alg_name")
    if alg is not None:
        if alg not in ALG_NAMES:
            raise MethodError(f"{path}: alg_name {alg!r} is not a method factedit has "
                              f"({', '.join(ALG_NAMES)} are read)")
        found = ALG_NAMES[alg]
    else:  # the research repositories' JSON: the folder names the method, else the keys do
        parts = {p.upper() for p in path.parts}
        found = "memit" if "MEMIT" in parts else "rome" if "ROME" in parts else (
            "memit" if "mom2_update_weight" in data else "rome")
    if method is not None and method != found:
        raise MethodError(f"{path} is a {found} hparams file, but the method asked for is {method}")
    return found


def read_hparams(path, method: Optional[str] = None) -> Hparams:
    """Read and map one file (``method``: the method the caller asked for; a different one in the file is an
    error). Nothing about the model is checked here (:func:`check_modules`)."""
    path = Path(path)
    if not path.is_file():
        raise MethodError(f"hparams file not found: {path}")
    data = _load(path)
    m = _method_of(data, path, method)
    rows, warnings, fields, modules = [], [], [], {}
    layer = layers = None
    stats: Dict[str, Any] = {}
    loss_layer = None

    def row(key, ours, value, note=""):
        rows.append((key, data[key], ours, value, note))

    for key in data:
        v = data[key]
        if key == "layers":
            if not isinstance(v, list) or not v:
                raise MethodError(f"{path}: layers must be a non-empty list, got {v!r}")
            ls = tuple(_number("layers", x, int) for x in v)
            if m in BATCH:
                layers = ls
                row(key, "layers", list(ls))
            else:
                if len(ls) != 1:
                    raise MethodError(f"{path}: {m} edits one layer; the file gives {list(ls)}")
                layer = ls[0]
                row(key, "layer", layer)
        elif key in VALUE_KEYS:
            kind = int if key == "v_num_grad_steps" else float
            value = _number(key, v, kind)
            fields.append((VALUE_KEYS[key], value))
            row(key, VALUE_KEYS[key], value)
        elif key == "fact_token":
            if v not in ("subject_last", "subject_first", "last"):
                raise MethodError(f"{path}: fact_token {v!r} is not one factedit has (subject_last, subject_first, "
                                  "last)")
            fields.append(("fact_token", v))
            row(key, "fact_token", v)
        elif key == "context_template_length_params":
            try:
                lengths = tuple((int(a), int(b)) for a, b in v)
            except (TypeError, ValueError):
                raise MethodError(f"{path}: context_template_length_params must be [[tokens, count], ...]") from None
            fields.append(("context_lengths", lengths))
            row(key, "context_lengths", [list(x) for x in lengths])
        elif key == "mom2_adjustment":
            if not isinstance(v, bool):
                raise MethodError(f"{path}: mom2_adjustment must be true or false, got {v!r}")
            if m in BATCH:
                if not v:
                    raise MethodError(f"{path}: mom2_adjustment false (no key statistics) is not available for "
                                      f"{m}: its solve needs C")
                row(key, None, True, "C is always used by " + m)
            else:
                fields.append(("mom2_adjustment", v))
                row(key, "mom2_adjustment", v, "" if v else "C = I: no covariance, locality suffers")
                if not v:
                    warnings.append(f"{path.name}: mom2_adjustment is false: the update is written without the key "
                                    "statistics (C = I), the 'simple ROME' whose edits spill onto other facts; "
                                    "set mom2_adjustment=true (--set mom2_adjustment=true) to use C")
        elif key == "mom2_dataset":
            stats["stats_corpus"] = str(v)
            row(key, "stats_corpus", str(v))
        elif key == "mom2_n_samples":
            n = _number(key, v, int)
            stats["stats_tokens"] = n
            row(key, "stats_tokens", n, "samples read as tokens")
            warnings.append(f"{path.name}: mom2_n_samples {n} counts texts in the research code, tokens here: the "
                            f"statistics use {n} tokens (fewer than the original's {n} texts); raise --stats-tokens "
                            "for more")
        elif key == "mom2_dtype":
            if v not in ("float32", "float64"):
                raise MethodError(f"{path}: mom2_dtype {v!r}: float32 or float64")
            stats["stats_dtype"] = v
            row(key, "stats_dtype", v)
        elif key == "mom2_update_weight":
            value = _number(key, v)
            if m == "emmet":
                row(key, None, value, "scales C; with emmet_lambda sets EMMET's ridge")
            else:
                fields.append(("mom2_update_weight", value))
                row(key, "mom2_update_weight", value)
        elif key == "layer_selection":
            if v != "all":
                raise MethodError(f"{path}: layer_selection {v!r}: only 'all' (every layer of the span) exists here")
            row(key, None, v, "every layer of the span is edited")
        elif key == "v_loss_layer":
            loss_layer = _number(key, v, int)
            row(key, None, loss_layer, "checked: the target's loss is read at the last layer")
        elif key in MODULE_KEYS:
            if not isinstance(v, str):
                raise MethodError(f"{path}: {key} must be a module path, got {v!r}")
            modules[key] = v
            row(key, None, v, "checked against the model")
        elif key == "nullspace_threshold" and m == "alphaedit":
            value = _number(key, v)
            fields.append(("nullspace_threshold", value))
            row(key, "nullspace_threshold", value)
        elif key == "L2" and m == "alphaedit":
            value = _number(key, v)
            fields.append(("alpha", value))
            row(key, "alpha", value)
        elif key == "emmet_lambda" and m == "emmet":
            row(key, None, _number(key, v), "with mom2_update_weight sets EMMET's ridge")
        elif key == "update_norm_lambda" and m == "emmet":
            if _number(key, v) != 0:
                raise MethodError(f"{path}: update_norm_lambda {v!r}: only 0 is available here")
            row(key, None, 0, "0: nothing added to C")
        elif key in ("original_implementation", "enable_prompt_keys", "enable_random_prefix_keys") and m in (
                "r-rome", "rome"):
            row(key, None, v, "chooses the ROME variant")
        elif key in IGNORED:
            note = IGNORED[key]
            row(key, None, None, note or "the method")
            if note:
                warnings.append(f"{path.name}: {key} has no meaning here ({note})")
        else:
            raise MethodError(f"{path}: unknown hparams key {key!r} for {m}")
    if m == "emmet":
        lam, weight = data.get("emmet_lambda"), data.get("mom2_update_weight", 1)
        if lam is not None:
            ridge = _number("emmet_lambda", lam) * _number("mom2_update_weight", weight)
            fields.append(("ridge", ridge))
            rows.append(("emmet_lambda × mom2_update_weight", None, "ridge", ridge,
                         "EMMET's D + λI with C scaled by the weight"))
    if m in ("r-rome", "rome") and any(k in data for k in ("original_implementation", "enable_prompt_keys")):
        if data.get("original_implementation"):
            m = "rome"
        elif data.get("enable_prompt_keys") and not data.get("enable_random_prefix_keys", True):
            m = "p-rome"
        else:
            m = "r-rome"
    opts = MethodOptions(method=m, layer=layer, layers=layers, fields=tuple(fields), hparams=str(path), **stats)
    return Hparams(str(path), m, opts, rows, warnings, modules, loss_layer)


def apply_hparams(options: MethodOptions) -> Tuple[MethodOptions, Hparams]:
    """``options`` with its hparams file (``options.hparams``) under it: what the user gave on top wins (layer,
    layers, steps, statistics, ``--set`` fields), the file's method must be the one asked for; and the file as
    read (for :func:`check_modules` and its warnings)."""
    hp = read_hparams(options.hparams, method=options.method)
    base = hp.options
    given = {k: getattr(options, k) for k in ("layer", "layers", "steps", "target_batch", "seed", "stats_corpus",
                                               "stats_tokens", "stats_seq_len", "stats_dtype")
             if getattr(options, k) is not None}
    if "layer" in given or "layers" in given:
        base = replace(base, layer=None, layers=None)
    return replace(base, **given, fields=base.fields + tuple(options.fields), layer_rule=options.layer_rule,
                   hparams=options.hparams), hp


def check_modules(adapter, hp: Hparams, layers) -> List[str]:
    """The file's module templates against the model: the edited matrix must be factedit's W_out at every edited
    layer, and every module the file names must exist (:class:`~factedit.core.errors.MethodError` otherwise);
    returns warnings (modules that exist but play another role here, a loss layer other than the last)."""
    model = adapter.model
    names = {n for n, _ in model.named_modules()}
    out = []
    mods = hp.modules
    for key, tmpl in mods.items():
        name = tmpl.format(layers[0]) if "{}" in tmpl else tmpl
        if name not in names:
            raise MethodError(f"{Path(hp.path).name}: {key} {tmpl!r} names {name!r}, which this model "
                              f"({type(model).__name__}) does not have: the file is for another architecture")
    if "rewrite_module_tmp" in mods:
        for layer in layers:
            theirs, ours = mods["rewrite_module_tmp"].format(layer), adapter.w_out_name(layer)
            if theirs != ours:
                raise MethodError(f"{Path(hp.path).name}: the file edits {theirs}, factedit edits the MLP output "
                                  f"matrix {ours}")
    if "layer_module_tmp" in mods and mods["layer_module_tmp"].format(0) != f"{adapter.spec.layers}.0":
        raise MethodError(f"{Path(hp.path).name}: layer_module_tmp {mods['layer_module_tmp']!r} is not this model's "
                          f"decoder layers ({adapter.spec.layers}.{{}})")
    if hp.loss_layer is not None and hp.loss_layer != adapter.n_layers - 1:
        out.append(f"{Path(hp.path).name}: v_loss_layer {hp.loss_layer} is not this model's last layer "
                   f"({adapter.n_layers - 1}); factedit reads the target's loss at the output, as the research code "
                   "does with the last layer")
    return out
