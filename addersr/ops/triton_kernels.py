"""Triton backend of the adder operator: forward and input-gradient kernels (DESIGN.md 1).

Both kernels are implicit GEMMs over the adder "product": no patch tensor is formed.

* forward: a program owns BP output pixels (flattened over n, ho, wo) x A*32 output
  channels and loops over the taps (unrolled) and the input channels (a runtime loop),
  reading X with the stride, padding and edge masks (a padded tap reads 0, so it adds |W|).
* input gradient: a program owns BQ input pixels x A*32 input channels of one stride
  phase (y mod sh, x mod sw), so that a tap either sees every pixel of the tile or none;
  it loops over the taps that do and over the output channels.

The accumulator has the shape (A, B, 32): the 32 lanes of a warp run along the channels,
the warps along the pixels, and each thread keeps A x B/num_warps values. The pixel
vector (B = 32 * num_warps values, one per thread) goes through shared memory as a
broadcast and the channel vector is read straight from the (pre-transposed, padded)
weight. In the sm_90 SASS of the inner loop 82% of the instructions are fp32 adds for
A = 2 and 72% for A = 1 (the rest: 8 shared loads, 2-3 global loads, 2 barriers, ~10
integer ops).
Accumulation is in the input dtype: fp32, or fp64 for exact tests. The weight gradient
is left to ``AdderFunction``'s default, the convolution identity with TF32 off.

The input gradient uses HardTanh(W - X) = 2 * sat(W' - X/2) - 1 with W' = W/2 + 1/2 and
sat = clamp to [0, 1], which the GPU does in a single saturating add:
gX = 2 * sum g sat(W' - X/2) - sum g, two instructions per adder op like the forward.

``triton.jit`` decides between compiling and interpreting when it wraps a function, so
the kernels are wrapped on first use in each ``TRITON_INTERPRET`` mode. Nothing is
autotuned: ``choose_variant`` picks one of the named ``VARIANTS`` from the shape (one
compile per new layer shape, none when only the image size changes), the interpreter
gets one small block, and ``ADDERSR_TRITON_VARIANT`` or the ``variant`` argument picks
another (``benchmarks/gpu_run.py`` times them all).
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["forward", "grad_input"]

# Kernel variants by name: (pixels per program, channel groups of 32, warps, stages). One pixel
# per thread; A = 2 gives each thread two channels per load (half the shared-memory
# broadcasts and barriers per channel); stages > 1 lets Triton pipeline the channel loop's
# loads through shared memory instead of the register prefetch alone.
VARIANTS = {
    "p32a1w1": (32, 1, 1, 1), "p32a2w1": (32, 2, 1, 1), "p64a1w2": (64, 1, 2, 1),
    "p64a2w2": (64, 2, 2, 1), "p128a1w4": (128, 1, 4, 1), "p128a2w4": (128, 2, 4, 1),
    "p256a2w8": (256, 2, 8, 1), "p128a2w4s3": (128, 2, 4, 3),
}
_INTERPRETER_VARIANT = "p64a1w2"
_WAVES = 2 * 132  # programs for two full waves of an H100/H200's SMs
_LANES = 32
_MAX_GROUPS = max(v[1] for v in VARIANTS.values())


def _forward_kernel(x_ptr, w_ptr, y_ptr, P, C, H, W, O, Ho, Wo, sh, sw, ph, pw, OP,
                    KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, A: tl.constexpr):
    """y[n,o,ho,wo] = -sum_{c,i,j} |x[n,c,ho*sh-ph+i,wo*sw-pw+j] - w[i,j,c,o]| (w: KH,KW,C,OP)."""
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    p = pid_p * BP + tl.arange(0, BP)
    o = pid_o * (A * 32) + tl.arange(0, A)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
    p_ok = p < P
    wo = p % Wo
    ho = (p // Wo) % Ho
    n = (p // Wo // Ho).to(tl.int64)
    hw = H * W
    x_img = x_ptr + n * C * hw
    acc = tl.full((A, BP, 32), 0.0, y_ptr.dtype.element_ty)
    for i in tl.static_range(KH):
        hi = ho * sh - ph + i
        row_ok = p_ok & (hi >= 0) & (hi < H)
        for j in tl.static_range(KW):
            wi = wo * sw - pw + j
            ok = row_ok & (wi >= 0) & (wi < W)
            xp = x_img + hi * W + wi
            wp = w_ptr + (i * KW + j) * C * OP + o
            xv = tl.load(xp, mask=ok, other=0.0)
            wv = tl.load(wp)
            for _ in range(C - 1):  # the next channel is loaded before this one is used
                xp += hw
                wp += OP
                x_next = tl.load(xp, mask=ok, other=0.0)
                w_next = tl.load(wp)
                acc += tl.abs(xv[None, :, None] - wv)
                xv = x_next
                wv = w_next
            acc += tl.abs(xv[None, :, None] - wv)
    out = y_ptr + (n * O * Ho * Wo + ho * Wo + wo)[None, :, None] + o.to(tl.int64) * (Ho * Wo)
    tl.store(out, -acc, mask=p_ok[None, :, None] & (o < O))


def _grad_input_kernel(x_ptr, w_ptr, g_ptr, gx_ptr, C, H, W, O, Ho, Wo, sh, sw, ph, pw, CP,
                       Q, Hq, Wq,
                       KH: tl.constexpr, KW: tl.constexpr, BQ: tl.constexpr, A: tl.constexpr):
    """gx[n,c,y,x] = sum_{i,j,o} g[n,o,ho,wo] * clamp(W[o,c,i,j] - x[n,c,y,x], -1, 1) over the
    (ho, wo) with ho*sh - ph + i = y, wo*sw - pw + j = x; w holds W/2 + 1/2 as (KH,KW,O,CP).
    Program axis 2 is the stride phase (y mod sh, x mod sw); q runs over (n, y // sh, x // sw)."""
    pid_q = tl.program_id(0)
    pid_c = tl.program_id(1)
    phase = tl.program_id(2)
    ry = phase // sw
    rx = phase % sw
    q = pid_q * BQ + tl.arange(0, BQ)
    xq = q % Wq
    yq = (q // Wq) % Hq
    n = (q // Wq // Hq).to(tl.int64)
    y = yq * sh + ry
    x = xq * sw + rx
    q_ok = (q < Q) & (y < H) & (x < W)
    c = pid_c * (A * 32) + tl.arange(0, A)[:, None, None] * 32 + tl.arange(0, 32)[None, None, :]
    mask = q_ok[None, :, None] & (c < C)
    pix = (n * C * H * W + y * W + x)[None, :, None] + c.to(tl.int64) * (H * W)
    half_x = tl.load(x_ptr + pix, mask=mask, other=0.0) * 0.5
    hw_out = Ho * Wo
    g_img = g_ptr + n * O * hw_out
    acc = tl.full((A, BQ, 32), 0.0, gx_ptr.dtype.element_ty)
    g_sum = tl.full((BQ,), 0.0, gx_ptr.dtype.element_ty)
    for i in tl.static_range(KH):
        dy = ry + ph - i
        if dy % sh == 0:
            ho = yq + dy // sh
            row_ok = q_ok & (ho >= 0) & (ho < Ho)
            for j in tl.static_range(KW):
                dx = rx + pw - j
                if dx % sw == 0:
                    wo = xq + dx // sw
                    ok = row_ok & (wo >= 0) & (wo < Wo)
                    gp = g_img + ho * Wo + wo
                    wp = w_ptr + (i * KW + j) * O * CP + c
                    gv = tl.load(gp, mask=ok, other=0.0)
                    wv = tl.load(wp)
                    for _ in range(O - 1):  # the next channel is loaded before this one is used
                        gp += hw_out
                        wp += CP
                        g_next = tl.load(gp, mask=ok, other=0.0)
                        w_next = tl.load(wp)
                        g_sum += gv
                        acc += gv[None, :, None] * tl.clamp(wv - half_x, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
                        gv = g_next
                        wv = w_next
                    g_sum += gv
                    acc += gv[None, :, None] * tl.clamp(wv - half_x, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(gx_ptr + pix, 2.0 * acc - g_sum[None, :, None], mask=mask)


def choose_variant(pixels, channels, interpret=False):
    """The configuration rule that replaces autotuning (one compile per layer shape): two channel
    groups when there are 64+ channels, then the widest pixel block that still launches two
    waves of programs. ``ADDERSR_TRITON_VARIANT`` names a variant instead."""
    name = os.environ.get("ADDERSR_TRITON_VARIANT")
    if name:
        if name not in VARIANTS:
            raise ValueError(f"unknown Triton variant {name!r}; expected one of {sorted(VARIANTS)}")
        return name
    if interpret:
        return _INTERPRETER_VARIANT
    groups = 2 if channels >= 64 else 1
    for block in (256, 128, 64):
        name = f"p{block}a{groups}w{block // 32}"
        if name in VARIANTS and triton.cdiv(pixels, block) * triton.cdiv(channels, 32 * groups) >= _WAVES:
            return name
    return f"p32a{groups}w1"


@functools.cache
def _kernels(interpret):
    """The (forward, grad_input) kernels for one TRITON_INTERPRET mode; sizes are not
    specialised on (no recompiles when only the image size changes)."""
    fwd = triton.jit(_forward_kernel, do_not_specialize=["P", "H", "W", "Ho", "Wo"])
    gin = triton.jit(_grad_input_kernel, do_not_specialize=["H", "W", "Ho", "Wo", "Q", "Hq", "Wq"])
    return fwd, gin


def _meta(pixels, channels, variant):
    """Launch options of a variant: (block, groups, kwargs for the launch)."""
    interpret = bool(triton.knobs.runtime.interpret)
    block, groups, warps, stages = VARIANTS[variant or choose_variant(pixels, channels, interpret)]
    return block, groups, {"A": groups, "num_warps": warps, "num_stages": stages}


def _launch(x):
    """The kernels for the current mode, and a context that launches on x's GPU."""
    interpret = bool(triton.knobs.runtime.interpret)
    if x.device.type != "cuda" and not interpret:
        raise ValueError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 on the CPU; "
                         f"got a tensor on {x.device}")
    device = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    return _kernels(interpret), device


def _padded(t, dim, multiple, fill):
    """t with dimension ``dim`` padded up to a multiple of ``multiple`` with ``fill``."""
    extra = -t.shape[dim] % multiple
    if extra == 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, fill)], dim).contiguous()


def _check_sizes(pixels, *planes):
    """Pixel indices and offsets inside one channel plane are int32 (image and channel offsets
    are int64); the margin covers the last, partial block."""
    if pixels >= 2 ** 31 - 2 ** 10 or max(planes) >= 2 ** 31:
        raise ValueError(f"too large for the Triton adder kernels: {pixels} pixels in the batch "
                         f"(at most 2^31 - 2^10) or a channel plane of {max(planes)} (at most 2^31 - 1)")


def forward(x, weight, stride, padding, variant=None):
    """Y[n,o,p] = -sum_{c,i,j} |Xpad[n,c,p+(i,j)] - W[o,c,i,j]|; contiguous NCHW in and out.
    ``variant``: a name from ``VARIANTS`` (default: ``choose_variant``)."""
    (fwd, _), device = _launch(x)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    p = n * ho * wo
    _check_sizes(p, h * w, ho * wo)
    wt = _padded(weight.permute(2, 3, 1, 0), 3, _LANES * _MAX_GROUPS, 0.0)  # (kh, kw, c, OP)
    y = x.new_empty(n, o, ho, wo)
    block, groups, meta = _meta(p, o, variant)
    with device:
        fwd[(triton.cdiv(p, block), triton.cdiv(o, groups * _LANES))](
            x, wt, y, p, c, h, w, o, ho, wo, stride[0], stride[1], padding[0], padding[1], wt.shape[3],
            KH=kh, KW=kw, BP=block, **meta)
    return y


def grad_input(x, weight, grad_out, stride, padding, variant=None):
    """gX = sum over the outputs that see each input pixel of g * HardTanh(W - X)."""
    (_, gin), device = _launch(x)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = grad_out.shape[2:]
    hq, wq = triton.cdiv(h, stride[0]), triton.cdiv(w, stride[1])
    q = n * hq * wq
    _check_sizes(q, h * w, ho * wo)
    wt = _padded(weight.permute(2, 3, 0, 1) * 0.5 + 0.5, 3, _LANES * _MAX_GROUPS, 0.5)  # (kh, kw, o, CP)
    gx = torch.empty_like(x)
    block, groups, meta = _meta(q, c, variant)
    with device:
        gin[(triton.cdiv(q, block), triton.cdiv(c, groups * _LANES), stride[0] * stride[1])](
            x, wt, grad_out, gx, c, h, w, o, ho, wo, stride[0], stride[1], padding[0], padding[1], wt.shape[3],
            q, hq, wq, KH=kh, KW=kw, BQ=block, **meta)
    return gx
