"""Numba CPU kernels for the adder operator (DESIGN.md section 1).

Nothing of size output x C*kh*kw is ever built (extra memory: a zero-padded copy of the
input or of the output gradient, a few rows per thread, and the weights).

Stride 1 (every AdderSR layer): both passes are vectorised along image columns, one
vector register per 16 adjacent columns (8 in float64), with the register blocks written
as LLVM IR (:mod:`addersr.ops.cpu_ir`): every lane is one output, so there are no
horizontal sums and no per-pixel bookkeeping; the weights are broadcast scalars.

* ``forward``: ``acc += |x - w| * 1`` per step (input channel x kernel row x column) for a
  block of 8 filters x 3 vectors (24 accumulators). The FMA by a 1 that LLVM cannot see is
  the same exactly rounded sum as an add, issued on the FMA pipes, so the subtraction has
  the add pipes to itself and ``|.|`` (a bit mask) goes anywhere: 3 instructions per adder
  op on 4 pipes.
* ``grad_input``: every input pixel gathers its own gradient from the output pixels that
  see it (no scatter, no races), as ``sum g * clamp(W, x - 1, x + 1) - x * sum g``: three
  instructions per adder op. The clamp compares integers: with every value shifted by one
  constant so that each bound is >= 1 (``_clamp_shift``), the bits of a float, read as a
  signed integer, order as the float does (``_order_key``), and integer max / min issue
  on all four vector pipes of a Zen 5 where float ones have two. Block: 4 input channels
  x 2 vectors (8 accumulators, 16 bounds); NaN weights keep float keys.

Both read zero-padded NCHW rows (``torch.nn.functional.pad``) and prefetch the next row's
new lines: the hardware prefetchers lose dozens of interleaved channel rows.

Other strides: ``forward`` copies the input into a zero-padded NHWC buffer and the weight
into (O, kw, kh, C), stacks the kh input rows of each output row side by side, so that a
patch and a filter are both one contiguous run of kw*kh*C values (register block 2 pixels
x 4 filters, vectorised along the run); ``grad_input`` transposes the output gradient to
channels-last, stacks the output rows that read each input row (``_stack_rows``) and stores
the taps of each stride phase newest output column first, so that all taps of a pixel are
one contiguous run (register block 2 input columns with the same taps x 4 channels).

All kernels ask LLVM for 512-bit vectors (``_wide_vectors``) where the CPU has them and
share out (image, row) pairs among threads. fastmath allows reassociation and
contraction only: never ``nnan``/``ninf``, so NaN in gives NaN out. The weight gradient is
left to the convolution identity (``function.grad_weight_conv``), which is exact and runs
at matmul speed.
"""

import threading

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

from .cpu_ir import VECTOR_BYTES, abs_sum_block, clamp_fma_block, compile_template, prefetch, source_tag

_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_PARALLEL_WORK = 1 << 22  # adder ops below which one thread beats waking the pool
_COPY_COST = 64  # a copied value weighs this many adder ops against _PARALLEL_WORK
_LAUNCH_LOCK = threading.Lock()
_COL_BLOCK = (4, 2) if VECTOR_BYTES == 64 else (2, 2)  # channels x column vectors (32 / 16 registers)
_clamp_fma_block = clamp_fma_block(*_COL_BLOCK)
_clamp_fma_tail = clamp_fma_block(_COL_BLOCK[0], 1)  # a row's last vector, where it is alone
_FWD_BLOCK = (8, 3) if VECTOR_BYTES == 64 else (4, 2)  # filters x column vectors; the row's tail:
_abs_sum_block, _abs_sum_two, _abs_sum_one = (abs_sum_block(_FWD_BLOCK[0], v) for v in (_FWD_BLOCK[1], 2, 1))


@intrinsic
def _wide_vectors(typingctx):
    """Marks the enclosing LLVM function ``"prefer-vector-width"="512"``: LLVM's default for
    AVX-512 CPUs is 256-bit vectors, half the lanes of the add pipes (a no-op elsewhere)."""
    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')  # a string attribute
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _order_key(typingctx, value, like):
    """``value`` as the key the clamp of ``_grad_input_kernel`` compares: its bits as a signed
    integer when ``like`` (a scalar, not an array: no reference counting in loops) is an
    integer, else ``value`` itself. For floats >= 0
    (and any float against one >= 0) the integers are ordered as the floats, and integer
    max / min issue on all four vector pipes of a Zen 5, float ones on two."""
    if isinstance(like, types.Integer):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(signature.return_type))
        return types.int64(value, like) if value.bitwidth == 64 else types.int32(value, like), codegen

    def codegen(context, builder, signature, args):
        return args[0]
    return value(value, like), codegen


@intrinsic
def _key_value(typingctx, key):
    """The float whose bits the integer ``key`` holds (a float ``key``: itself)."""
    if isinstance(key, types.Integer):
        ret = types.float64 if key.bitwidth == 64 else types.float32

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(ret))
        return ret(key), codegen

    def codegen(context, builder, signature, args):
        return args[0]
    return key(key), codegen


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


def _forward_cols(xp, wk, unit, y, kh, kw):
    """Template of ``_forward_cols_kernel``. Stride 1: y as ``_forward_kernel``, vectorised
    along output columns (``_abs_sum_block``: no horizontal sums). xp: the input zero-padded,
    (N, C, Ho + kh - 1, rowlen), rowlen the output width rounded up to whole vectors + kw - 1;
    wk: (O/OB, C, kh, kw, OB), filters padded to a multiple of the block's OB; ``unit`` as for
    ``_forward_kernel``.
    """
    n_batch, channels, hp, rowlen = xp.shape
    n_out, out_h, out_w = y.shape[1], y.shape[2], y.shape[3]
    n_o, n_vec = _FWD_BLOCK
    lanes = VECTOR_BYTES // xp.itemsize
    plane = hp * rowlen
    steps = np.empty(channels * kh * kw, np.int64)  # offset of step (c, i, j)
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                steps[(c * kh + i) * kw + j] = c * plane + i * rowlen + j
    xflat, wflat, yflat = xp.reshape(-1), wk.reshape(-1), y.reshape(-1)
    for job in prange(n_batch * out_h):
        _wide_vectors()
        n = job // out_h
        ho = job - n * out_h
        if ho + 1 < out_h:  # the next output row's new input row, one line of each channel at a time
            line = 64 // xp.itemsize
            for c in range(channels):
                prefetch(xflat, (n * channels + c) * plane + (ho + kh) * rowlen, -(-rowlen // line), line)
        base = n * channels * plane + ho * rowlen
        for w0 in range(0, out_w, n_vec * lanes):
            ncols = out_w - w0
            vecs = min(n_vec, -(-ncols // lanes))
            for o0 in range(0, n_out, n_o):
                args = (xflat, base + w0, steps, wflat, (o0 // n_o) * steps.size * n_o, unit,
                        min(n_o, n_out - o0), ncols, yflat, ((n * n_out + o0) * out_h + ho) * out_w + w0,
                        out_h * out_w)
                if vecs == n_vec:
                    _abs_sum_block(*args)
                elif vecs == 2:
                    _abs_sum_two(*args)
                else:
                    _abs_sum_one(*args)


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
def _grad_input_kernel(x, wf, gt, gx, kh, kw, stride_h, stride_w, pad_h, pad_w, shift):
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
    kind = wf[0, 0, 0, 0]  # the key type, for _order_key
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
                        x0, x1 = x[n, c0, h, ca] + shift, x[n, c1, h, ca] + shift
                        x2, x3 = x[n, c2, h, ca] + shift, x[n, c3, h, ca] + shift
                        z0, z1 = x[n, c0, h, cb] + shift, x[n, c1, h, cb] + shift
                        z2, z3 = x[n, c2, h, cb] + shift, x[n, c3, h, cb] + shift
                        l0, l1, l2, l3 = (_order_key(x0 - one, kind), _order_key(x1 - one, kind),
                                          _order_key(x2 - one, kind), _order_key(x3 - one, kind))
                        h0, h1, h2, h3 = (_order_key(x0 + one, kind), _order_key(x1 + one, kind),
                                          _order_key(x2 + one, kind), _order_key(x3 + one, kind))
                        m0, m1, m2, m3 = (_order_key(z0 - one, kind), _order_key(z1 - one, kind),
                                          _order_key(z2 - one, kind), _order_key(z3 - one, kind))
                        k0, k1, k2, k3 = (_order_key(z0 + one, kind), _order_key(z1 + one, kind),
                                          _order_key(z2 + one, kind), _order_key(z3 + one, kind))
                        w0, w1 = wf[rh, r, c0, ws:ws + length], wf[rh, r, c1, ws:ws + length]
                        w2, w3 = wf[rh, r, c2, ws:ws + length], wf[rh, r, c3, ws:ws + length]
                        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = gx.dtype.type(0)
                        for t in range(length):
                            u, v = gsa[t], gsb[t]
                            e0, e1, e2, e3 = w0[t], w1[t], w2[t], w3[t]
                            a0 += u * _key_value(_clamp(e0, l0, h0))
                            a1 += u * _key_value(_clamp(e1, l1, h1))
                            a2 += u * _key_value(_clamp(e2, l2, h2))
                            a3 += u * _key_value(_clamp(e3, l3, h3))
                            b0 += v * _key_value(_clamp(e0, m0, k0))
                            b1 += v * _key_value(_clamp(e1, m1, k1))
                            b2 += v * _key_value(_clamp(e2, m2, k2))
                            b3 += v * _key_value(_clamp(e3, m3, k3))
                        sa, sb = sums[ca], sums[cb]
                        gx[n, c0, h, ca], gx[n, c1, h, ca] = a0 - x0 * sa, a1 - x1 * sa
                        gx[n, c2, h, ca], gx[n, c3, h, ca] = a2 - x2 * sa, a3 - x3 * sa
                        gx[n, c0, h, cb], gx[n, c1, h, cb] = b0 - z0 * sb, b1 - z1 * sb
                        gx[n, c2, h, cb], gx[n, c3, h, cb] = b2 - z2 * sb, b3 - z3 * sb


def _grad_input_cols(x, keys, rows, gsum, gx, kh, kw, pad_h, pad_w, shift):
    """Template of ``_grad_input_cols_kernel``. Stride 1: gx as ``_grad_input_kernel``,
    vectorised along image columns (``_clamp_fma_block``: no horizontal sums). ``rows``
    (N, O, H + kh - 1, rowlen): the output gradient, zero-padded so that input row h, tap
    (i, j), column w reads
    ``rows[n, o, h + kh - 1 - i, w - j + kw - 1]``; ``keys`` (C/CH, kh, O, kw, CH): the
    integer keys of W + shift (``_clamp_shift``); ``gsum``: the output gradient summed over
    its channels (N, Ho, Wo).
    """
    n_batch, channels, height, width = x.shape
    n_out, rowlen = rows.shape[1], rows.shape[3]
    out_h, out_w = gsum.shape[1], gsum.shape[2]
    n_ch, n_vec = _COL_BLOCK
    lanes = VECTOR_BYTES // x.itemsize
    cols = n_vec * lanes
    padded = rowlen - kw + 1  # the width rounded up to whole vectors
    kflat, rflat, xflat, gflat = keys.reshape(-1), rows.reshape(-1), x.reshape(-1), gx.reshape(-1)
    plane, cstride = rows.shape[2] * rowlen, height * width
    steps = np.empty(kh * n_out * kw, np.int64)  # offset of step (i, o, j) from (o, i, j) = 0
    for i in range(kh):
        for o in range(n_out):
            for j in range(kw):
                steps[(i * n_out + o) * kw + j] = o * plane - i * rowlen - j
    for job in prange(n_batch * height):
        _wide_vectors()
        n = job // height
        h = job - n * height
        if h + 1 < height:  # the next row's new data: its newest gradient row, its input row
            line = 64 // x.itemsize
            for o in range(n_out):
                prefetch(rflat, (n * n_out + o) * plane + (h + kh) * rowlen, -(-rowlen // line), line)
            for c in range(channels):
                prefetch(xflat, ((n * channels + c) * height + h + 1) * width, -(-width // line), line)
        sums = np.zeros(padded, gx.dtype)  # the output gradient summed over each pixel's taps
        for i in range(kh):
            ho = h + pad_h - i
            if 0 <= ho < out_h:
                for j in range(kw):
                    src = gsum[n, ho]
                    for w in range(max(0, j - pad_w), min(width, out_w + j - pad_w)):
                        sums[w] += src[w + pad_w - j]
        base = n * n_out * plane + (h + kh - 1) * rowlen + kw - 1
        for w0 in range(0, padded, cols):  # a column block's gradient rows stay in L1
            for c0 in range(0, channels, n_ch):
                kat, xat = (c0 // n_ch) * steps.size * n_ch, ((n * channels + c0) * height + h) * width + w0
                nch, ncols = min(n_ch, channels - c0), width - w0
                if w0 + cols <= padded:
                    _clamp_fma_block(rflat, base + w0, steps, kflat, kat, xflat, xat, cstride, nch, ncols,
                                     shift, sums[w0:], gflat)
                else:
                    _clamp_fma_tail(rflat, base + w0, steps, kflat, kat, xflat, xat, cstride, nch, ncols,
                                    shift, sums[w0:], gflat)


_TAG = source_tag("cpu_ir.py")
_forward_cols_kernel = compile_template(_forward_cols, f"_forward_cols_{_TAG}", {}, True, _FASTMATH)
_grad_input_cols_kernel = compile_template(_grad_input_cols, f"_grad_input_cols_{_TAG}", {}, True, _FASTMATH)


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
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    y = x.new_empty(n, o, ho, wo)
    unit = np.ones(1, _np(x).dtype)
    work = y.numel() * weight[0].numel()
    if tuple(stride) == (1, 1):
        lanes = VECTOR_BYTES // x.element_size()
        rowlen = -(-wo // lanes) * lanes + kw - 1
        xp = torch.nn.functional.pad(x, (padding[1], rowlen - w - padding[1], padding[0], padding[0]))
        n_o = _FWD_BLOCK[0]
        wk = torch.nn.functional.pad(weight.permute(1, 2, 3, 0), (0, -o % n_o))
        wk = wk.reshape(c, kh, kw, -1, n_o).permute(3, 0, 1, 2, 4).contiguous()
        _launch(_forward_cols_kernel, work, _np(xp), _np(wk), unit, _np(y), kh, kw)
        return y
    _launch(_forward_kernel, work, _np(_padded_nhwc(x, padding)), _np(weight.permute(0, 3, 2, 1).contiguous()),
            _np(y), kh, stride[0], stride[1], unit)
    return y


def grad_input(x, weight, grad_out, stride, padding):
    """gX = sum g * HardTanh(W - X) over every (output pixel, tap) that reads X."""
    n = x.shape[0]
    kh, kw = weight.shape[2:]
    o, ho, wo = grad_out.shape[1:]
    gx = torch.empty_like(x)
    work = grad_out.numel() * weight[0].numel()
    shift = _clamp_shift(x, weight)
    if tuple(stride) == (1, 1) and shift is not None:
        g = grad_out.contiguous()
        lanes = VECTOR_BYTES // x.element_size()
        left, top = kw - 1 - padding[1], kh - 1 - padding[0]
        rowlen = -(-x.shape[3] // lanes) * lanes + kw - 1
        rows = torch.nn.functional.pad(g, (left, rowlen - left - wo, top, x.shape[2] + kh - 1 - top - ho))
        _launch(_grad_input_cols_kernel, work, _np(x), _np(_int_keys(_column_weights(weight), shift)),
                _np(rows), _np(g.sum(1)), _np(gx), kh, kw, padding[0], padding[1], _np(x).dtype.type(shift))
        return gx
    gt = x.new_empty(n, ho, wo, o)
    _launch(_channels_last_kernel, gt.numel() * _COPY_COST, _np(grad_out.contiguous()), _np(gt))
    wf = _phase_weights(weight, stride)
    keys, shift = (wf, 0.0) if shift is None else (_int_keys(wf, shift), shift)
    _launch(_grad_input_kernel, work, _np(x), _np(keys), _np(gt), _np(gx), kh, kw, stride[0], stride[1],
            padding[0], padding[1], _np(x).dtype.type(shift))
    return gx


def _clamp_shift(x, weight):
    """The shift >= 2 - min(x) (None for NaN weights, which integer keys would lose) that makes
    every clamp bound x + shift -/+ 1 >= 1: then the weights + shift, viewed as integers
    (``_int_keys``), clamp exactly as floats, a weight < 0 against a bound > 0 included.
    NaN and infinite x are left out of the minimum (their outputs are NaN, as with floats)."""
    if torch.isnan(weight).any():
        return None
    low = x.min()
    if not torch.isfinite(low):
        finite = x[torch.isfinite(x)]
        low = finite.min() if finite.numel() else low.new_zeros(())
    return max(0.0, 2.0 - float(low))


def _int_keys(w, shift):
    return (w + shift).view(torch.int64 if w.dtype == torch.float64 else torch.int32)


def _column_weights(weight):
    """(C/CH, kh, O, kw, CH), channels padded to a multiple of CH: the layout of
    ``_grad_input_cols_kernel``."""
    o, c, kh, kw = weight.shape
    n_ch = _COL_BLOCK[0]
    w = torch.nn.functional.pad(weight.permute(2, 0, 3, 1), (0, -c % n_ch))
    return w.reshape(kh, o, kw, -1, n_ch).permute(3, 0, 1, 2, 4).contiguous()
