"""The autograd Function of the adder operator: AdderNet's training rules over any backend.

A backend is a module with ``forward(x, w, stride, padding)`` and
``grad_input(x, w, grad_out, stride, padding)``; it may define ``grad_weight`` with the
same signature, otherwise the convolution weight-gradient identity below is used.
Backends receive contiguous NCHW tensors and (h, w) pairs for stride and padding.
"""

import torch
from torch.nn.grad import conv2d_weight


def grad_weight_conv(x, weight, grad_out, stride, padding):
    """Full-precision weight gradient through the convolution identity (DESIGN.md 1):

    sum g * (Xpad - W) = conv2d_weight(X, g) - W * sum_{n,p} g.
    TF32 is disabled so the result stays exact on GPUs.
    """
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gw = conv2d_weight(x, weight.shape, grad_out, stride=stride, padding=padding)
    return gw - weight * grad_out.sum((0, 2, 3)).reshape(-1, 1, 1, 1)


class AdderFunction(torch.autograd.Function):
    """Y = -sum |Xpad - W|; gW = sum g (X - W); gX = sum g HardTanh(W - X)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, backend):
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        x = x.contiguous()
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, backend, channels_last)
        y = backend.forward(x, weight, stride, padding)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, backend, channels_last = ctx.conf
        g = grad_out.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = backend.grad_input(x, weight, g, stride, padding)
            if channels_last:
                gx = gx.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            gw = getattr(backend, "grad_weight", grad_weight_conv)(x, weight, g, stride, padding)
        return gx, gw, None, None, None
