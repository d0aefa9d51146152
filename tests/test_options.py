"""Setting method config fields by name (``--set KEY=VALUE``)."""

import re

import pytest

from factedit.core.errors import MethodError
from factedit.edit.methods import BatchConfig, FTConfig, ROMEConfig
from factedit.edit.methods.options import parse_options, with_options


def test_parse_options_splits_at_the_first_equals_sign():
    assert parse_options(["a=1", " value.lr = 0.1 ", "fact_token=x=y", "b="]) == (
        ("a", "1"), ("value.lr", "0.1"), ("fact_token", "x=y"), ("b", ""))
    for bad in ("lr", "=1"):
        with pytest.raises(MethodError, match="KEY=VALUE"):
            parse_options([bad])


def test_values_take_the_type_of_the_field():
    ft = with_options(FTConfig(), {"norm_constraint": "0.01", "steps": "7", "lr": "1e-3"})
    assert ft.norm_constraint == 0.01 and ft.steps == 7 and isinstance(ft.steps, int) and ft.lr == 1e-3
    rome = with_options(ROMEConfig(), dict(parse_options(
        ["value.lr=0.1", "value.early_stop_on=loss", "context_lengths=[[5, 3]]", 'essence_prompts=["{} is"]',
         "stats_tokens=5000"])))
    assert rome.value.lr == 0.1 and rome.value.early_stop_on == "loss" and rome.value.steps == 25
    assert rome.context_lengths == ((5, 3),) and rome.essence_prompts == ("{} is",)
    assert rome.stats_tokens == 5000  # an optional field (None = model-derived): JSON value
    assert with_options(BatchConfig(), {"layers": "[4, 5]"}).layers == (4, 5)  # lists as tuples
    assert with_options(ROMEConfig(), {"context_lengths": [[5, 3]]}).context_lengths == ((5, 3),)
    assert with_options(ROMEConfig(), {"stats_corpus": "wikitext"}).stats_corpus == "wikitext"  # or text
    assert with_options(BatchConfig(), {"value.clamp_norm_factor": 2}).value.clamp_norm_factor == 2  # typed: as is
    assert ROMEConfig().value.lr == 0.5  # the defaults are not touched


@pytest.mark.parametrize("options,match", [
    ({"norm_constrain": "1"}, "FTConfig has no option 'norm_constrain'; options: layers, lr, norm_constraint, steps"),
    ({"steps": "2.5"}, "'2.5' is not a valid int"),
    ({"lr": "nan"}, "'nan' is not a valid float"),
    ({"value": "1"}, "set one of its fields instead: value.steps"),
    ({"steps.x": "1"}, "'steps' has no sub-options"),
    ({"arch": "{}"}, "has no option 'arch'"),
    ({"context_lengths": "5"}, "not a valid tuple"),
])
def test_bad_options_are_clear_errors(options, match):
    cfg = ROMEConfig() if "value" in options or "context_lengths" in options else FTConfig()
    with pytest.raises(MethodError, match=re.escape(match)):
        with_options(cfg, options)
