import pytest
import torch
from torch import nn

from factedit.core.hooks import Hook, RawOutput, StopForward, replaced_forward, rewrap, start_at_layer, unwrap


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.b(torch.relu(self.a(x)))


def test_trace_retains_input_and_output():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(5, 3)
    with Hook(net.a, retain_input=True, retain_output=True) as t:
        net(x)
    assert torch.equal(t.input, x)
    assert torch.allclose(t.output, net.a(x))
    assert not net.a._forward_hooks  # removed on exit


def test_edit_output_changes_downstream():
    net, x = Net(), torch.randn(5, 3)
    with Hook(net.a, edit_output=lambda h: h * 0):
        y = net(x)
    assert torch.allclose(y, net.b.bias.expand(5, 2))


def test_stop_forward_skips_rest_and_cleans_up():
    net, x = Net(), torch.randn(2, 3)
    called = []
    h = net.b.register_forward_hook(lambda *a: called.append(1))
    with Hook(net.a, retain_output=True, stop=True) as t:
        net(x)
        pytest.fail("forward should have stopped")
    h.remove()
    assert t.output is not None and not called
    assert not net.a._forward_hooks


def test_hook_removed_after_exception():
    net = Net()
    with pytest.raises(RuntimeError):
        with Hook(net.a, retain_output=True):
            raise RuntimeError("boom")
    assert not net.a._forward_hooks


def test_unwrap_rewrap_tuple_and_tensor():
    h = torch.randn(2, 3, 4)
    assert unwrap(h) is h
    assert unwrap((h, None)) is h
    g = torch.zeros_like(h)
    assert rewrap(h, g) is g
    out = rewrap((h, "x"), g)
    assert out[0] is g and out[1] == "x"
    with pytest.raises(TypeError):
        unwrap(("no tensor",))


def test_replaced_forward_restores():
    net = Net()
    with replaced_forward(net.a, lambda x: torch.zeros(x.shape[0], 4)):
        assert torch.equal(net.a(torch.randn(2, 3)), torch.zeros(2, 4))
    assert "forward" not in net.a.__dict__
    assert net.a(torch.ones(1, 3)).abs().sum() > 0
    assert issubclass(StopForward, Exception)


def test_start_at_layer_skips_earlier_layers():
    """A forward started after layer 1 with layer 1's recorded output equals the full forward, and
    layer 0 is not computed."""
    torch.manual_seed(2)
    layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def run(x):
        for layer in layers:
            x = layer(x)
        return x

    x = torch.randn(2, 4)
    with Hook(layers[1], retain_output=True) as h1, RawOutput(layers[1]) as raw:
        full = run(x)
    calls = []
    handle = layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with start_at_layer(layers, 1, h1.output, raw.output):
            started = run(torch.full_like(x, float("nan")))  # layer 0 passes its input through, unused
    finally:
        handle.remove()
    assert torch.equal(started, full)
    assert "forward" not in layers[0].__dict__ and "forward" not in layers[1].__dict__


def test_kv_cache_argument_follows_the_transformers_version():
    """transformers renamed past_key_values to cache (the old name warns): hand the cache under the name
    the forward accepts, read it from either output field."""
    from factedit.core.kv import cache_of, past

    class New:
        def forward(self, input_ids=None, cache=None, use_cache=None):
            pass

    class Old:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    c = object()
    assert past(New(), c) == {"cache": c, "use_cache": True}
    assert past(Old(), c) == {"past_key_values": c, "use_cache": True}
    assert past(New(), None) == {"use_cache": False}
    assert cache_of({"cache": c, "logits": 1}) is c and cache_of({"past_key_values": c}) is c
    assert cache_of({"logits": 1}) is None
