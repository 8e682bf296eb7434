"""PowerActivation and the AdderSR layer against plain float64 PyTorch formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from addersr.nn import Adder2d, AdderSRLayer, PowerActivation, hidden_layer
from addersr.ops import adder2d


def _power_ref(y, alpha):
    """sign(y) |y|^alpha through exp/log, valid for y != 0 (autograd reference)."""
    return torch.sign(y) * torch.exp(alpha * torch.log(y.abs()))


def test_power_starts_as_identity():
    p = PowerActivation()
    y = torch.randn(2, 3, 5, 4)
    assert p.alpha.item() == 1.0 and p.alpha.requires_grad
    assert torch.equal(p(y), y)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.7])
def test_power_value_and_gradients_match_reference(alpha):
    y = torch.randn(3, 4, 7, 5, dtype=torch.float64)
    y = torch.where(y.abs() < 1e-3, torch.full_like(y, 0.3), y).requires_grad_()
    p = PowerActivation(alpha).double()
    g = torch.randn_like(y)
    out = p(y)
    gy, ga = torch.autograd.grad(out, (y, p.alpha), g)

    y2 = y.detach().clone().requires_grad_()
    a2 = p.alpha.detach().clone().requires_grad_()
    ref = _power_ref(y2, a2)
    ry, ra = torch.autograd.grad(ref, (y2, a2), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gy, ry, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, ra, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_gradients_finite_at_zero(alpha, dtype):
    y = torch.tensor([0.0, -0.0, 0.0, 1e-30, -2.0, 3.0], dtype=dtype, requires_grad=True)
    p = PowerActivation(alpha).to(dtype)
    out = p(y)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(y.grad).all() and torch.isfinite(p.alpha.grad).all()
    assert out[0] == 0
    if alpha == 1.0:
        assert torch.equal(y.grad[:3], torch.ones(3, dtype=dtype))
    # zeros contribute nothing to the alpha gradient: only -2 and 3 (and 1e-30) count
    a = p.alpha.item()
    expected = sum(math.copysign(abs(v) ** a * math.log(abs(v)), v) for v in (1e-30, -2.0, 3.0))
    assert p.alpha.grad.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_power_gradcheck_float64():
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y = (y + 0.2 * torch.sign(y)).requires_grad_()  # keep away from the kink at 0
    p = PowerActivation(0.7).double()
    alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, a: torch.func.functional_call(p, {"alpha": a}, (t,)),
                                    (y, alpha))


def _bn_train(x, bn):
    return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


@pytest.mark.parametrize("relu", [True, False])
def test_adder_layer_order_matches_manual_composition(relu):
    torch.manual_seed(1)
    layer = AdderSRLayer(5, relu=relu, backend="reference").double()
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
        layer.power.alpha.fill_(0.8)
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    out = layer(x)
    y = x + _bn_train(adder2d(x, layer.adder.weight, padding=1, backend="reference"), layer.bn)
    if relu:
        y = y.clamp_min(0)
    ref = torch.sign(y) * y.abs() ** 0.8
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert (out < 0).any() != relu


def test_adder_layer_trains_all_its_parameters():
    layer = AdderSRLayer(4, relu=True, backend="reference")
    x = torch.rand(2, 4, 6, 6)
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.power.alpha.grad.abs() > 0


def test_adder_layer_structure_and_errors():
    layer = AdderSRLayer(8, backend="reference")
    assert isinstance(layer.adder, Adder2d) and layer.adder.bias is None
    assert layer.adder.kernel_size == (3, 3) and layer.adder.padding == 1
    assert isinstance(layer.bn, nn.BatchNorm2d) and layer.bn.num_features == 8
    with pytest.raises(ValueError, match="odd kernel"):
        AdderSRLayer(8, kernel_size=2)


def test_hidden_layer_kinds():
    conv_relu = hidden_layer("conv", 6, relu=True)
    assert isinstance(conv_relu[0], nn.Conv2d) and conv_relu[0].bias is not None
    assert isinstance(conv_relu[1], nn.ReLU)
    assert isinstance(hidden_layer("conv", 6, relu=False), nn.Conv2d)
    adder = hidden_layer("adder", 6, relu=False)
    assert isinstance(adder, AdderSRLayer) and not adder.relu
    with pytest.raises(ValueError, match="unknown op 'mult'"):
        hidden_layer("mult", 6)
