"""Activation hooks: context managers that read and rewrite module activations, stop a
forward early, or start it in the middle of the layer stack (nethook-style; this is not
causal tracing, which lives in :mod:`factedit.trace`).

    with Hook(model.model.layers[3].mlp.down_proj, retain_input=True) as h:
        model(ids)
    keys = h.input                      # (batch, seq, d_ff)

Hooks are registered in ``__enter__`` and always removed in ``__exit__``. Decoder layers
of current ``transformers`` return either a tensor or a tuple whose first element is the
hidden state; :func:`unwrap` / :func:`rewrap` are the one place that knows this.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["StopForward", "Hook", "RawOutput", "unwrap", "rewrap", "replaced_forward", "start_at_layer"]


class StopForward(Exception):
    """Raised inside a hook to abandon the rest of a forward pass (caught by the context)."""


def unwrap(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, or tuple/list with it first)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output)!r}")


def rewrap(original: Any, hidden: torch.Tensor) -> Any:
    """``original`` with its hidden-state tensor replaced by ``hidden``."""
    if isinstance(original, torch.Tensor):
        return hidden
    return type(original)((hidden, *original[1:]))


class Hook(contextlib.AbstractContextManager):
    """Retain and/or rewrite the input and output of one module.

    Args:
        module: the module to hook.
        retain_input: keep ``t.input`` (the first positional input tensor).
        retain_output: keep ``t.output`` (the unwrapped output tensor).
        edit_output: ``fn(hidden) -> hidden`` applied to the output hidden state.
        stop: raise :class:`StopForward` after this module ran (the enclosing ``with``
            swallows it), so nothing after the module is computed.
        detach: store retained tensors detached (default) or keep their graph.
    """

    def __init__(
        self,
        module: nn.Module,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        stop: bool = False,
        detach: bool = True,
    ):
        self.module = module
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.edit_output = edit_output
        self.stop = stop
        self.detach = detach
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, module, inputs, output):
        if self.retain_input:
            x = inputs[0] if inputs else None
            self.input = x.detach() if (self.detach and x is not None) else x
        if self.edit_output is not None:
            output = rewrap(output, self.edit_output(unwrap(output)))
        if self.retain_output:
            h = unwrap(output)
            self.output = h.detach() if self.detach else h
        if self.stop:
            raise StopForward()
        return output

    def __enter__(self) -> "Hook":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Temporarily replace ``module.forward`` (an instance attribute; restored on exit)."""
    had_own = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = old
        else:
            del module.forward


class RawOutput(Hook):
    """Keeps a module's raw output object (tensor or tuple), so that a replaced forward can
    return an object of the same structure (see :func:`start_at_layer`)."""

    def __init__(self, module: nn.Module):
        super().__init__(module)

    def _hook(self, module, inputs, output):
        self.output = output
        return output


@contextlib.contextmanager
def start_at_layer(layers, index: int, hidden: torch.Tensor, template: Any) -> Iterator[None]:
    """Run a forward as if it started after layer ``index`` of ``layers``: layers ``< index``
    pass their input through unchanged and layer ``index`` returns ``hidden`` (its recorded
    output), wrapped like ``template`` (a raw layer output, see :class:`RawOutput`).

    The later layers then compute only what depends on the change made after ``index``; causal
    tracing (restored runs) and value optimisation (each Adam step) both skip the early layers so.
    """

    def skip(*args, **kwargs):
        return rewrap(template, args[0] if args else kwargs["hidden_states"])

    def inject(*args, **kwargs):
        return rewrap(template, hidden)

    with contextlib.ExitStack() as stack:
        for j in range(index):
            stack.enter_context(replaced_forward(layers[j], skip))
        stack.enter_context(replaced_forward(layers[index], inject))
        yield
