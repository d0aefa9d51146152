import pytest
import torch
from torch import nn

from factedit.hooks import StopForward, Trace, replaced_forward, rewrap, stop_after, unwrap


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
    with Trace(net.a, retain_input=True, retain_output=True) as t:
        net(x)
    assert torch.equal(t.input, x)
    assert torch.allclose(t.output, net.a(x))
    assert not net.a._forward_hooks  # removed on exit


def test_edit_output_changes_downstream():
    net, x = Net(), torch.randn(5, 3)
    with Trace(net.a, edit_output=lambda h: h * 0):
        y = net(x)
    assert torch.allclose(y, net.b.bias.expand(5, 2))


def test_stop_forward_skips_rest_and_cleans_up():
    net, x = Net(), torch.randn(2, 3)
    called = []
    h = net.b.register_forward_hook(lambda *a: called.append(1))
    with Trace(net.a, retain_output=True, stop=True) as t:
        net(x)
        pytest.fail("forward should have stopped")
    h.remove()
    assert t.output is not None and not called
    with stop_after(net.a):
        net(x)
    assert not net.a._forward_hooks


def test_hook_removed_after_exception():
    net = Net()
    with pytest.raises(RuntimeError):
        with Trace(net.a, retain_output=True):
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


def test_trace_dict_and_positions():
    from factedit.hooks import TraceDict, at_positions

    torch.manual_seed(1)
    net, x = Net(), torch.randn(2, 5, 3)
    with TraceDict(net, ["a", "b"], retain_output=True) as td:
        y = net(x)
    assert torch.allclose(td["b"].output, y)
    with TraceDict(net, ["a"], edit_output={"a": at_positions([1, 3], lambda h: h * 0)}, retain_output=True) as td:
        net(x)
    h = td["a"].output
    assert torch.equal(h[:, [1, 3]], torch.zeros(2, 2, 4))
    assert torch.allclose(h[:, 0], net.a(x)[:, 0])
    per_row = at_positions(torch.tensor([0, 4]), lambda h: h + 1)(torch.zeros(2, 5, 4))
    assert per_row[0, 0].eq(1).all() and per_row[1, 4].eq(1).all() and per_row.sum() == 8
    called = []
    hb = net.b.register_forward_hook(lambda *a: called.append(1))
    with TraceDict(net, ["a"], stop=True):
        net(x)
    hb.remove()
    assert not called and not net.a._forward_hooks
