"""Plain PyTorch reference for the adder operator (DESIGN.md section 1).

Written for clarity, not speed: patches are unfolded and the L1 distance is taken
directly. Work is split into chunks of output pixels so the temporary
(N, O, C*kh*kw, chunk) tensor stays under ``_CHUNK_ELEMENTS`` elements. Every function
takes ``stride`` and ``padding`` as (h, w) pairs and returns a new tensor.
"""

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 24


def _out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _chunks(n, o, ck, length):
    step = max(1, _CHUNK_ELEMENTS // max(1, n * o * ck))
    for start in range(0, length, step):
        yield slice(start, min(length, start + step))


def forward(x, weight, stride, padding):
    """Y[n,o,p] = -sum_k |Xcol[n,k,p] - W[o,k]|."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = _out_size(h, kh, stride[0], padding[0]), _out_size(w, kw, stride[1], padding[1])
    xcol = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (N, K, L)
    wcol = weight.reshape(o, -1)
    y = x.new_empty(n, o, xcol.shape[-1])
    for sl in _chunks(n, o, wcol.shape[1], xcol.shape[-1]):
        diff = xcol[:, None, :, sl] - wcol[None, :, :, None]  # (N, O, K, l)
        y[..., sl] = -diff.abs().sum(2)
    return y.reshape(n, o, ho, wo)


def grad_input(x, weight, grad_out, stride, padding):
    """gX = fold(sum_o g[n,o,p] * HardTanh(W[o,k] - Xcol[n,k,p]))."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xcol = F.unfold(x, (kh, kw), padding=padding, stride=stride)
    wcol = weight.reshape(o, -1)
    g = grad_out.reshape(n, o, -1)
    gcol = torch.empty_like(xcol)
    for sl in _chunks(n, o, wcol.shape[1], xcol.shape[-1]):
        ht = (wcol[None, :, :, None] - xcol[:, None, :, sl]).clamp(-1, 1)  # (N, O, K, l)
        gcol[..., sl] = (g[:, :, None, sl] * ht).sum(1)
    return F.fold(gcol, (h, w), (kh, kw), padding=padding, stride=stride)


def grad_weight(x, weight, grad_out, stride, padding):
    """gW[o,k] = sum_{n,p} g[n,o,p] * (Xcol[n,k,p] - W[o,k]) (full precision, not the sign)."""
    n = x.shape[0]
    o = weight.shape[0]
    xcol = F.unfold(x, weight.shape[2:], padding=padding, stride=stride)
    wcol = weight.reshape(o, -1)
    g = grad_out.reshape(n, o, -1)
    gw = torch.zeros_like(wcol)
    for sl in _chunks(n, o, wcol.shape[1], xcol.shape[-1]):
        diff = xcol[:, None, :, sl] - wcol[None, :, :, None]  # (N, O, K, l)
        gw += (g[:, :, None, sl] * diff).sum((0, 3))
    return gw.reshape(weight.shape)
