"""uint8 sum-of-absolute-differences kernels: 8-bit adder layers (DESIGN.md section 1).

With one scale ``s`` and zero point ``z`` shared by a layer's input and its filters,
``|x - w| = s * |qx - qw|``: an adder layer becomes a pure uint8 SAD with an int32 result.

Layouts (numpy arrays):

* input ``xq``: (N, Hp, Wp, Cp) uint8, NHWC, the border padded with the zero point and
  the channels padded with byte 0 to ``Cp = padded_channels(C, kw)``, so one kernel row
  (``kw * Cp`` bytes) is a whole number of 32-byte vectors;
* filters ``wq``: (O, kh, kw, Cp) uint8, padded channels 0 (so they add |0 - 0| = 0).
  Kernels take them packed for their variant (:func:`pack_filters`; a plain array is
  packed on each call, which costs a copy of the filters).

Three variants (:mod:`addersr.ops.sad_ir`): ``"avx512"`` (AVX-512BW) and ``"vpsadbw"``
(AVX2), both checked before compiling, run ``psadbw`` on filters grouped 8 (4) at a time
with interleaved taps against broadcast input bytes, so each vector lane sums one output
(``sad_ir.sad_row``); ``"portable"`` is plain vector code LLVM turns into SAD instructions
where the target has them. ``variant=None`` picks the fastest the CPU has, $ADDERSR_SAD
overrides. Register blocks: ``BLOCK`` output pixels x filter groups (portable: filters);
threads share out (image, output row) pairs; edge blocks are clamped (recomputed). The
kernels below marked "template" are compiled once per variant by :func:`_kernels`, which
supplies their globals (``SAD``, ``BLOCK_P``, ``BLOCK_F``, ``LANES``, ``sad_rows``).

:func:`sad2d` is the bare SAD. :func:`adder_layer` fuses the AdderSR layer's epilogue in
its output stage, per output row: ``v = alpha[o] * SAD + beta[o]`` (folded BN and weight
compensation), ``+ s_in * qx_centre`` (the self-shortcut, dequantised: the constant part
is in ``beta``), ReLU, ``sign(v) |v|^a``, then optionally ``skip + res_scale * v``, written
as float32 NHWC and / or requantised into the next layer's padded uint8 input.
"""

import math
import os
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .cpu import _launch
from .cpu_ir import compile_template, source_tag
from .sad_ir import f32_exp2i, f32_split, has_isa, portable_block, sad_row

__all__ = ["PackedFilters", "adder_layer", "default_variant", "fill_border", "pack_filters",
           "padded_channels", "quantize_nhwc", "sad2d", "variants"]

VARIANTS = ("avx512", "vpsadbw", "portable")
_NEEDS = {"avx512": "avx512bw", "vpsadbw": "avx2", "portable": None}
# filters per group (one per 64-bit lane) of the psadbw variants
LANES = {"avx512": 8, "vpsadbw": 4}
# register blocks, output pixels x filter groups (portable: x filters). A Zen 5, 1 thread,
# 1x32x128x128 / 1x64x96x96: avx512 6 x 4 402 / 433 G op/s, 12 x 2 383 / 424, 8 x 2 403 /
# 426; vpsadbw compiled for znver3 (16 vector registers) 4 x 2 205 / 209, 6 x 2 192 / 208,
# 5 x 2 197 / 203, 3 x 3 184 / 179
BLOCK = {"avx512": (6, 4), "vpsadbw": (4, 2), "portable": (2, 8)}
_FM = {"reassoc", "contract", "arcp", "nsz", "afn"}
_LN2_INV2 = np.float32(2.0 / math.log(2.0))


def variants():
    """The SAD variants this CPU can run, fastest first."""
    return [v for v in VARIANTS if _NEEDS[v] is None or has_isa(_NEEDS[v])]


def default_variant(variant=None):
    """``variant``, else $ADDERSR_SAD, else the fastest available; ValueError if unusable."""
    name = variant or os.environ.get("ADDERSR_SAD") or variants()[0]
    if name not in VARIANTS:
        raise ValueError(f"unknown SAD variant {name!r}; expected one of {list(VARIANTS)}")
    if name not in variants():
        raise ValueError(f"SAD variant {name!r} needs {_NEEDS[name].upper()}, which this CPU "
                         "(numba target) lacks")
    return name


def padded_channels(channels, kw):
    """The smallest ``Cp >= channels`` with ``kw * Cp`` a multiple of 32."""
    step = 32 // math.gcd(kw, 32)
    return -(-channels // step) * step


@njit(inline="always", fastmath=_FM)
def _pow(y, a):
    """y ** a for float32 y >= 0 (0 for y < 1e-37), vectorisable; relative error 5e-7 for
    1e-3 <= y <= 1e3 and a <= 1 (float32 rounding of a * log2(y) grows it for larger ones)."""
    e, m = f32_split(y)
    big = m > np.float32(1.4142135)
    m = m * np.float32(0.5) if big else m
    e = e + np.float32(1.0) if big else e
    t = (m - np.float32(1.0)) / (m + np.float32(1.0))
    t2 = t * t
    log2 = e + _LN2_INV2 * t * (np.float32(1.0) + t2 * (np.float32(1 / 3) + t2 * (
        np.float32(0.2) + t2 * np.float32(1 / 7))))
    z = min(max(a * log2, np.float32(-125.0)), np.float32(127.0))
    n = np.float32(np.int32(z + np.float32(128.5))) - np.float32(128.0)  # round(z), no libm call
    f = (z - n) * np.float32(0.6931471805599453)
    p = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (np.float32(1 / 6) + f * (
        np.float32(1 / 24) + f * (np.float32(1 / 120) + f * np.float32(1 / 720))))))
    r = f32_exp2i(n) * p
    return r if y > np.float32(1e-37) else np.float32(0.0)


def _grouped_rows(xflat, wflat, acc, n, ho, hp, wp, cp, out_w, n_out, kh, kw, sh, sw):
    """Template: SAD of output row (n, ho) into ``acc`` (out_w * n_out int32, pixel-major),
    psadbw variants (packed filters)."""
    n_groups = -(-n_out // LANES)
    for g0 in range(0, n_groups, BLOCK_F):
        SAD(xflat, wflat, acc, (n * hp + ho * sh) * wp * cp, sw * cp, out_w, g0, n_out, wp * cp, kh, kw * cp)


def _plain_rows(xflat, wflat, acc, n, ho, hp, wp, cp, out_w, n_out, kh, kw, sh, sw):
    """Template: as :func:`_grouped_rows`, portable variant (plain filters)."""
    npix, nfil = BLOCK_P, BLOCK_F
    xo, oo, fi = np.empty(npix, np.int64), np.empty(npix, np.int64), np.empty(nfil, np.int64)
    for wo0 in range(0, out_w, npix):
        for p in range(npix):
            wo = min(wo0 + p, out_w - 1)
            xo[p] = ((n * hp + ho * sh) * wp + wo * sw) * cp
            oo[p] = wo * n_out
        for o0 in range(0, n_out, nfil):
            for f in range(nfil):
                fi[f] = min(o0 + f, n_out - 1)
            SAD(xflat, xo, wflat, fi, acc, oo, wp * cp, kh, kw * cp)


def _sad_kernel(xq, wq, out, sh, sw):
    """Template: ``out`` (N, Ho, Wo, O) int32 = SAD of ``xq`` and packed ``wq`` at stride (sh, sw)."""
    n_batch, hp, wp, cp = xq.shape
    _, kh, kw, _ = wq.shape
    _, out_h, out_w, n_out = out.shape
    xflat, wflat = xq.reshape(-1), wq.reshape(-1)
    for job in prange(n_batch * out_h):
        n = job // out_h
        ho = job - n * out_h
        acc = out[n, ho].reshape(-1)
        sad_rows(xflat, wflat, acc, n, ho, hp, wp, cp, out_w, n_out, kh, kw, sh, sw)


def _layer_kernel(xq, wq, alpha, beta, s_in, a_pow, relu, skip, res_scale, fout, qout, inv_s_out,
                  z_out, flags):
    """Template: fused AdderSR layer, stride 1, "same" padding; flags: (has_skip, write_f, write_q)."""
    n_batch, hp, wp, cp = xq.shape
    _, kh, kw, _ = wq.shape
    n_out = alpha.shape[0]
    ph, pw = kh // 2, kw // 2
    out_h, out_w = hp - 2 * ph, wp - 2 * pw
    qph, qpw = (qout.shape[1] - out_h) // 2, (qout.shape[2] - out_w) // 2
    has_skip, write_f, write_q = flags[0], flags[1], flags[2]
    xflat, wflat = xq.reshape(-1), wq.reshape(-1)
    for job in prange(n_batch * out_h):
        n = job // out_h
        ho = job - n * out_h
        acc = np.empty(out_w * n_out, np.int32)
        v = np.empty((out_w, n_out), np.float32)
        sad_rows(xflat, wflat, acc, n, ho, hp, wp, cp, out_w, n_out, kh, kw, 1, 1)
        _epilogue(acc.reshape(out_w, n_out), v, xq[n, ho + ph, pw:pw + out_w], alpha, beta, s_in,
                  a_pow, relu, skip[n, ho] if has_skip else v, res_scale, has_skip)
        if write_f:
            fout[n, ho] = v
        if write_q:
            _requantize(v, qout[n, ho + qph, qpw:qpw + out_w], inv_s_out, z_out)


@njit(inline="always", fastmath=_FM)
def _epilogue(acc, v, centre, alpha, beta, s_in, a_pow, relu, skip, res_scale, has_skip):
    """One output row (out_w, O): each step its own loop, so LLVM vectorises every one."""
    out_w, n_out = acc.shape
    for wo in range(out_w):
        for o in range(n_out):
            v[wo, o] = alpha[o] * np.float32(acc[wo, o]) + beta[o] + s_in * np.float32(centre[wo, o])
    if relu:
        for wo in range(out_w):
            for o in range(n_out):
                v[wo, o] = max(v[wo, o], np.float32(0.0))
    if a_pow != np.float32(1.0):
        for wo in range(out_w):
            for o in range(n_out):
                y = v[wo, o]
                mag = _pow(abs(y), a_pow)
                v[wo, o] = mag if y >= np.float32(0.0) else -mag
    if has_skip:
        for wo in range(out_w):
            for o in range(n_out):
                v[wo, o] = skip[wo, o] + res_scale * v[wo, o]


@njit(inline="always", fastmath=_FM)
def _requantize(v, q, inv_s, z):
    """q[:, :O] = clamp(round(v / s) + z, 0, 255) (truncation of a value >= 0 is floor)."""
    out_w, n_out = v.shape
    for wo in range(out_w):
        for o in range(n_out):
            t = min(max(v[wo, o] * inv_s + z + np.float32(0.5), np.float32(0.0)), np.float32(255.0))
            q[wo, o] = np.uint8(np.int32(t))


_KERNELS = {}
_IR_TAG = source_tag("sad_ir.py")


def _kernels(variant):
    """(sad kernel, fused layer kernel) for ``variant``, built (not compiled) on first use."""
    if variant not in _KERNELS:
        n_pix, n_blk = BLOCK[variant]
        if variant == "portable":
            block, rows = {"SAD": portable_block(n_pix, n_blk)}, _plain_rows
        else:
            block, rows = {"SAD": sad_row(8 * LANES[variant], n_pix, n_blk), "LANES": LANES[variant]}, _grouped_rows
        block.update(BLOCK_P=n_pix, BLOCK_F=n_blk)
        tag = f"{variant}_{_IR_TAG}"
        env = {**block, "sad_rows": compile_template(rows, f"_sad_rows_{tag}", block, False, _FM)}
        _KERNELS[variant] = (compile_template(_sad_kernel, f"_sad_kernel_{tag}", env, True, _FM),
                             compile_template(_layer_kernel, f"_layer_kernel_{tag}", env, True, _FM))
    return _KERNELS[variant]


class PackedFilters(NamedTuple):
    """uint8 filters (O, kh, kw, Cp) in the layout of one SAD variant (:func:`pack_filters`)."""
    variant: str
    data: np.ndarray
    shape: tuple


def pack_filters(wq, variant=None):
    """``wq`` (O, kh, kw, Cp) uint8 in the layout of ``variant`` (default: :func:`default_variant`):
    psadbw variants group the filters L at a time (zero filters pad the last group), each
    kernel row's bytes in steps of 8 channels, the L filters' 8 bytes side by side, as
    (ceil(O / L), kh, kw, Cp * L); portable keeps (O, kh, kw, Cp)."""
    packed = isinstance(wq, PackedFilters)
    name = wq.variant if packed and variant is None else default_variant(variant)
    if packed:
        if wq.variant != name:
            raise ValueError(f"filters packed for SAD variant {wq.variant!r}, not {name!r}")
        return wq
    _check_layout(None, wq)
    if name == "portable":
        return PackedFilters(name, wq, wq.shape)
    lanes = LANES[name]
    o, kh, kw, cp = wq.shape
    groups = -(-o // lanes)
    w = np.zeros((groups * lanes, kh, kw, cp), np.uint8)
    w[:o] = wq
    w = w.reshape(groups, lanes, kh, kw * cp // 8, 8).transpose(0, 2, 3, 1, 4)
    return PackedFilters(name, np.ascontiguousarray(w).reshape(groups, kh, kw, cp * lanes), wq.shape)


def _check_layout(xq, wq):
    """ValueError unless input ``xq`` (None: not checked) and filters ``wq`` (an array or
    :class:`PackedFilters`) suit the kernels."""
    arrays = [a for a in (xq, wq) if a is not None and not isinstance(a, PackedFilters)]
    if any(not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 4 for a in arrays):
        raise ValueError("SAD kernels take 4-D uint8 arrays (N, Hp, Wp, Cp) and (O, kh, kw, Cp)")
    shape = wq.shape
    if (xq is not None and xq.shape[3] != shape[3]) or (shape[2] * shape[3]) % 32:
        raise ValueError(f"input {None if xq is None else xq.shape} and filters {tuple(shape)}: channels "
                         "must match and kw * Cp be a multiple of 32 (see padded_channels)")
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError("SAD kernels need C-contiguous arrays")


def sad2d(xq, wq, stride=(1, 1), variant=None):
    """``out[n, ho, wo, o] = sum_{i,j,c} |xq[n, ho*sh+i, wo*sw+j, c] - wq[o,i,j,c]|`` (int32 NHWC)."""
    _check_layout(xq, wq)
    sh, sw = stride
    n, hp, wp, _ = xq.shape
    o, kh, kw, _ = wq.shape
    if hp < kh or wp < kw:
        raise ValueError(f"padded input {hp}x{wp} is smaller than the kernel {kh}x{kw}")
    out = np.empty((n, (hp - kh) // sh + 1, (wp - kw) // sw + 1, o), np.int32)
    packed = pack_filters(wq, variant)
    _launch(_kernels(packed.variant)[0], out.size * kh * kw * xq.shape[3], xq, packed.data, out, sh, sw)
    return out


def adder_layer(xq, wq, alpha, beta, s_in, a_pow=1.0, relu=False, skip=None, res_scale=1.0,
                fout=None, qout=None, s_out=1.0, z_out=0, variant=None):
    """One fused AdderSR layer (stride 1, same padding, C_in = C_out); see the module doc.

    ``alpha``, ``beta``: float32 (O,); ``s_in``: shortcut scale (0: no shortcut); ``skip``:
    float32 (N, H, W, O) or None; ``fout``: float32 (N, H, W, O) to write or None;
    ``qout``: padded uint8 NHWC of the next layer (border and channel padding untouched),
    quantised with ``s_out``, ``z_out``, or None.
    """
    _check_layout(xq, wq)
    n, hp, wp, _ = xq.shape
    o, kh, kw, _ = wq.shape
    h, w = hp - 2 * (kh // 2), wp - 2 * (kw // 2)
    if np.shape(alpha) != (o,) or np.shape(beta) != (o,):
        raise ValueError(f"alpha and beta must have one value per filter ({o})")
    if s_in and o > xq.shape[3]:
        raise ValueError("the self-shortcut needs as many input channels as filters")
    empty_f = np.empty((1, 1, 1, 1), np.float32)
    for arr, what in ((skip, "skip"), (fout, "fout")):
        if arr is not None and (arr.shape != (n, h, w, o) or arr.dtype != np.float32):
            raise ValueError(f"{what} must be float32 of shape {(n, h, w, o)}")
    if qout is not None and (qout.dtype != np.uint8 or qout.shape[0] != n or qout.shape[3] < o
                             or (qout.shape[1] - h) % 2 or (qout.shape[2] - w) % 2):
        raise ValueError(f"qout must be padded uint8 NHWC around {h}x{w} with >= {o} channels")
    flags = np.array([skip is not None, fout is not None, qout is not None], np.bool_)
    f32 = np.float32
    packed = pack_filters(wq, variant)
    _launch(_kernels(packed.variant)[1], n * h * w * o * kh * kw * xq.shape[3],
            xq, packed.data, np.ascontiguousarray(alpha, f32), np.ascontiguousarray(beta, f32), f32(s_in),
            f32(a_pow), bool(relu), empty_f if skip is None else skip, f32(res_scale),
            empty_f if fout is None else fout,
            np.empty((1, 1, 1, 1), np.uint8) if qout is None else qout, f32(1.0 / s_out), f32(z_out), flags)


@njit(parallel=True, cache=True, fastmath=_FM)
def _quantize_kernel(x, out, inv_s, z, ph, pw):
    n_batch, h, w, c = x.shape
    for job in prange(n_batch * h):
        n = job // h
        r = job - n * h
        for j in range(w):
            for k in range(c):
                t = min(max(x[n, r, j, k] * inv_s + z + np.float32(0.5), np.float32(0.0)), np.float32(255.0))
                out[n, r + ph, j + pw, k] = np.uint8(np.int32(t))


def quantize_nhwc(x, scale, zero_point, out):
    """Quantise float32 NHWC ``x`` into the interior of the padded uint8 ``out``."""
    ph, pw = (out.shape[1] - x.shape[1]) // 2, (out.shape[2] - x.shape[2]) // 2
    _quantize_kernel(x, out, np.float32(1.0 / scale), np.float32(zero_point), ph, pw)


def fill_border(buf, zero_point, pad, channels):
    """Set the border of the padded NHWC ``buf`` to ``zero_point`` in its first ``channels``."""
    ph, pw = pad
    buf[:, :ph, :, :channels] = zero_point
    buf[:, buf.shape[1] - ph:, :, :channels] = zero_point
    buf[:, :, :pw, :channels] = zero_point
    buf[:, :, buf.shape[2] - pw:, :channels] = zero_point
