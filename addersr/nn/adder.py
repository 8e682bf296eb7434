"""``Adder2d``, the module people hold, and AdderNet's adaptive learning rate."""

import math

import torch
from torch import nn

from ..ops import adder2d


class Adder2d(nn.Module):
    """Adder layer with a ``Conv2d``-like signature: ``-sum |Xpad - W|`` over each patch.

    Weights are initialised as in AdderNet (standard normal; bias uniform in [0, 1)).
    ``backend`` is passed to :func:`addersr.ops.adder2d` (None: fastest for the device).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False,
                 backend=None):
        super().__init__()
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend = backend
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel_size))
        self.bias = nn.Parameter(torch.rand(out_channels)) if bias else None

    def forward(self, x):
        return adder2d(x, self.weight, self.bias, self.stride, self.padding, self.backend)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.bias is None:
            s += ", bias=False"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


def _rescale(grad, eta):
    return grad * (eta * math.sqrt(grad.numel()) / grad.norm().clamp_min(1e-12))


def adder_weights(model):
    """The weight parameters of every :class:`Adder2d` in ``model``."""
    return [m.weight for m in model.modules() if isinstance(m, Adder2d)]


class AdaptiveLR:
    """Handle of the hooks installed by :func:`adaptive_lr`; ``remove()`` takes them off."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def adaptive_lr(model, eta=0.2):
    """AdderNet's adaptive learning rate as gradient hooks on every adder weight.

    Each backward pass, an adder layer's weight gradient ``g`` becomes
    ``eta * sqrt(k) * g / ||g||_2`` with ``k = numel(W)`` (eta = 0.2 as in AdderNet).
    Returns an :class:`AdaptiveLR` handle; call ``.remove()`` to restore plain gradients.
    With DistributedDataParallel or gradient accumulation use :func:`rescale_adder_grads`
    after the backward pass instead, so the rescaling sees the final gradient.
    """
    return AdaptiveLR([w.register_hook(lambda g: _rescale(g, eta)) for w in adder_weights(model)])


@torch.no_grad()
def rescale_adder_grads(model, eta=0.2):
    """Apply the adaptive learning rate to the ``.grad`` of every adder weight, in place: all
    norms in one multi-tensor pass, then all gradients scaled in another."""
    grads = [w.grad for w in adder_weights(model) if w.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    sizes = torch.tensor([eta * math.sqrt(g.numel()) for g in grads], dtype=norms.dtype, device=norms.device)
    torch._foreach_mul_(grads, list((sizes / norms.clamp_min(1e-12)).unbind()))
