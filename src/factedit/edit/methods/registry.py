"""The registry of editing methods: each method module registers itself here (PEFT's
``register_peft_method``), and everything above it — the Editor, its history, the command line, the
evaluation and the web page — learns a method's name, config, state and retry rule from its
:class:`MethodSpec`, never from its module.

    register(MethodSpec("mymethod", MyConfig, compute_mymethod))
    cfg = make_config(adapter, MethodOptions("mymethod", layers=(4, 5)))
    computed = method_spec("mymethod").compute(adapter, caches, requests, cfg, state=None)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, Optional

from ...core.errors import MethodError
from .options import MethodOptions, from_jsonable, with_options

log = logging.getLogger(__name__)

__all__ = ["MethodSpec", "REGISTRY", "METHODS", "register", "unregister", "method_spec", "spec_of_config",
           "default_method", "method_names", "make_config", "config_from_dict"]

#: fields that configs written by earlier versions have and today's do not (read, then dropped): the method's
#: name was ROME's ``variant``; ``arch`` was never read (the module layout is the Editor's)
LEGACY_FIELDS = {"variant": "method", "arch": None}


@dataclass(frozen=True)
class MethodSpec:
    """One registered editing method.

    Attributes:
        name: the name users pass (``--method``); the config's ``method`` field holds it.
        config: its config dataclass (frozen; a ``method`` field; ``resolved(adapter)`` fills model-derived
            defaults; ``layers`` lists the edited layers).
        compute: ``(adapter, caches, requests, config, state) -> Computed``; must leave the weights
            as it found them.
        single_request: the method edits one request per computation (ROME): several requests are
            edited one after another.
        fold_state: for methods that carry state across sequential edits: ``(state or None, update) -> state``,
            a new state with an edit's ``Computed.state_update`` folded in (``state`` is not modified).
            Replaying the same updates in the same order must reproduce the state bit for bit: that is how
            a revert restores it.
        retry: ``config -> config or None``: the config of the one retry an edit that did not take on its own
            prompt gets (single-request methods; ``None``: no retry).
        prefetch: ``(adapter, caches, requests, config, batch_size) -> None``: optimise the targets of several
            single edits together ahead of their computations (single-request methods; ``None``: nothing to do).
        norm_limit: the collapse guard's calibrated ‖Δ‖ limit applies: the updates are ROME's rank-one form at
            one ``layer``, with key statistics (``stats_*`` fields) and a value clamp (``value``); otherwise the
            guard judges by generation entropy alone.
        room: ``(adapter, caches, config, state) -> {layer: (null_dims, unused)}``: for projection methods, the
            dimensions of the preserved null space and those the method's state leaves unused (the wear
            meter's room left; ``None``: not a projection method).
        distinct_prompts: a batch must not ask one prompt twice (one answer is written per prompt; the method
            refuses such a batch): an evaluation leaves the later request out of its batch, as a failed edit.
    """

    name: str
    config: type
    compute: Callable
    single_request: bool = False
    fold_state: Optional[Callable] = None
    retry: Optional[Callable] = None
    prefetch: Optional[Callable] = None
    norm_limit: bool = False
    room: Optional[Callable] = None
    distinct_prompts: bool = False

    @property
    def field_names(self) -> set:
        return {f.name for f in fields(self.config)}

    @property
    def single_layer(self) -> bool:
        """The config edits one ``layer`` (else a span of ``layers``)."""
        return "layer" in self.field_names

    @property
    def stateful(self) -> bool:
        return self.fold_state is not None


#: name -> :class:`MethodSpec`, in registration order
REGISTRY: Dict[str, MethodSpec] = {}
#: name -> config class of every registered method (kept in step with :data:`REGISTRY`)
METHODS: Dict[str, type] = {}
_DEFAULT: list = []  # the name registered with default=True


def register(spec: MethodSpec, default: bool = False) -> MethodSpec:
    """Add a method to the registry (a name may be registered once); ``default``: the method a front end
    uses when the user names none (else the first registered)."""
    if spec.name in REGISTRY:
        raise MethodError(f"method {spec.name!r} is already registered")
    if "method" not in spec.field_names:
        raise MethodError(f"the config of method {spec.name!r} ({spec.config.__name__}) needs a 'method' field")
    REGISTRY[spec.name] = spec
    METHODS[spec.name] = spec.config
    if default:
        _DEFAULT[:] = [spec.name]
    return spec


def unregister(name: str) -> None:
    """Remove a registered method (tests that register their own)."""
    REGISTRY.pop(name, None)
    METHODS.pop(name, None)
    if name in _DEFAULT:
        _DEFAULT.clear()


def default_method() -> str:
    """The method front ends use when none is named."""
    if _DEFAULT:
        return _DEFAULT[0]
    if not REGISTRY:
        raise MethodError("no editing method is registered")
    return next(iter(REGISTRY))


def method_names() -> list:
    """The registered names, the default first."""
    first = default_method()
    return [first] + [n for n in REGISTRY if n != first]


def method_spec(method: str) -> MethodSpec:
    """The registered method ``method``; a clear error listing the names otherwise."""
    if method not in REGISTRY:
        raise MethodError(f"unknown method {method!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[method]


def spec_of_config(cfg) -> MethodSpec:
    """The registered method a config object belongs to (its ``method`` field)."""
    return method_spec(getattr(cfg, "method", None) or "")


def make_config(adapter, options: MethodOptions):
    """The config dataclass of ``options.method`` with model-derived defaults filled in; bad methods, layers
    and options fail here, before any work.

    ``layer`` and ``layers`` are accepted for every method (a single-layer method takes a span of one);
    ``steps`` sets the method's optimisation steps; ``target_batch`` its ``batch_size`` (methods that
    optimise targets together); the statistics options and ``seed`` are ignored by a config without them.
    ``options.fields`` (``--set`` pairs, or typed values from Python) are set last, text converted to the
    field's type (:func:`~factedit.edit.methods.options.with_options`).
    """
    hp = None
    if options.method is None and not options.hparams:
        options = replace(options, method=default_method())
    if options.hparams:
        from .hparams import apply_hparams

        options, hp = apply_hparams(options)
        for text in hp.warnings:
            log.warning("%s", text)
    spec = method_spec(options.method)
    names = spec.field_names
    kwargs: Dict[str, object] = {"method": spec.name}
    layer, layers = options.layer, options.layers
    if spec.single_layer:
        if layers is not None:
            if len(layers) != 1:
                raise MethodError(f"{spec.name} edits a single layer; got layers {list(layers)}")
            layer = layers[0]
        if layer is not None:
            kwargs["layer"] = layer
    elif layers is not None or layer is not None:
        kwargs["layers"] = tuple(layers) if layers is not None else (layer,)
    for name, value in options.common.items():
        if name in names and value is not None:
            kwargs[name] = value
    if options.layer_rule:
        kwargs["layer_rule"] = options.layer_rule
    if options.target_batch is not None:
        if "batch_size" not in names:
            raise MethodError(f"{spec.name} optimises no targets together: --target-batch is for "
                              + ", ".join(n for n, s in REGISTRY.items() if "batch_size" in s.field_names))
        kwargs["batch_size"] = options.target_batch
    try:
        cfg = spec.config(**kwargs)
    except TypeError as e:
        raise MethodError(f"invalid option for {spec.name}: {e}") from None
    if options.steps is not None:
        cfg = with_options(cfg, {"steps" if "steps" in names else "value.steps": options.steps})
    cfg = with_options(cfg, dict(options.fields)).resolved(adapter)
    if hp is not None:
        from .hparams import check_modules

        for text in check_modules(adapter, hp, cfg.layers):
            log.warning("%s", text)
    return cfg


def config_from_dict(method: str, data):
    """The config of a registered ``method`` from its JSON form (a patch's or a run's record, also one written
    by an earlier version: :data:`LEGACY_FIELDS`); ``data`` as it is when ``method`` is not registered here
    or ``data`` is not a mapping."""
    if method not in REGISTRY or not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in LEGACY_FIELDS.items():
        if old in data:
            value = data.pop(old)
            if new is not None:
                data.setdefault(new, value)
    return from_jsonable(REGISTRY[method].config, data)
