import pytest
import torch

from factedit.core.arch import ARCH_SPECS, ArchSpec, ModelAdapter
from factedit.core.errors import ArchitectureError, LayerError
from factedit.core.hooks import Hook
from tiny import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_modules_and_orientation(arch):
    model, tok = tiny_model(arch)
    ad = ModelAdapter(model, tok)
    assert ad.n_layers == 4 and ad.d_model == 24
    assert ad.spec.fan_in_fan_out == (arch == "gpt2")
    ids = torch.tensor([tok("The Eiffel Tower is in Paris")["input_ids"]])
    with Hook(ad.w_out(2), retain_input=True, retain_output=True) as t:
        model(ids)
    W = ad.w_out_weight(2)
    assert W.shape == (ad.d_model, ad.d_ff)
    bias = getattr(ad.w_out(2), "bias", None)
    expected = t.input @ W.T + (bias if bias is not None else 0)
    assert torch.allclose(t.output, expected, atol=1e-5)
    # logits from the final normed hidden state equal the model's own logits
    h = ad.body(input_ids=ids).last_hidden_state
    assert torch.allclose(ad.logits(h), model(ids).logits, atol=1e-4)


def test_add_to_w_out_respects_orientation():
    for arch in ("gpt2", "llama"):
        model, tok = tiny_model(arch)
        ad = ModelAdapter(model, tok)
        D = torch.randn(ad.d_model, ad.d_ff)
        before = ad.w_out_weight(1).clone()
        ad.add_to_w_out(1, D)
        assert torch.allclose(ad.w_out_weight(1), before + D)


def test_unknown_architecture_error_explains_override():
    model, tok = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ArchitectureError) as e:
        ModelAdapter(model, tok)
    assert "ArchSpec" in str(e.value) and "mystery" in str(e.value)
    ad = ModelAdapter(model, tok, ARCH_SPECS["llama"])  # explicit override works
    assert ad.n_layers == 4


def test_wrong_override_path_is_clear():
    model, tok = tiny_model("llama")
    bad = ArchSpec(layers="model.blocks", body="model", mlp="mlp", w_out="mlp.down_proj", attn="self_attn",
                   final_norm="model.norm")
    with pytest.raises(ArchitectureError, match="model.blocks"):
        ModelAdapter(model, tok, bad)


def test_layer_out_of_range():
    model, tok = tiny_model("gpt2")
    ad = ModelAdapter(model, tok)
    for bad in (-1, 4, 100):
        with pytest.raises(LayerError, match="0..3"):
            ad.check_layer(bad)


def test_every_declared_architecture_is_in_the_tiny_grid_and_a_real_model_type():
    from transformers import CONFIG_MAPPING

    from tiny import ARCHS

    assert sorted(ARCH_SPECS) == sorted(ARCHS)
    assert all(mt in CONFIG_MAPPING for mt in ARCH_SPECS)
