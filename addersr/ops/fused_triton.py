"""Triton kernels of the AdderSR layer's output stage (the GPU twin of ``fused_cpu``).

One program owns one channel and sweeps its N*H*W values in blocks: in training the sum,
the squared deviations, then the outputs (the channel stays in L2 between sweeps), so
memory sees one pass; the backward pass is two sweeps. Same formulas as ``fused_cpu``.
Kernels are wrapped per ``TRITON_INTERPRET`` mode, as in ``triton_kernels``; sums go
through ``tl.reduce(..., tl.standard._sum_combine)``, which the interpreter recognises
even when ``triton.language`` was imported outside it (``tl.sum`` is then not callable).
``alpha`` is read from its tensor: no host sync, and float64 stays float64.
"""

import functools

import torch
import triton
import triton.language as tl

from .triton_kernels import _launch as _device

_BLOCK = 1024
_INTERPRETER_BLOCK = 64


def _stage_forward(x_ptr, y_ptr, out_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, alpha_ptr, N, C, HW, eps,
                   RELU: tl.constexpr, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """alpha is read from memory, in the data's dtype (no host sync, no fp32 scalar)."""
    c = tl.program_id(0)
    alpha = tl.load(alpha_ptr)
    count = N * HW
    base = c.to(tl.int64) * HW
    if TRAINING:
        total = tl.full((BLOCK,), 0.0, y_ptr.dtype.element_ty)
        for start in range(0, count, BLOCK):
            e = start + tl.arange(0, BLOCK)
            off = base + (e // HW).to(tl.int64) * C * HW + e % HW
            total += tl.load(y_ptr + off, mask=e < count, other=0.0)
        mu = tl.reduce(total, 0, tl.standard._sum_combine) / count
        sq = tl.full((BLOCK,), 0.0, y_ptr.dtype.element_ty)
        for start in range(0, count, BLOCK):
            e = start + tl.arange(0, BLOCK)
            off = base + (e // HW).to(tl.int64) * C * HW + e % HW
            d = tl.load(y_ptr + off, mask=e < count, other=0.0) - mu
            sq += tl.where(e < count, d * d, 0.0)
        tl.store(mean_ptr + c, mu)
        tl.store(var_ptr + c, tl.reduce(sq, 0, tl.standard._sum_combine) / count)
    mean = tl.load(mean_ptr + c)
    scale = tl.load(gamma_ptr + c) / tl.sqrt(tl.load(var_ptr + c) + eps)
    shift = tl.load(beta_ptr + c) - mean * scale
    for start in range(0, count, BLOCK):
        e = start + tl.arange(0, BLOCK)
        ok = e < count
        off = base + (e // HW).to(tl.int64) * C * HW + e % HW
        z = tl.load(x_ptr + off, mask=ok, other=0.0) + (tl.load(y_ptr + off, mask=ok, other=0.0) * scale + shift)
        if RELU:
            z = tl.where(z < 0.0, 0.0, z)
        a = tl.abs(z)
        v = tl.exp(alpha * tl.log(tl.where(a > 0.0, a, 1.0)))
        p = tl.where(z > 0.0, v, -v)
        p = tl.where(a > 0.0, p, z)
        tl.store(out_ptr + off, tl.where(alpha == 1.0, z, p), mask=ok)


def _stage_backward(g_ptr, x_ptr, y_ptr, out_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, gx_ptr, gy_ptr,
                    sums_ptr, alpha_ptr, N, C, HW, eps, tiny,
                    RELU: tl.constexpr, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """sums[c] = (sum dz, sum dz*yhat, dL/dalpha); below ``tiny`` the power's derivative is
    taken at ``tiny`` (as in ``addersr.nn.blocks``)."""
    c = tl.program_id(0)
    alpha = tl.load(alpha_ptr)
    d_tiny = alpha * tl.exp((alpha - 1.0) * tl.log(tiny + 0.0 * alpha))
    count = N * HW
    base = c.to(tl.int64) * HW
    mu = tl.load(mean_ptr + c)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + c) + eps)
    scale = tl.load(gamma_ptr + c) * rstd
    shift = tl.load(beta_ptr + c) - mu * scale
    s_dz = tl.full((BLOCK,), 0.0, y_ptr.dtype.element_ty)
    s_dzy = tl.full((BLOCK,), 0.0, y_ptr.dtype.element_ty)
    s_alpha = tl.full((BLOCK,), 0.0, y_ptr.dtype.element_ty)
    for start in range(0, count, BLOCK):
        e = start + tl.arange(0, BLOCK)
        ok = e < count
        off = base + (e // HW).to(tl.int64) * C * HW + e % HW
        y = tl.load(y_ptr + off, mask=ok, other=0.0)
        z = tl.load(x_ptr + off, mask=ok, other=0.0) + (y * scale + shift)
        live = ok
        if RELU:
            live = ok & (z > 0.0)
        a = tl.where(live, tl.abs(z), 0.0)
        g = tl.load(g_ptr + off, mask=ok, other=0.0)
        o = tl.load(out_ptr + off, mask=ok, other=0.0)
        s_alpha += tl.where(a > 0.0, g * o * tl.log(tl.where(a > 0.0, a, 1.0)), 0.0)
        dz = tl.where(live, g * tl.where(a >= tiny, alpha * tl.abs(o) / tl.where(a >= tiny, a, 1.0), d_tiny), 0.0)
        tl.store(gx_ptr + off, dz, mask=ok)
        s_dz += dz
        s_dzy += dz * ((y - mu) * rstd)
    sum_dz = tl.reduce(s_dz, 0, tl.standard._sum_combine)
    sum_dzy = tl.reduce(s_dzy, 0, tl.standard._sum_combine)
    tl.store(sums_ptr + c * 3, sum_dz)
    tl.store(sums_ptr + c * 3 + 1, sum_dzy)
    tl.store(sums_ptr + c * 3 + 2, tl.reduce(s_alpha, 0, tl.standard._sum_combine))
    k1 = sum_dz / count
    k2 = sum_dzy / count
    if not TRAINING:  # eval: the statistics are constants
        k1 = k1 * 0.0
        k2 = k2 * 0.0
    for start in range(0, count, BLOCK):
        e = start + tl.arange(0, BLOCK)
        ok = e < count
        off = base + (e // HW).to(tl.int64) * C * HW + e % HW
        y = tl.load(y_ptr + off, mask=ok, other=0.0)
        dz = tl.load(gx_ptr + off, mask=ok, other=0.0)
        tl.store(gy_ptr + off, scale * (dz - k1 - (y - mu) * rstd * k2), mask=ok)


@functools.cache
def _kernels(interpret):
    del interpret  # one wrapping per mode: triton.jit decides at wrap time
    return triton.jit(_stage_forward), triton.jit(_stage_backward)


def _setup(y):
    (_, _), device = _device(y)
    interpret = bool(triton.knobs.runtime.interpret)
    return _kernels(interpret), device, (_INTERPRETER_BLOCK if interpret else _BLOCK)


def forward(x, y, gamma, beta, alpha, mean, var, eps, relu, training):
    """The stage's output; in training ``mean`` and ``var`` are filled with the batch statistics."""
    (fwd, _), device, block = _setup(y)
    n, c, h, w = y.shape
    out = torch.empty_like(y)
    with device:
        fwd[(c,)](x, y, out, gamma, beta, mean, var, alpha, n, c, h * w, float(eps),
                  RELU=bool(relu), TRAINING=bool(training), BLOCK=block)
    return out


def backward(grad, x, y, out, gamma, beta, alpha, mean, var, eps, relu, training, tiny):
    """(dL/dz, dL/dy, dL/dgamma, dL/dbeta, dL/dalpha) of the stage."""
    (_, bwd), device, block = _setup(y)
    n, c, h, w = y.shape
    gx, gy = torch.empty_like(y), torch.empty_like(y)
    sums = y.new_empty(c, 3)
    with device:
        bwd[(c,)](grad, x, y, out, gamma, beta, mean, var, gx, gy, sums, alpha, n, c, h * w, float(eps),
                  float(tiny), RELU=bool(relu), TRAINING=bool(training), BLOCK=block)
    return gx, gy, sums[:, 1], sums[:, 0], sums[:, 2].sum()
