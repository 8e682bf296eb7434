"""Adder2d, AdderNet's adaptive learning rate, and a tiny adder network that learns."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from addersr.nn import Adder2d, adaptive_lr, adder_weights, rescale_adder_grads
from addersr.ops import adder2d


def test_repr():
    assert repr(Adder2d(3, 8, 3, padding=1)) == \
        "Adder2d(3, 8, kernel_size=(3, 3), stride=1, padding=1, bias=False)"
    assert repr(Adder2d(4, 2, (1, 3), stride=2, bias=True, backend="reference")) == \
        "Adder2d(4, 2, kernel_size=(1, 3), stride=2, padding=0, backend='reference')"


def test_init_statistics():
    layer = Adder2d(64, 64, 3, bias=True)
    w = layer.weight.detach()
    assert w.shape == (64, 64, 3, 3) and layer.weight.requires_grad
    assert abs(w.mean().item()) < 0.03 and abs(w.std().item() - 1) < 0.03  # standard normal
    assert layer.bias.shape == (64,) and 0 <= layer.bias.min() and layer.bias.max() < 1
    assert 0.35 < layer.bias.mean().item() < 0.65
    assert Adder2d(2, 3, 3).bias is None


def test_adder_weights():
    first, second = Adder2d(3, 2, 3), Adder2d(2, 2, 1)
    model = nn.Sequential(first, nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Sequential(second))
    assert [id(p) for p in adder_weights(model)] == [id(first.weight), id(second.weight)]


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 0), ((1, 3), (2, 1), (0, 1)), (5, 2, 2)])
def test_shapes_match_conv2d(kernel, stride, padding):
    x = torch.randn(2, 3, 11, 8)
    adder = Adder2d(3, 5, kernel, stride=stride, padding=padding)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding)
    assert adder(x).shape == conv(x).shape


def test_forward_and_bias():
    layer = Adder2d(3, 4, 3, padding=1, bias=True)
    x = torch.randn(2, 3, 6, 7)
    plain = adder2d(x, layer.weight, padding=1)
    torch.testing.assert_close(layer(x), plain + layer.bias.reshape(1, -1, 1, 1))
    # -sum |x - w| over one interior patch, written out
    expect = -(x[0, :, 1:4, 2:5] - layer.weight[1]).abs().sum() + layer.bias[1]
    torch.testing.assert_close(layer(x)[0, 1, 2, 3], expect)


def _net():
    return nn.Sequential(Adder2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         Adder2d(6, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))


def _grads(model, x):
    model.zero_grad()
    model(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("eta", [0.2, 0.5])
def test_adaptive_lr_norm_and_remove(eta):
    model, x = _net(), torch.randn(2, 2, 8, 8)
    plain = _grads(model, x)
    handle = adaptive_lr(model, eta=eta)
    scaled = _grads(model, x)
    adder_names = {name for name, p in model.named_parameters()
                   if any(p is w for w in adder_weights(model))}
    assert adder_names == {"0.weight", "3.weight"}
    for name, g in scaled.items():
        if name in adder_names:
            assert g.norm().item() == pytest.approx(eta * math.sqrt(g.numel()), rel=1e-5)
            torch.testing.assert_close(g / g.norm(), plain[name] / plain[name].norm())
        else:
            torch.testing.assert_close(g, plain[name])  # conv, BN and adder bias untouched
    handle.remove()
    for name, g in _grads(model, x).items():
        torch.testing.assert_close(g, plain[name])


def test_rescale_adder_grads_equals_hooks():
    model, x = _net(), torch.randn(2, 2, 8, 8)
    handle = adaptive_lr(model, eta=0.2)
    hooked = _grads(model, x)
    handle.remove()
    _grads(model, x)
    rescale_adder_grads(model, eta=0.2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hooked[name])


def test_tiny_adder_network_learns(one_thread):
    x = torch.rand(8, 1, 12, 12)
    target = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # a 3x3 box blur
    model = nn.Sequential(Adder2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          Adder2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 1))
    adaptive_lr(model, eta=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::15]
