"""The page's input controls, built from the option declarations (:mod:`factedit.app.options`): label,
default, help and choices come from there, so the page offers what the command line offers and a method
registered anywhere shows up in its menus. What the controls hold comes back as the form's values
(:func:`form_values`), which become :class:`~factedit.app.settings.Settings` as a command line's do.

    layer = control(gr, "page.edit", "layer", elem_id="edit-layer")
    values = form_values("page.edit", ["layer"], ["3"])          # {"layer": 3}
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

from ..app.options import option

__all__ = ["control", "form_values"]


def control(gr, form: str, name: str, widget: str = "", **kwargs):
    """The Gradio component of option ``name`` on ``form`` (``widget``: ``"slider"`` or ``"file"`` instead of the
    kind's own; ``kwargs`` go to the component: ``elem_id``, ``placeholder``, slider bounds, ...)."""
    o = option(name)
    default = kwargs.pop("value", o.default_for(form))
    kw: Dict[str, Any] = {"label": o.label or name.replace("_", " "), **kwargs}
    if widget == "file":
        return gr.File(**kw)
    if o.kind in ("flag", "switch"):
        return gr.Checkbox(value=bool(default), **kw)
    choices = o.choices_list()
    if choices is not None:
        return gr.Dropdown(list(choices), value=default if default is not None else choices[0], **kw)
    if widget == "slider":
        return gr.Slider(value=default, step=1, **kw)
    if o.type is int:
        return gr.Number(value=default, precision=0, **kw)
    if o.kind == "append":
        return gr.Textbox(value="\n".join(default or ()), lines=kw.pop("lines", 2), **kw)
    return gr.Textbox(value="" if default is None else str(default), **kw)


def form_values(form: str, names: Sequence[str], values: Sequence[Any]) -> Dict[str, Any]:
    """The values of a form's controls (in the order of ``names``) as option values (an empty field is ``None``:
    empty, not the option's default)."""
    from ..app.options import options_of

    have = {o.name for o in options_of(form)}
    out = {}
    for name, value in zip(names, values):
        if name not in have:
            raise KeyError(f"{form} has no option {name!r}")
        out[name] = option(name).from_form(value)
    return out
