"""AdderSR building blocks (DESIGN.md section 2): the learnable power activation and the
adder layer with its own identity shortcut and batch normalisation."""

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import resolve_backend
from ..ops.fused import TINY, adder_sr, stage_backend
from .adder import Adder2d

# Below this magnitude the derivative alpha * |y|^(alpha - 1) is evaluated at _EPS, so the
# input gradient stays finite at y = 0 when alpha < 1.
_EPS = TINY


class _PowerFunction(torch.autograd.Function):
    """sign(y) * |y|^alpha with gradients that are finite at y = 0."""

    @staticmethod
    def forward(ctx, y, alpha):
        out = torch.sign(y) * y.abs().pow(alpha)
        ctx.save_for_backward(y, alpha, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, alpha, out = ctx.saved_tensors
        g_y = g_alpha = None
        a = y.abs()
        if ctx.needs_input_grad[0]:
            g_y = grad * alpha * a.clamp_min(_EPS).pow(alpha - 1)
        if ctx.needs_input_grad[1]:
            # d/d alpha of sign(y)|y|^alpha = out * ln|y|, whose limit at y = 0 is 0 (alpha > 0).
            log = torch.where(a > 0, a, torch.ones_like(a)).log()
            g_alpha = (grad * out * log).sum().reshape(alpha.shape)
        return g_y, g_alpha


class PowerActivation(nn.Module):
    """Learnable power activation ``P(y) = sign(y) * |y|^alpha`` (AdderSR).

    ``alpha`` is one learnable scalar, initialised to 1 (the identity). Gradients are finite
    at y = 0: the alpha gradient ``|y|^alpha ln|y|`` is 0 there, and the input gradient
    ``alpha |y|^(alpha-1)`` uses ``max(|y|, 1e-6)`` so it stays bounded for alpha < 1.
    """

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, y):
        return _PowerFunction.apply(y, self.alpha.to(y.dtype))

    def extra_repr(self):
        return f"alpha={self.alpha.item():.4g}"


class AdderSRLayer(nn.Module):
    """One AdderSR layer: ``power([relu](x + BN(adder(x))))``, C -> C channels.

    The adder layer (``kernel_size`` square, "same" padding, no bias: the BN follows) gets
    its own identity shortcut, since it cannot learn the identity, and batch normalisation,
    since adder outputs are large negative sums. ``relu=False`` is the variant for places
    where the CNN has no ReLU after the convolution: the power activation then follows
    the shortcut directly. ``backend`` is passed to :class:`Adder2d`.

    ``fused=True`` (default) runs the layer as one fused kernel (``addersr.ops.fused``) where
    the adder backend has one (numba on the CPU, Triton on the GPU), no hook watches a
    sub-module and the environment does not say ``ADDERSR_FUSED=0``; otherwise, and with
    ``fused=False``, the sub-modules run one by one (same values, parameters and state_dict).
    """

    def __init__(self, channels, kernel_size=3, relu=True, backend=None, fused=True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"AdderSRLayer needs an odd kernel size, got {kernel_size}")
        self.adder = Adder2d(channels, channels, kernel_size, padding=kernel_size // 2,
                             bias=False, backend=backend)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = relu
        self.power = PowerActivation()
        self.fused = fused

    def _fused_backend(self, x):
        """The adder backend name when this call can run fused, else None."""
        if not getattr(self, "fused", True) or os.environ.get("ADDERSR_FUSED") == "0" \
                or x.device.type not in ("cpu", "cuda"):
            return None
        weight = self.adder.weight
        if x.dim() != 4 or x.shape[1] != self.adder.in_channels or x.dtype not in (torch.float32, torch.float64) \
                or weight.dtype != x.dtype or weight.device != x.device:
            return None  # the eager path raises adder2d's own error
        parts = (self.adder, self.bn, self.power)
        hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        if hooks or any(m._forward_hooks or m._forward_pre_hooks for m in parts):
            return None
        if not self.bn.affine or (self.bn.training and x.numel() // x.shape[1] < 2):
            return None  # the eager path raises BatchNorm's own error
        try:
            name = resolve_backend(x.device, self.adder.backend)
        except ValueError:
            return None
        return name if stage_backend(name) is not None else None

    def forward(self, x):
        name = self._fused_backend(x)
        if name is not None:
            return adder_sr(x, self.adder.weight, self.bn, self.power.alpha, self.relu, name)
        y = x + self.bn(self.adder(x))
        if self.relu:
            y = F.relu(y)
        return self.power(y)

    def own_ops(self, inputs, output):
        """Arithmetic done here outside the sub-modules: the shortcut addition."""
        return {"adds": output.numel()}

    def extra_repr(self):
        return f"relu={self.relu}" + ("" if self.fused else ", fused=False")


def hidden_layer(op, channels, relu=True, backend=None):
    """A C -> C 3x3 hidden layer of either kind, so CNNs and adder networks share one code path.

    ``op="conv"``: ``Conv2d(bias=True)`` followed by ``ReLU`` when ``relu`` (the published
    CNN layer); ``op="adder"``: :class:`AdderSRLayer` with the same ``relu`` choice.
    """
    if op == "conv":
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        return nn.Sequential(conv, nn.ReLU(inplace=True)) if relu else conv
    if op == "adder":
        return AdderSRLayer(channels, 3, relu=relu, backend=backend)
    raise ValueError(f"unknown op {op!r}; expected 'adder' or 'conv'")
