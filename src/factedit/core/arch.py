"""Architecture adapter: where the editable pieces of a Hugging Face causal LM live.

All model access in factedit goes through :class:`ModelAdapter`. Facts about module
layout are *declared* per ``config.model_type`` in :data:`ARCH_SPECS` (never guessed from
shapes); an unknown architecture raises :class:`ArchitectureError` explaining how to pass
an explicit :class:`ArchSpec` instead.

    adapter = ModelAdapter(model, tokenizer)
    W = adapter.w_out_weight(5)          # (d_model, d_ff) view, whatever the storage
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from torch import nn

from . import offload
from .errors import ArchitectureError, FactEditError, LayerError
from .tokens import prompt_prefix_of, with_prompt_prefix

__all__ = ["ArchSpec", "ARCH_SPECS", "ModelAdapter", "spec_for"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family (dotted, as in ``model.named_modules()``).

    Attributes:
        layers: the ``nn.ModuleList`` of decoder layers, from the top-level model.
        body: the base transformer (returns final-normed hidden states), from the top.
        mlp: the MLP inside a layer, relative to the layer.
        w_out: the MLP output matrix W_out (the edited matrix), relative to the layer.
            Its *input* is the key k, its *output* the value v = W_out k.
        attn: the attention module, relative to the layer.
        final_norm: the final normalisation, from the top.
        embed: the token embedding, from the top (``None``: ``get_input_embeddings()``).
        unembed: the output projection (LM head), from the top
            (``None``: ``get_output_embeddings()``).
        fan_in_fan_out: True when W_out stores its weight as (in, out) (GPT-2 ``Conv1D``);
            False for ``nn.Linear`` (out, in).
        logit_multiplier: name of a config attribute the head's logits are multiplied by (Cohere's
            ``logit_scale``), or ``None``.
        logit_divisor: name of a config attribute the head's logits are divided by (Granite's
            ``logits_scaling``), or ``None``.
    """

    layers: str
    body: str
    mlp: str
    w_out: str
    attn: str
    final_norm: str
    embed: Optional[str] = None
    unembed: Optional[str] = None
    fan_in_fan_out: bool = False
    logit_multiplier: Optional[str] = None
    logit_divisor: Optional[str] = None


_LLAMA_LIKE = ArchSpec(
    layers="model.layers", body="model", mlp="mlp", w_out="mlp.down_proj", attn="self_attn",
    embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
)

#: Module layout per ``config.model_type``.
ARCH_SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h", body="transformer", mlp="mlp", w_out="mlp.c_proj", attn="attn",
        final_norm="transformer.ln_f", fan_in_fan_out=True,
    ),
    "gptj": ArchSpec(
        layers="transformer.h", body="transformer", mlp="mlp", w_out="mlp.fc_out", attn="attn",
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", body="gpt_neox", mlp="mlp", w_out="mlp.dense_4h_to_h",
        attn="attention", final_norm="gpt_neox.final_layer_norm",
    ),
    **{
        mt: _LLAMA_LIKE
        for mt in (
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "phi3",
            "smollm3",
        )
    },
    "granite": replace(_LLAMA_LIKE, logit_divisor="logits_scaling"),
    "cohere": replace(_LLAMA_LIKE, logit_multiplier="logit_scale"),
}


def spec_for(model: nn.Module, override: Optional[ArchSpec] = None) -> ArchSpec:
    """The :class:`ArchSpec` of ``model`` (``override`` wins)."""
    if override is not None:
        return override
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCH_SPECS:
        return ARCH_SPECS[model_type]
    example = ", ".join(f"{k}={v!r}" for k, v in asdict(_LLAMA_LIKE).items())
    raise ArchitectureError(
        f"factedit does not know the module layout of model_type={model_type!r} "
        f"({type(model).__name__}). Known: {', '.join(sorted(ARCH_SPECS))}. "
        "Name the modules explicitly with an ArchSpec, e.g. "
        f"Editor(model, tokenizer, arch=ArchSpec({example})) in Python, or "
        "--arch-spec FILE.json (the same fields as JSON) on the command line."
    )


def _get(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise ArchitectureError(
            f"module path {path!r} not found in {type(root).__name__}: {e}. "
            "Check the ArchSpec for this model."
        ) from None


class ModelAdapter:
    """Uniform access to a causal LM's layers, MLP output matrices, norms and head.

    Args:
        model: a Hugging Face causal LM (any device / dtype).
        tokenizer: its tokenizer (a fast tokenizer gives exact subject offsets).
        spec: explicit module layout; default from :data:`ARCH_SPECS`.
        prompt_prefix: what every prompt starts with (:func:`~factedit.core.tokens.with_prompt_prefix`:
            ``"auto"``, ``"none"`` or a text); :attr:`tokenizer` is the prefixed tokenizer and
            :attr:`prompt_prefix` the text actually used ("" for none).
    """

    def __init__(self, model: nn.Module, tokenizer=None, spec: Optional[ArchSpec] = None,
                 prompt_prefix: str = "auto"):
        self.model = model
        self.tokenizer = with_prompt_prefix(tokenizer, prompt_prefix) if tokenizer is not None else None
        self.prompt_prefix = prompt_prefix_of(self.tokenizer)
        self.spec = spec_for(model, spec)
        self.layers = _get(model, self.spec.layers)
        if not isinstance(self.layers, nn.ModuleList) or len(self.layers) == 0:
            raise ArchitectureError(f"{self.spec.layers!r} is not a non-empty ModuleList")
        self.body = _get(model, self.spec.body)
        self.embed = _get(model, self.spec.embed) if self.spec.embed else model.get_input_embeddings()
        self.final_norm = _get(model, self.spec.final_norm)
        self.unembed = _get(model, self.spec.unembed) if self.spec.unembed else model.get_output_embeddings()
        if self.embed is None or self.unembed is None:
            raise ArchitectureError("could not find the token embedding / LM head; set ArchSpec.embed/unembed")
        self._w_out_modules = [_get(layer, self.spec.w_out) for layer in self.layers]
        shape = tuple(self.w_out_parameter(0).shape)  # the shape only: meta when offloaded
        self.d_model, self.d_ff = (shape[1], shape[0]) if self.spec.fan_in_fan_out else shape
        cfg = getattr(model, "config", None)
        self.logit_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = 1.0
        if self.spec.logit_multiplier:
            self.logit_scale *= float(getattr(cfg, self.spec.logit_multiplier))
        if self.spec.logit_divisor:
            self.logit_scale /= float(getattr(cfg, self.spec.logit_divisor))
        self.model_type = getattr(cfg, "model_type", "custom")

    # ----------------------------------------------------------------- layers
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise LayerError(
                f"layer {layer!r} is out of range: this model has {self.n_layers} layers (0..{self.n_layers - 1})"
            )
        return layer

    def layer(self, i: int) -> nn.Module:
        return self.layers[self.check_layer(i)]

    def mlp(self, i: int) -> nn.Module:
        return _get(self.layer(i), self.spec.mlp)

    def attn(self, i: int) -> nn.Module:
        return _get(self.layer(i), self.spec.attn)

    def component(self, kind: str, i: int) -> nn.Module:
        """The module whose output causal tracing restores: ``"hidden"`` (the layer's residual
        output), ``"mlp"`` or ``"attn"`` of layer ``i``."""
        if kind == "hidden":
            return self.layer(i)
        if kind == "mlp":
            return self.mlp(i)
        if kind == "attn":
            return self.attn(i)
        raise ValueError(f"unknown component kind {kind!r}; expected hidden, mlp or attn")

    def w_out(self, i: int) -> nn.Module:
        """The module whose input is the key and whose output is the value at layer ``i``."""
        return self._w_out_modules[self.check_layer(i)]

    def w_out_name(self, i: int) -> str:
        return f"{self.spec.layers}.{self.check_layer(i)}.{self.spec.w_out}"

    def w_out_parameter(self, i: int) -> nn.Parameter:
        """The parameter object (``meta`` when accelerate offloads it: read values with :meth:`w_out_stored`)."""
        return self.w_out(i).weight

    def w_out_offloaded(self, i: int) -> bool:
        """True when accelerate keeps W_out of layer ``i`` off its module (CPU state dict or disk)."""
        return offload.is_offloaded(self.w_out(i))

    def w_out_stored(self, i: int) -> torch.Tensor:
        """W_out of layer ``i`` as stored (the parameter's layout and dtype), wherever it is kept: the
        parameter itself when resident (a view), accelerate's stored copy when offloaded."""
        return offload.read(self.w_out(i))

    def w_out_weight(self, i: int) -> torch.Tensor:
        """W_out of layer ``i`` as a (d_model, d_ff) view of the stored values."""
        w = self.w_out_stored(i)
        return w.t() if self.spec.fan_in_fan_out else w

    def set_w_out(self, i: int, stored: torch.Tensor) -> None:
        """Store ``stored`` (the parameter's layout and dtype) as W_out of layer ``i``, where the model
        reads it from (in place, or accelerate's offload map / folder)."""
        offload.write(self.w_out(i), "weight", stored)

    def add_to_w_out(self, i: int, delta: torch.Tensor) -> None:
        """W_out[i] += delta, with ``delta`` (d_model, d_ff); summed in float32 on the weight's device,
        stored in the weight's dtype where the model reads it."""
        w = self.w_out_stored(i)
        d = delta.t() if self.spec.fan_in_fan_out else delta
        with torch.no_grad():
            new = (w.to(torch.float32) + d.to(device=w.device, dtype=torch.float32)).to(w.dtype)
        if not torch.isfinite(new).all():
            raise FactEditError(f"the edited weights of layer {i} overflow the model's dtype ({w.dtype}); "
                                "nothing was changed")
        self.set_w_out(i, new)

    # ----------------------------------------------------------------- head
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final-normed hidden states, as the model's own head computes them (Cohere's
        and Granite's logit scaling, Gemma-2 style soft-capping)."""
        out = self.unembed(hidden)
        if self.logit_scale != 1.0:
            out = out * self.logit_scale
        if self.logit_softcap:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out

    # ----------------------------------------------------------------- misc
    @property
    def max_positions(self) -> int:
        """Longest sequence the model accepts (from its config; large if unstated)."""
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return 1 << 20

    def module_device(self, module: nn.Module) -> torch.device:
        """Where ``module`` computes (accelerate's execution device for dispatched or offloaded ones)."""
        return offload.execution_device(module)

    @property
    def input_device(self) -> torch.device:
        """Where token ids and position tensors go: the embedding's device."""
        return self.module_device(self.embed)

    @property
    def device(self) -> torch.device:
        """The input device (:attr:`input_device`); tensors consumed elsewhere go to their module's device."""
        return self.input_device

    @property
    def head_device(self) -> torch.device:
        """Where the logits are computed (the LM head's device)."""
        return self.module_device(self.unembed)

    def layer_device(self, i: int) -> torch.device:
        """Where layer ``i`` computes (its residual stream lives there)."""
        return self.module_device(self.layer(i))

    def w_out_device(self, i: int) -> torch.device:
        """Where W_out of layer ``i`` computes: keys, statistics and solves of that layer live there."""
        return self.module_device(self.w_out(i))

    def describe(self) -> dict:
        return {
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "w_out": self.w_out_name(0).replace(".0.", ".{layer}."),
            "fan_in_fan_out": self.spec.fan_in_fan_out,
        }
