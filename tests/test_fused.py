"""The fused AdderSR layer against today's eager layer (``fused=False``) in float64: values,
gradients of every parameter and of the input, running statistics; CPU (numba) and the
Triton kernels (interpreter on the CPU, compiled on a GPU when there is one)."""

import copy

import pytest
import torch

from addersr.nn import AdderSRLayer, rescale_adder_grads
from addersr.nn.adder import _rescale
from addersr.ops import adder2d, available_backends

CUDA = torch.cuda.is_available()
TARGETS = [pytest.param(("cpu", "cpu"), marks=pytest.mark.skipif("cpu" not in available_backends("cpu"),
                                                                reason="numba is not installed")),
           ("cpu", "triton"),
           pytest.param(("cuda", "triton"), marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


@pytest.fixture(params=TARGETS, ids=lambda t: f"{t[0]}-{t[1]}")
def target(request, monkeypatch):
    device, backend = request.param
    if backend == "triton" and device == "cpu":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ADDERSR_FUSED", raising=False)
    return torch.device(device), backend


def _pair(channels, k, relu, alpha, backend, device, momentum=0.1):
    """A fused layer and its eager copy, with running statistics near those of real batches."""
    layer = AdderSRLayer(channels, k, relu=relu, backend=backend).double().to(device)
    layer.bn.momentum = momentum
    with torch.no_grad():
        layer.adder.weight.mul_(0.3)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
        y = adder2d(torch.randn(2, channels, 6, 6, dtype=torch.float64) * 0.8 + 0.3,
                    layer.adder.weight.cpu(), padding=k // 2, backend="reference")
        layer.bn.running_mean.copy_(y.mean((0, 2, 3)) + torch.randn(channels))
        layer.bn.running_var.copy_(y.var((0, 2, 3)) * torch.empty(channels).uniform_(0.5, 2))
        layer.power.alpha.fill_(alpha)
    eager = copy.deepcopy(layer)
    eager.fused = False
    return layer, eager


def _step(layer, x, g):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(g)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("relu,alpha,shape,k", [
    (True, 0.7, (2, 5, 7, 9), 3),
    (False, 1.3, (3, 3, 5, 6), 3),
    (True, 1.0, (1, 6, 4, 11), 5),
    (False, 1.0, (2, 4, 6, 5), 1),
])
def test_fused_matches_eager(target, mode, relu, alpha, shape, k):
    device, backend = target
    n, c, h, w = shape
    layer, eager = _pair(c, k, relu, alpha, backend, device, momentum=None if k == 5 else 0.1)
    for m in (layer, eager):
        m.train(mode == "train")
    for step in range(2):  # twice: the running statistics feed the second step in eval mode
        x = (torch.randn(n, c, h, w, dtype=torch.float64) * 0.8 + 0.3).to(device)
        g = torch.randn(n, c, h, w, dtype=torch.float64).to(device)
        got, want = _step(layer, x, g), _step(eager, x, g)
        assert _rel(got[0], want[0]) < 1e-12, ("output", step)
        assert _rel(got[1], want[1]) < 1e-11, ("grad x", step)
        for name in want[2]:
            assert got[2][name] is not None, name
            assert _rel(got[2][name], want[2][name]) < 1e-11, (name, step)
        for name, buf in eager.bn.named_buffers():
            assert torch.allclose(layer.bn.get_buffer(name).double(), buf.double(), rtol=1e-13, atol=0), name
        layer.zero_grad()
        eager.zero_grad()
    if relu:
        assert (got[0] == 0).any() and (got[0] > 0).any()  # both sides of the ReLU were exercised


def test_fused_float32_and_channels_last(target):
    device, backend = target
    layer, eager = _pair(6, 3, True, 0.8, backend, device)
    layer.float()
    eager.float()
    x = torch.randn(2, 6, 5, 7, device=device).to(memory_format=torch.channels_last)
    g = torch.randn(2, 6, 5, 7, device=device)
    got, want = _step(layer, x, g), _step(eager, x, g)
    assert got[0].dtype == torch.float32
    assert _rel(got[0], want[0]) < 1e-5 and _rel(got[1], want[1]) < 1e-4
    for name in want[2]:
        assert _rel(got[2][name], want[2][name]) < 1e-4, name


def test_fused_path_is_taken_and_can_be_switched_off(monkeypatch):
    """The fused Function runs by default; hooks, ADDERSR_FUSED=0 or fused=False give the eager path."""
    layer = AdderSRLayer(4, backend="cpu" if "cpu" in available_backends("cpu") else "reference")
    calls = []
    layer.bn.register_forward_hook(lambda *a: calls.append("bn"))
    layer(torch.randn(2, 4, 5, 5))
    assert calls == ["bn"]  # a hook on a sub-module sees it run
    fresh = AdderSRLayer(4, backend="cpu")
    if "cpu" not in available_backends("cpu"):
        pytest.skip("numba is not installed")
    out = fresh(torch.randn(2, 4, 5, 5, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_AdderSRBackward"
    monkeypatch.setenv("ADDERSR_FUSED", "0")
    assert type(fresh(torch.randn(2, 4, 5, 5, requires_grad=True)).grad_fn).__name__ != "_AdderSRBackward"
    assert list(fresh.state_dict()) == list(AdderSRLayer(4, fused=False).state_dict())


def test_rescale_in_one_pass_matches_per_layer():
    torch.manual_seed(3)
    model = torch.nn.Sequential(AdderSRLayer(3, backend="reference"), AdderSRLayer(3, backend="reference"))
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    want = [_rescale(m.adder.weight.grad.clone(), 0.2) for m in model]
    rescale_adder_grads(model, eta=0.2)
    for m, w in zip(model, want):
        torch.testing.assert_close(m.adder.weight.grad, w, rtol=1e-6, atol=0)
        assert m.adder.weight.grad.norm().item() == pytest.approx(0.2 * 9, rel=1e-5)
