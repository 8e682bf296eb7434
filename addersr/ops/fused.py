"""The fused AdderSR layer: ``P(relu(x + BN(adder(x))))`` as one autograd Function.

The adder op runs on its backend (``addersr.ops.cpu`` or ``triton_kernels``); its output
stage (batch norm, self-shortcut, ReLU, power activation) runs in one kernel that reads
the adder output once (``fused_cpu``, ``fused_triton``), and so does its backward pass.
Values and gradients are those of the eager layer (``addersr.nn.blocks``): batch
statistics in training (running statistics updated as ``nn.BatchNorm2d`` does, with the
unbiased variance), running statistics in eval mode, HardTanh input gradient and
full-precision weight gradient for the adder op, and the power's y = 0 guards.
Saved for backward: the input, the adder output and the layer output (which the next
layer keeps anyway as its input).
"""

import importlib

import torch

from . import get_backend
from .function import grad_weight_conv

__all__ = ["TINY", "adder_sr", "stage_backend"]

# Below this magnitude the power's derivative alpha |y|^(alpha - 1) is taken at TINY.
TINY = 1e-6
_STAGES = {"cpu": "addersr.ops.fused_cpu", "triton": "addersr.ops.fused_triton"}


def stage_backend(adder_backend):
    """The output-stage module that goes with an adder backend name, or None (eager only)."""
    name = _STAGES.get(adder_backend)
    return importlib.import_module(name) if name else None


class _AdderSR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gamma, beta, alpha, running_mean, running_var, conf):
        padding, adder, stage, relu, training, momentum, eps = conf
        x, weight = x.contiguous(), weight.contiguous()
        y = adder.forward(x, weight, (1, 1), padding)
        c, count = y.shape[1], y.numel() // y.shape[1]
        if training:
            mean, var = y.new_empty(c), y.new_empty(c)
            out = stage.forward(x, y, gamma, beta, alpha, mean, var, eps, relu, True)
            if running_mean is not None:
                with torch.no_grad():
                    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                    unbiased = var * (count / (count - 1))
                    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        else:
            mean, var = running_mean.to(y.dtype), running_var.to(y.dtype)
            out = stage.forward(x, y, gamma, beta, alpha, mean, var, eps, relu, False)
        ctx.save_for_backward(x, weight, y, out, gamma, beta, alpha, mean, var)
        ctx.conf = conf
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, y, out, gamma, beta, alpha, mean, var = ctx.saved_tensors
        padding, adder, stage, relu, training, _, eps = ctx.conf
        gx, gy, g_gamma, g_beta, g_alpha = stage.backward(grad.contiguous(), x, y, out, gamma, beta, alpha,
                                                          mean, var, eps, relu, training, TINY)
        gw = None
        if ctx.needs_input_grad[1]:
            gw = getattr(adder, "grad_weight", grad_weight_conv)(x, weight, gy, (1, 1), padding)
        if ctx.needs_input_grad[0]:
            gx += adder.grad_input(x, weight, gy, (1, 1), padding)
        return gx, gw, g_gamma, g_beta, g_alpha.reshape(alpha.shape), None, None, None


def adder_sr(x, weight, bn, alpha, relu, adder_backend):
    """``P(relu(x + bn(adder2d(x, weight, padding=k//2))))`` in one pass, for a BatchNorm2d ``bn``
    with affine parameters, and a scalar ``alpha`` tensor; ``adder_backend`` names a backend with
    a stage (``"cpu"``, ``"triton"``). Updates ``bn``'s running statistics as ``bn`` would."""
    stage = stage_backend(adder_backend)
    if stage is None:
        raise ValueError(f"adder backend {adder_backend!r} has no fused stage; expected one of {sorted(_STAGES)}")
    training = bn.training or not bn.track_running_stats
    momentum = bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    conf = ((weight.shape[2] // 2, weight.shape[3] // 2), get_backend(adder_backend), stage, relu, training,
            momentum, bn.eps)
    stats = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    return _AdderSR.apply(x, weight, bn.weight.to(x.dtype), bn.bias.to(x.dtype), alpha.to(x.dtype), *stats, conf)
