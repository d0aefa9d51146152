"""Context managers that read and rewrite module activations, and stop a forward early.

    with Trace(model.model.layers[3].mlp.down_proj, retain_input=True) as t:
        model(ids)
    keys = t.input                      # (batch, seq, d_ff)

Hooks are registered in ``__enter__`` and always removed in ``__exit__``. Decoder layers
of current ``transformers`` return either a tensor or a tuple whose first element is the
hidden state; :func:`unwrap` / :func:`rewrap` are the one place that knows this.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["StopForward", "Trace", "TraceDict", "at_positions", "unwrap", "rewrap", "stop_after", "replaced_forward"]


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


class Trace(contextlib.AbstractContextManager):
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

    def __enter__(self) -> "Trace":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(contextlib.AbstractContextManager):
    """:class:`Trace` over several modules named as in ``model.named_modules()``.

        with TraceDict(model, ["model.layers.2.mlp", "model.layers.3.mlp"], retain_output=True) as td:
            model(ids)
        td["model.layers.2.mlp"].output

    ``edit_output`` may be a dict name -> fn; ``stop=True`` stops after the *last* module to run.
    """

    def __init__(self, model: nn.Module, names, retain_input=False, retain_output=False, edit_output=None,
                 stop: bool = False):
        self.traces = {}
        for name in names:
            fn = edit_output.get(name) if isinstance(edit_output, dict) else edit_output
            self.traces[name] = Trace(model.get_submodule(name), retain_input, retain_output, fn)
        self.stop = stop
        self._seen = set()
        self._stopper = None

    def __getitem__(self, name: str) -> Trace:
        return self.traces[name]

    def __enter__(self) -> "TraceDict":
        entered = []
        try:
            for t in self.traces.values():
                t.__enter__()
                entered.append(t)
            if self.stop:
                names = list(self.traces)

                def make(name):
                    def hook(module, inputs, output):
                        self._seen.add(name)
                        if self._seen.issuperset(names):
                            raise StopForward()
                    return hook

                self._stopper = [self.traces[n].module.register_forward_hook(make(n)) for n in names]
        except BaseException:
            for t in entered:
                t.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self._stopper or []:
            h.remove()
        for t in self.traces.values():
            t.__exit__(None, None, None)
        return exc_type is not None and issubclass(exc_type, StopForward)


def at_positions(positions, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``edit_output`` that applies ``fn`` to the hidden states at token ``positions`` only.

    ``positions``: an int, a list of ints (same for every batch row) or a (batch,) tensor
    (one position per row). ``fn`` maps (batch, n, d) -> (batch, n, d).
    """

    def edit(h: torch.Tensor) -> torch.Tensor:
        if isinstance(positions, torch.Tensor) and positions.ndim == 1 and positions.numel() == h.shape[0]:
            rows = torch.arange(h.shape[0], device=h.device)
            pos = positions.to(h.device)
            new = fn(h[rows, pos][:, None, :])[:, 0, :]
            out = h.clone()
            out[rows, pos] = new.to(h.dtype)
            return out
        pos = [positions] if isinstance(positions, int) else list(positions)
        out = h.clone()
        out[:, pos, :] = fn(h[:, pos, :]).to(h.dtype)
        return out

    return edit


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Stop any forward pass right after ``module`` has run (swallows :class:`StopForward`)."""
    with Trace(module, stop=True):
        yield


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
