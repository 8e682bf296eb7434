"""Numba kernels of the AdderSR layer's output stage: BN -> + identity -> [ReLU] -> power.

The stage after the adder op, ``out = P(relu(x + y * s + t))`` with the batch-norm scale
``s = gamma * rstd`` and shift ``t = beta - mean * s`` (the same folding as PyTorch's CPU
batch norm) and ``P(r) = sign(r) |r|^alpha``, and its backward pass. One thread owns one
channel: in training it sums the channel's adder outputs for the mean, then the squared
deviations, then writes the outputs, so after the first read the channel (N*H*W values)
comes from the core's cache; memory sees one pass instead of eager PyTorch's eight
(BN statistics, BN, add, ReLU, abs, pow, sign, multiply). The backward pass is two sweeps
over the channel (sums, then gradients), also cache-resident.

Tensors are contiguous NCHW; per-channel vectors have C entries. Formulas and the y = 0
guards follow ``addersr.nn.blocks`` (DESIGN.md section 2).
"""

import math

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .cpu import _launch, _wide_vectors
from .sad_ir import f32_exp2i, f32_split

_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}  # no nnan/ninf: NaN in gives NaN out
_COST = 32  # one element of the stage weighs this many adder ops (two transcendentals)


# float32 log and exp as polynomials that LLVM vectorises (libm calls do not vectorise):
# relative error ~1e-7 against ~|alpha ln y| * 6e-8 from fp32 rounding itself. float64
# keeps math.log / math.exp, so the float64 tests compare exact formulas.
_F = np.float32
_LN2_HI, _LN2_LO, _INV_LN2 = _F(0.693145751953125), _F(1.428606765330187e-06), _F(1 / math.log(2))
_SQRT2, _TINY32, _INF32 = _F(math.sqrt(2)), _F(np.finfo(np.float32).tiny), _F(np.inf)
_LOG_C = tuple(_F(2 / k) for k in (1, 3, 5, 7, 9))
_EXP_C = tuple(_F(1 / math.factorial(k)) for k in range(8))
_ONE, _HALF, _LO, _HI = _F(1), _F(0.5), _F(-87.3), _F(88.0)


@njit(inline="always", fastmath=_FASTMATH)
def _ln32(a):
    """ln(a) for finite a > 0 (denormals taken as the smallest normal)."""
    e, m = f32_split(max(a, _TINY32))  # a = m 2^e, m in [1, 2)
    big = m > _SQRT2
    m = m * _HALF if big else m
    e = e + _ONE if big else e
    t = (m - _ONE) / (m + _ONE)
    t2 = t * t
    c1, c3, c5, c7, c9 = _LOG_C
    return e * _LN2_HI + (e * _LN2_LO + t * (c1 + t2 * (c3 + t2 * (c5 + t2 * (c7 + t2 * c9)))))


@njit(inline="always", fastmath=_FASTMATH)
def _exp32(y):
    """exp(y), y clamped to [-87.3, 88] (the normal float32 range)."""
    y = min(max(y, _LO), _HI)
    kf = _F(np.int32(y * _INV_LN2 + _F(200.5))) - _F(200.0)  # round: truncation of a positive value
    r = (y - kf * _LN2_HI) - kf * _LN2_LO
    c0, c1, c2, c3, c4, c5, c6, c7 = _EXP_C
    p = c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
    return p * f32_exp2i(kf)


def _ln(a):
    """ln(a): vectorisable for float32, math.log otherwise (dispatched at compile time)."""


def _exp(y):
    """exp(y), as ``_ln``."""


@overload(_ln)
def _ln_impl(a):
    if isinstance(a, types.Float) and a.bitwidth == 32:
        return lambda a: _ln32(a)
    return lambda a: math.log(a)


@overload(_exp)
def _exp_impl(y):
    if isinstance(y, types.Float) and y.bitwidth == 32:
        return lambda y: _exp32(y)
    return lambda y: math.exp(y)


@njit(inline="always")
def _power(r, alpha):
    """sign(r) |r|^alpha (r itself for alpha = 1; NaN and infinities pass through)."""
    a = abs(r)
    if alpha == 1.0 or a == 0.0 or not a < np.inf:
        return r
    v = _exp(alpha * _ln(a))
    return v if r > 0.0 else -v


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_kernel(x, y, out, gamma, beta, mean, var, eps, alpha, relu, training):
    """out = P(relu(x + y*s + t)); in training, mean[c] and var[c] (biased) are written first."""
    n_batch, channels = y.shape[0], y.shape[1]
    xs, ys, os = x.reshape(n_batch, channels, -1), y.reshape(n_batch, channels, -1), out.reshape(n_batch, channels, -1)
    hw = ys.shape[2]
    count = n_batch * hw
    zero = y.dtype.type(0)
    for c in prange(channels):
        _wide_vectors()
        if training:
            total = zero
            for n in range(n_batch):
                for p in range(hw):
                    total += ys[n, c, p]
            mu = total / count
            sq = zero
            for n in range(n_batch):
                for p in range(hw):
                    d = ys[n, c, p] - mu
                    sq += d * d
            mean[c], var[c] = mu, sq / count
        scale = gamma[c] / math.sqrt(var[c] + eps)
        shift = beta[c] - mean[c] * scale
        for n in range(n_batch):
            for p in range(hw):
                z = xs[n, c, p] + (ys[n, c, p] * scale + shift)
                if relu and z < zero:
                    z = zero
                os[n, c, p] = _power(z, alpha)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_kernel(grad, x, y, out, gamma, beta, mean, var, eps, alpha, tiny, d_tiny, relu, training,
                     gx, gy, sums):
    """gx = dL/dz (the shortcut's share), gy = dL/dy; sums[c] = (sum dz, sum dz*yhat, dL/dalpha).

    d_tiny = alpha * tiny^(alpha - 1) is the power's derivative where |r| < tiny.
    """
    n_batch, channels = y.shape[0], y.shape[1]
    gs, xs, ys, os = (grad.reshape(n_batch, channels, -1), x.reshape(n_batch, channels, -1),
                      y.reshape(n_batch, channels, -1), out.reshape(n_batch, channels, -1))
    gxs, gys = gx.reshape(n_batch, channels, -1), gy.reshape(n_batch, channels, -1)
    hw = ys.shape[2]
    count = n_batch * hw
    zero, one = y.dtype.type(0), y.dtype.type(1)
    for c in prange(channels):
        _wide_vectors()
        rstd = one / math.sqrt(var[c] + eps)
        scale = gamma[c] * rstd
        shift = beta[c] - mean[c] * scale
        mu = mean[c]
        s_dz = s_dzy = s_alpha = zero
        for n in range(n_batch):
            for p in range(hw):
                z = xs[n, c, p] + (ys[n, c, p] * scale + shift)
                live = not relu or z > zero
                a = abs(z) if live else zero
                g, o = gs[n, c, p], os[n, c, p]
                if a > zero:
                    s_alpha += g * o * _ln(a)
                dz = zero
                if live:
                    dz = g * (alpha * abs(o) / a if a >= tiny else d_tiny)
                gxs[n, c, p] = dz
                s_dz += dz
                s_dzy += dz * ((ys[n, c, p] - mu) * rstd)
        sums[c, 0], sums[c, 1], sums[c, 2] = s_dz, s_dzy, s_alpha
        k1, k2 = (s_dz / count, s_dzy / count) if training else (zero, zero)
        for n in range(n_batch):
            for p in range(hw):
                yhat = (ys[n, c, p] - mu) * rstd
                gys[n, c, p] = scale * (gxs[n, c, p] - k1 - yhat * k2)


def _np(t):
    return t.detach().numpy()


def forward(x, y, gamma, beta, alpha, mean, var, eps, relu, training):
    """The stage's output; in training ``mean`` and ``var`` are filled with the batch statistics."""
    out = torch.empty_like(y)
    t = _np(y).dtype.type
    _launch(_forward_kernel, y.numel() * _COST, _np(x), _np(y), _np(out), _np(gamma), _np(beta),
            _np(mean), _np(var), t(eps), t(alpha), bool(relu), bool(training))
    return out


def backward(grad, x, y, out, gamma, beta, alpha, mean, var, eps, relu, training, tiny):
    """(dL/dz, dL/dy, dL/dgamma, dL/dbeta, dL/dalpha) of the stage."""
    gx, gy = torch.empty_like(y), torch.empty_like(y)
    sums = y.new_empty(y.shape[1], 3)
    t, a = _np(y).dtype.type, float(alpha)
    d_tiny = torch.tensor(tiny, dtype=y.dtype).pow(a - 1).item() * a  # as the eager layer computes it
    _launch(_backward_kernel, y.numel() * _COST, _np(grad), _np(x), _np(y), _np(out), _np(gamma), _np(beta),
            _np(mean), _np(var), t(eps), t(a), t(tiny), t(d_tiny), bool(relu), bool(training),
            _np(gx), _np(gy), _np(sums))
    return gx, gy, sums[:, 1], sums[:, 0], sums[:, 2].sum()
