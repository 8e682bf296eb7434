"""Numba CPU kernels for the adder operator (DESIGN.md section 1).

Both kernels are reductions over contiguous runs of memory, which LLVM vectorises with
the accumulators in registers; nothing of size output x C*kh*kw is ever built (extra
memory: one NHWC copy of the input or of the output gradient, and the weights).

* ``forward``: the input is copied into a zero-padded NHWC buffer and the weight into
  (O, kh, kw, C), so for one kernel row the patch of an output pixel and the filter are
  both contiguous runs of kw*C values. Register block: 2 output pixels x 4 output
  channels (8 accumulators, 6 loads per 8 adder ops). Threads share out (image, output
  row) pairs.
* ``grad_input``: every input pixel gathers its own gradient from the output pixels that
  see it (no scatter, no races). With the output gradient in NHWC and the weight taps of
  each column phase (``(w + pad) % stride``) stored in reverse order, the taps of one
  kernel row form one contiguous run of (taps x O) values. Register block: 2 input
  columns with the same taps x 4 input channels. Threads share out (image, input row) pairs.

Blocks at the right/bottom edge are clamped to the last valid index, so odd sizes
recompute a few values instead of needing remainder loops. fastmath allows reassociation
and contraction only: never ``nnan``/``ninf``, so NaN in gives NaN out. The weight
gradient is left to the convolution identity (``function.grad_weight_conv``), which is
exact and runs at matmul speed.
"""

import threading

import numba
import torch
from numba import njit, prange

_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_PARALLEL_WORK = 1 << 22  # adder ops below which one thread beats waking the pool
_LAUNCH_LOCK = threading.Lock()


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_kernel(xp, w, y, stride_h, stride_w):
    """y[n,o,ho,wo] = -sum_{i,j,c} |xp[n, ho*sh+i, wo*sw+j, c] - w[o,i,j,c]|.

    xp: zero-padded input (N, Hp, Wp, C); w: (O, kh, kw, C); y: (N, O, Ho, Wo), written.
    """
    n_batch, hp, wp, channels = xp.shape
    n_out, kh, kw, _ = w.shape
    out_h, out_w = y.shape[2], y.shape[3]
    seg = kw * channels
    rows = xp.reshape(n_batch, hp, wp * channels)
    filt = w.reshape(n_out, kh, seg)
    step = stride_w * channels
    for job in prange(n_batch * out_h):
        n = job // out_h
        ho = job - n * out_h
        for o0 in range(0, n_out, 4):
            q0, q1 = o0, min(o0 + 1, n_out - 1)
            q2, q3 = min(o0 + 2, n_out - 1), min(o0 + 3, n_out - 1)
            for wo0 in range(0, out_w, 2):
                wo1 = min(wo0 + 1, out_w - 1)
                a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = y.dtype.type(0)
                for i in range(kh):
                    row = rows[n, ho * stride_h + i]
                    xa = row[wo0 * step:wo0 * step + seg]
                    xb = row[wo1 * step:wo1 * step + seg]
                    w0, w1, w2, w3 = filt[q0, i], filt[q1, i], filt[q2, i], filt[q3, i]
                    for t in range(seg):
                        u, v = xa[t], xb[t]
                        a00 += abs(u - w0[t])
                        a01 += abs(u - w1[t])
                        a02 += abs(u - w2[t])
                        a03 += abs(u - w3[t])
                        a10 += abs(v - w0[t])
                        a11 += abs(v - w1[t])
                        a12 += abs(v - w2[t])
                        a13 += abs(v - w3[t])
                y[n, q0, ho, wo0], y[n, q1, ho, wo0] = -a00, -a01
                y[n, q2, ho, wo0], y[n, q3, ho, wo0] = -a02, -a03
                y[n, q0, ho, wo1], y[n, q1, ho, wo1] = -a10, -a11
                y[n, q2, ho, wo1], y[n, q3, ho, wo1] = -a12, -a13


@njit(cache=True)
def _nhwc_kernel(x, out, pad_h, pad_w):
    """out[n, h + pad_h, w + pad_w, c] = x[n, c, h, w], zero on the border (torch's permuted
    copy is several times slower)."""
    n_batch, channels, height, width = x.shape
    rows = out.shape[1]
    for job in range(n_batch * rows):
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


@njit(inline="always", fastmath=_FASTMATH)
def _hardtanh(d, one):
    """clamp(d, -1, 1), keeping NaN."""
    d = one if d > one else d
    return -one if d < -one else d


@njit(inline="always")
def _taps(pos, pad, stride, k, out):
    """Kernel taps seeing input index ``pos``: tap ``r + stride*m`` reads it for output index
    ``base - m``; returns (r, base, m_lo, m_hi), the valid m (m_hi < m_lo: none)."""
    r, base = (pos + pad) % stride, (pos + pad) // stride
    m_hi = min(base, (k - 1 - r) // stride) if r < k else -1
    return r, base, max(0, base - out + 1), m_hi


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _grad_input_kernel(x, wf, g, gx, kh, kw, stride_h, stride_w, pad_h, pad_w):
    """gx[n,c,h,w] = sum over taps (i,j) seeing (h,w) of sum_o g[n,ho,wo,o] * HT(W[o,c,i,j] - x[n,c,h,w]).

    x, gx: (N, C, H, W); g: output gradient in NHWC (N, Ho, Wo, O); wf: (sw, kh, C, M*O)
    with wf[r, i, c, (M-1-m)*O + o] = W[o, c, i, r + sw*m], M = ceil(kw / sw).
    Register block: 2 input columns of the same phase (same taps) x 4 channels.
    """
    n_batch, channels, height, width = x.shape
    _, out_h, out_w, n_out = g.shape
    taps = wf.shape[3] // n_out
    grows = g.reshape(n_batch, out_h, out_w * n_out)
    one = gx.dtype.type(1)
    for job in prange(n_batch * height):
        n = job // height
        h = job - n * height
        rh, bh, mi_lo, mi_hi = _taps(h, pad_h, stride_h, kh, out_h)
        for col0 in range(0, width, 2 * stride_w):
            for col_a in range(col0, min(col0 + stride_w, width)):
                col_b = col_a + stride_w if col_a + stride_w < width else col_a
                _, _, lo_a, hi_a = _taps(col_a, pad_w, stride_w, kw, out_w)
                _, _, lo_b, hi_b = _taps(col_b, pad_w, stride_w, kw, out_w)
                same = lo_a == lo_b and hi_a == hi_b
                for half in range(1 if same else 2):  # columns with different taps go one by one
                    ca = col_b if half == 1 else col_a
                    cb = col_a if not same and half == 0 else col_b
                    r, ba, lo, hi = _taps(ca, pad_w, stride_w, kw, out_w)
                    bb = (cb + pad_w) // stride_w
                    length = (hi - lo + 1) * n_out
                    ga, gb = (ba - hi) * n_out, (bb - hi) * n_out
                    ws = (taps - 1 - hi) * n_out
                    for c0 in range(0, channels, 4):
                        c1, c2, c3 = min(c0 + 1, channels - 1), min(c0 + 2, channels - 1), min(c0 + 3, channels - 1)
                        x0, x1, x2, x3 = x[n, c0, h, ca], x[n, c1, h, ca], x[n, c2, h, ca], x[n, c3, h, ca]
                        z0, z1, z2, z3 = x[n, c0, h, cb], x[n, c1, h, cb], x[n, c2, h, cb], x[n, c3, h, cb]
                        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = gx.dtype.type(0)
                        for mi in range(mi_lo, mi_hi + 1 if length > 0 else mi_lo):
                            i = rh + stride_h * mi
                            row = grows[n, bh - mi]
                            gsa, gsb = row[ga:ga + length], row[gb:gb + length]
                            w0, w1 = wf[r, i, c0, ws:ws + length], wf[r, i, c1, ws:ws + length]
                            w2, w3 = wf[r, i, c2, ws:ws + length], wf[r, i, c3, ws:ws + length]
                            for t in range(length):
                                u, v = gsa[t], gsb[t]
                                e0, e1, e2, e3 = w0[t], w1[t], w2[t], w3[t]
                                a0 += u * _hardtanh(e0 - x0, one)
                                a1 += u * _hardtanh(e1 - x1, one)
                                a2 += u * _hardtanh(e2 - x2, one)
                                a3 += u * _hardtanh(e3 - x3, one)
                                b0 += v * _hardtanh(e0 - z0, one)
                                b1 += v * _hardtanh(e1 - z1, one)
                                b2 += v * _hardtanh(e2 - z2, one)
                                b3 += v * _hardtanh(e3 - z3, one)
                        gx[n, c0, h, ca], gx[n, c1, h, ca], gx[n, c2, h, ca], gx[n, c3, h, ca] = a0, a1, a2, a3
                        gx[n, c0, h, cb], gx[n, c1, h, cb], gx[n, c2, h, cb], gx[n, c3, h, cb] = b0, b1, b2, b3


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
    _nhwc_kernel(_np(x), _np(out), ph, pw)
    return out


def _phase_weights(weight, stride_w):
    """(sw, kh, C, M*O): the taps of each column phase, newest output column first."""
    o, c, kh, kw = weight.shape
    taps = -(-kw // stride_w)
    wf = weight.new_zeros(stride_w, kh, c, taps, o)
    for j in range(kw):
        r, m = j % stride_w, j // stride_w
        wf[r, :, :, taps - 1 - m] = weight[:, :, :, j].permute(2, 1, 0)
    return wf.reshape(stride_w, kh, c, taps * o)


def forward(x, weight, stride, padding):
    """Y = -sum |Xpad - W| for contiguous NCHW ``x`` and (O, C, kh, kw) ``weight``."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    y = x.new_empty(n, o, ho, wo)
    _launch(_forward_kernel, y.numel() * weight[0].numel(), _np(_padded_nhwc(x, padding)),
            _np(weight.permute(0, 2, 3, 1).contiguous()), _np(y), stride[0], stride[1])
    return y


def grad_input(x, weight, grad_out, stride, padding):
    """gX = sum g * HardTanh(W - X) over every (output pixel, tap) that reads X."""
    kh, kw = weight.shape[2:]
    gx = torch.empty_like(x)
    _launch(_grad_input_kernel, grad_out.numel() * weight[0].numel(), _np(x),
            _np(_phase_weights(weight, stride[1])), _np(_padded_nhwc(grad_out, (0, 0))), _np(gx),
            kh, kw, stride[0], stride[1], padding[0], padding[1])
    return gx
