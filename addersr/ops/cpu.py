"""Numba CPU kernels for the adder operator (DESIGN.md section 1).

Both kernels are reductions over contiguous runs of memory, which LLVM vectorises with
the accumulators in registers; nothing of size output x C*kh*kw is ever built (extra
memory: one NHWC copy of the input, or one channels-last copy of the output gradient, a
few rows of it per thread, and the weights).

* ``forward``: the input is copied into a zero-padded NHWC buffer and the weight into
  (O, kw, kh, C); per output row the kh input rows it reads are copied side by side into
  a buffer (Wp, kh, C) that stays in cache, so the patch of an output pixel and the filter
  are both one contiguous run of kw*kh*C values (one vectorised loop and one horizontal sum
  per register block, not kh, which counts most at 32 channels). Register block: 2 output pixels x 4 output channels (8
  accumulators, 6 loads per 8 adder ops). Threads share out (image, output row) pairs.
* ``grad_input``: every input pixel gathers its own gradient from the output pixels that
  see it (no scatter, no races), as ``sum g * clamp(W, x - 1, x + 1) - x * sum g``: three
  instructions per adder op (max, min, fma) instead of four. The output gradient is
  transposed to channels-last in one pass; for each input row the kernel copies the
  output rows that read it side by side into a buffer that stays in cache (``_stack_rows``,
  zeros off the image), and the weight taps of each stride phase are stored newest output
  column first: all taps of a pixel are then one contiguous run of (columns x rows x O)
  values, one vectorised loop with one horizontal sum at its end.
  Register block: 2 input columns with the same taps x 4 input channels. Threads share
  out (image, input row) pairs.

Both kernels ask LLVM for 512-bit vectors (``_wide_vectors``) where the CPU has them.
Blocks at the right/bottom edge are clamped to the last valid index, so odd sizes
recompute a few values instead of needing remainder loops. fastmath allows reassociation
and contraction only: never ``nnan``/``ninf``, so NaN in gives NaN out. The weight
gradient is left to the convolution identity (``function.grad_weight_conv``), which is
exact and runs at matmul speed.
"""

import threading

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_PARALLEL_WORK = 1 << 22  # adder ops below which one thread beats waking the pool
_COPY_COST = 64  # a copied value weighs this many adder ops against _PARALLEL_WORK
_LAUNCH_LOCK = threading.Lock()


@intrinsic
def _wide_vectors(typingctx):
    """Marks the enclosing LLVM function ``"prefer-vector-width"="512"``: LLVM's default for
    AVX-512 CPUs is 256-bit vectors, half the lanes of the add pipes (a no-op elsewhere)."""
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')  # a string attribute
        return context.get_dummy_value()
    return types.none(), codegen


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_kernel(xp, w, y, kh, stride_h, stride_w, unit):
    """y[n,o,ho,wo] = -sum_{i,j,c} |xp[n, ho*sh+i, wo*sw+j, c] - w[o,j,i,c]|.

    xp: zero-padded input (N, Hp, Wp, C); w: (O, kw, kh, C); y: (N, O, Ho, Wo), written.
    The stacked rows (see the module doc) sit in a 64-byte aligned buffer.
    ``unit``: a one-element array holding 1. Each accumulation is ``acc + |d| * 1``, which
    LLVM, not knowing the 1 when it compiles, emits as an FMA: the same exactly rounded sum
    as an add (|d| * 1 is exact), issued on the FMA pipes, so the subtraction and the
    accumulation no longer queue for the same add pipes (+18% at 64 channels, +5% at 32 on
    a Zen 5: ``benchmarks/adder_op.py``, 1 thread).
    """
    n_batch, hp, wp, channels = xp.shape
    n_out = w.shape[0]
    out_h, out_w = y.shape[2], y.shape[3]
    seg = w.shape[1] * kh * channels
    filt = w.reshape(n_out, seg)
    step = stride_w * kh * channels
    one = unit[0]
    for job in prange(n_batch * out_h):
        _wide_vectors()
        n = job // out_h
        ho = job - n * out_h
        rows = _aligned_empty(wp * kh * channels, xp.dtype)  # (Wp, kh, C)
        for i in range(kh):
            _interleave(rows, xp[n, ho * stride_h + i].reshape(-1), i, kh, channels)
        for o0 in range(0, n_out, 4):
            q0, q1 = o0, min(o0 + 1, n_out - 1)
            q2, q3 = min(o0 + 2, n_out - 1), min(o0 + 3, n_out - 1)
            w0, w1, w2, w3 = filt[q0], filt[q1], filt[q2], filt[q3]
            for wo0 in range(0, out_w, 2):
                wo1 = min(wo0 + 1, out_w - 1)
                xa = rows[wo0 * step:wo0 * step + seg]
                xb = rows[wo1 * step:wo1 * step + seg]
                a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = y.dtype.type(0)
                for t in range(seg):
                    u, v = xa[t], xb[t]
                    a00 += abs(u - w0[t]) * one
                    a01 += abs(u - w1[t]) * one
                    a02 += abs(u - w2[t]) * one
                    a03 += abs(u - w3[t]) * one
                    a10 += abs(v - w0[t]) * one
                    a11 += abs(v - w1[t]) * one
                    a12 += abs(v - w2[t]) * one
                    a13 += abs(v - w3[t]) * one
                y[n, q0, ho, wo0], y[n, q1, ho, wo0] = -a00, -a01
                y[n, q2, ho, wo0], y[n, q3, ho, wo0] = -a02, -a03
                y[n, q0, ho, wo1], y[n, q1, ho, wo1] = -a10, -a11
                y[n, q2, ho, wo1], y[n, q3, ho, wo1] = -a12, -a13


@njit(parallel=True, cache=True)
def _nhwc_kernel(x, out, pad_h, pad_w):
    """out[n, h + pad_h, w + pad_w, c] = x[n, c, h, w], zero on the border (torch's permuted
    copy is several times slower)."""
    n_batch, channels, height, width = x.shape
    rows = out.shape[1]
    for job in prange(n_batch * rows):
        n = job // rows
        hp = job - n * rows
        row = out[n, hp]
        h = hp - pad_h
        if h < 0 or h >= height:
            row[:] = 0
            continue
        row[:pad_w] = 0
        row[pad_w + width:] = 0
        for c in range(channels):
            src = x[n, c, h]
            for w in range(width):
                row[pad_w + w, c] = src[w]


@njit(inline="always")
def _clamp(w, lo, hi):
    """min(max(w, lo), hi) as two select instructions that keep a NaN ``w``."""
    w = lo if w < lo else w
    return hi if w > hi else w


@njit(inline="always")
def _aligned_empty(size, dtype):
    """A 1-D array of ``size`` elements whose data starts on a 64-byte boundary: numba's own
    allocations can be 32 bytes off, and then every 512-bit load splits a cache line."""
    raw = np.empty(size + 64, dtype)
    step = raw.itemsize
    start = -(raw.ctypes.data // step) % (64 // step)
    return raw[start:start + size]


@njit(inline="always")
def _taps(pos, pad, stride, k, out):
    """Kernel taps seeing input index ``pos``: tap ``r + stride*m`` reads it for output index
    ``base - m``; returns (r, base, m_lo, m_hi), the valid m (m_hi < m_lo: none)."""
    r, base = (pos + pad) % stride, (pos + pad) // stride
    m_hi = min(base, (k - 1 - r) // stride) if r < k else -1
    return r, base, max(0, base - out + 1), m_hi


@njit(parallel=True, cache=True)
def _channels_last_kernel(g, gt):
    """gt[n, ho, wo, o] = g[n, o, ho, wo] (the transpose of the output gradient, one pass)."""
    n_batch, n_out, out_h, out_w = g.shape
    for job in prange(n_batch * out_h):
        n = job // out_h
        ho = job - n * out_h
        dst = gt[n, ho]
        for o in range(n_out):
            src = g[n, o, ho]
            for wo in range(out_w):
                dst[wo, o] = src[wo]


@njit(inline="always")
def _stack_rows(gt, n, h, kh, stride_h, pad_h, mh, flat):
    """flat as (Wo, mh, O): [wo, mi, o] = gt[n, bh - mi, wo, o] where kernel row ``rh + sh*mi``
    reads input row h from output row bh - mi, (bh, rh) = divmod(h + pad_h, sh); else 0."""
    out_h, out_w, n_out = gt.shape[1], gt.shape[2], gt.shape[3]
    rh, bh = (h + pad_h) % stride_h, (h + pad_h) // stride_h
    for mi in range(mh):
        ho = bh - mi
        if rh + stride_h * mi < kh and 0 <= ho < out_h:
            _interleave(flat, gt[n, ho].reshape(-1), mi, mh, n_out)
        else:
            for wo in range(out_w):
                flat[(wo * mh + mi) * n_out:(wo * mh + mi + 1) * n_out] = 0


@njit(inline="always")
def _interleave(flat, src, slot, slots, channels):
    """flat as (src.size // channels, slots, channels): [j, slot, :] = src[j*channels:(j+1)*channels]."""
    for j in range(src.size // channels):
        d, e = (j * slots + slot) * channels, j * channels
        for c in range(channels):
            flat[d + c] = src[e + c]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _grad_input_kernel(x, wf, gt, gx, kh, kw, stride_h, stride_w, pad_h, pad_w):
    """gx[n,c,h,w] = sum over taps (i,j) seeing (h,w) of sum_o g[n,ho,wo,o] * HT(W[o,c,i,j] - x[n,c,h,w]),
    computed as sum g * clamp(W, x - 1, x + 1) - x * sum g (three instructions per adder op).

    x, gx: (N, C, H, W); gt: the output gradient channels-last, (N, Ho, Wo, O), stacked per
    input row into a buffer of (Wo, Mh, O) (``_stack_rows``); wf: (sh, sw, C, M*Mh*O) with
    wf[rh, rw, c, ((M-1-m)*Mh + mi)*O + o] = W[o, c, rh + sh*mi, rw + sw*m] (0 off the kernel),
    M = ceil(kw / sw), Mh = ceil(kh / sh): the taps of a pixel are one run of (m, mi, o).
    Register block: 2 input columns of the same phase (same taps) x 4 channels; each channel
    block sweeps the whole row, so its weights stay in L1.
    """
    n_batch, channels, height, width = x.shape
    out_w, n_out = gt.shape[2], gt.shape[3]
    mh = -(-kh // stride_h)
    span = mh * n_out  # values per output column
    taps = wf.shape[3] // span
    one = gx.dtype.type(1)
    tap = np.empty((width, 4), np.int64)  # (r, base, m_lo, m_hi) of each column, divisions done once
    for col in range(width):
        tap[col, 0], tap[col, 1], tap[col, 2], tap[col, 3] = _taps(col, pad_w, stride_w, kw, out_w)
    for job in prange(n_batch * height):
        _wide_vectors()
        n = job // height
        h = job - n * height
        grow = _aligned_empty(out_w * span, gx.dtype)
        _stack_rows(gt, n, h, kh, stride_h, pad_h, mh, grow)
        rh = (h + pad_h) % stride_h
        sums = np.empty(width, gx.dtype)  # the output gradient summed over each column's taps
        for col in range(width):
            base, lo, hi = tap[col, 1], tap[col, 2], tap[col, 3]
            seg = grow[(base - hi) * span:(base - hi) * span + max(0, (hi - lo + 1) * span)]
            total = gx.dtype.type(0)
            for t in range(seg.size):
                total += seg[t]
            sums[col] = total
        for c0 in range(0, channels, 4):  # along the row, so the block's weights stay in L1
            c1, c2, c3 = min(c0 + 1, channels - 1), min(c0 + 2, channels - 1), min(c0 + 3, channels - 1)
            for col0 in range(0, width, 2 * stride_w):
                for col_a in range(col0, min(col0 + stride_w, width)):
                    col_b = col_a + stride_w if col_a + stride_w < width else col_a
                    same = tap[col_a, 2] == tap[col_b, 2] and tap[col_a, 3] == tap[col_b, 3]
                    for half in range(1 if same else 2):  # columns with different taps go one by one
                        ca = col_b if half == 1 else col_a
                        cb = col_a if not same and half == 0 else col_b
                        r, ba, lo, hi = tap[ca, 0], tap[ca, 1], tap[ca, 2], tap[ca, 3]
                        bb = tap[cb, 1]
                        length = max(0, (hi - lo + 1) * span)
                        ws = (taps - 1 - hi) * span
                        gsa = grow[(ba - hi) * span:(ba - hi) * span + length]
                        gsb = grow[(bb - hi) * span:(bb - hi) * span + length]
                        x0, x1, x2, x3 = x[n, c0, h, ca], x[n, c1, h, ca], x[n, c2, h, ca], x[n, c3, h, ca]
                        z0, z1, z2, z3 = x[n, c0, h, cb], x[n, c1, h, cb], x[n, c2, h, cb], x[n, c3, h, cb]
                        w0, w1 = wf[rh, r, c0, ws:ws + length], wf[rh, r, c1, ws:ws + length]
                        w2, w3 = wf[rh, r, c2, ws:ws + length], wf[rh, r, c3, ws:ws + length]
                        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = gx.dtype.type(0)
                        for t in range(length):
                            u, v = gsa[t], gsb[t]
                            e0, e1, e2, e3 = w0[t], w1[t], w2[t], w3[t]
                            a0 += u * _clamp(e0, x0 - one, x0 + one)
                            a1 += u * _clamp(e1, x1 - one, x1 + one)
                            a2 += u * _clamp(e2, x2 - one, x2 + one)
                            a3 += u * _clamp(e3, x3 - one, x3 + one)
                            b0 += v * _clamp(e0, z0 - one, z0 + one)
                            b1 += v * _clamp(e1, z1 - one, z1 + one)
                            b2 += v * _clamp(e2, z2 - one, z2 + one)
                            b3 += v * _clamp(e3, z3 - one, z3 + one)
                        sa, sb = sums[ca], sums[cb]
                        gx[n, c0, h, ca], gx[n, c1, h, ca] = a0 - x0 * sa, a1 - x1 * sa
                        gx[n, c2, h, ca], gx[n, c3, h, ca] = a2 - x2 * sa, a3 - x3 * sa
                        gx[n, c0, h, cb], gx[n, c1, h, cb] = b0 - z0 * sb, b1 - z1 * sb
                        gx[n, c2, h, cb], gx[n, c3, h, cb] = b2 - z2 * sb, b3 - z3 * sb


def _np(t):
    return t.detach().numpy()


def _launch(kernel, work, *args):
    """Run ``kernel(*args)``; jobs under ``_PARALLEL_WORK`` adder ops stay on this thread.

    Launches are serialised: numba's fallback threading layer (workqueue, used when neither
    TBB nor OpenMP is present) aborts the process on concurrent launches from several
    threads (a web app's workers), and each launch uses every core anyway.
    """
    threads = numba.get_num_threads()
    with _LAUNCH_LOCK:
        if work >= _PARALLEL_WORK or threads == 1:
            return kernel(*args)
        numba.set_num_threads(1)
        try:
            return kernel(*args)
        finally:
            numba.set_num_threads(threads)


def _padded_nhwc(x, padding):
    ph, pw = padding
    n, c, h, w = x.shape
    out = x.new_empty(n, h + 2 * ph, w + 2 * pw, c)
    _launch(_nhwc_kernel, out.numel() * _COPY_COST, _np(x), _np(out), ph, pw)
    return out


def _phase_weights(weight, stride):
    """(sh, sw, C, M*Mh*O): for each stride phase (rh, rw), the taps newest output column first,
    then kernel row, then output channel (the layout of ``_grad_input_kernel``)."""
    o, c, kh, kw = weight.shape
    mh, mw = -(-kh // stride[0]), -(-kw // stride[1])
    wf = weight.new_zeros(stride[0], stride[1], c, mw, mh, o)
    for i in range(kh):
        for j in range(kw):
            wf[i % stride[0], j % stride[1], :, mw - 1 - j // stride[1], i // stride[0]] = weight[:, :, i, j].t()
    return wf.reshape(stride[0], stride[1], c, mw * mh * o)


def forward(x, weight, stride, padding):
    """Y = -sum |Xpad - W| for contiguous NCHW ``x`` and (O, C, kh, kw) ``weight``."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    y = x.new_empty(n, o, ho, wo)
    _launch(_forward_kernel, y.numel() * weight[0].numel(), _np(_padded_nhwc(x, padding)),
            _np(weight.permute(0, 3, 2, 1).contiguous()), _np(y), kh, stride[0], stride[1],
            np.ones(1, _np(x).dtype))
    return y


def grad_input(x, weight, grad_out, stride, padding):
    """gX = sum g * HardTanh(W - X) over every (output pixel, tap) that reads X."""
    n = x.shape[0]
    kh, kw = weight.shape[2:]
    o, ho, wo = grad_out.shape[1:]
    gt = x.new_empty(n, ho, wo, o)
    _launch(_channels_last_kernel, gt.numel() * _COPY_COST, _np(grad_out.contiguous()), _np(gt))
    gx = torch.empty_like(x)
    _launch(_grad_input_kernel, grad_out.numel() * weight[0].numel(), _np(x),
            _np(_phase_weights(weight, stride)), _np(gt), _np(gx),
            kh, kw, stride[0], stride[1], padding[0], padding[1])
    return gx
