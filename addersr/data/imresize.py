"""MATLAB ``imresize(img, scale, 'bicubic')``, bit-exact for uint8 images.

The kernel is Keys' cubic with a = -0.5. When shrinking by s < 1 it is stretched to
``h(x) = s * cubic(s * x)`` (antialiasing, width 4 / s). Output pixel x = 1..n_out sits at
``u = x / s + 0.5 * (1 - 1 / s)`` in input coordinates and uses ``ceil(width) + 2`` taps
starting at ``floor(u - width / 2)``; weights are normalised to sum 1 and taps outside the
image are clamped to the edge pixel. Height is resized first, then width (for an explicit
output size: the axis with the smaller scale first, as MATLAB does). uint8 images are
computed in float64 and rounded half away from zero and clipped to [0, 255] after each pass.

Each pass accumulates the few taps of every output pixel in MATLAB's order: a compiled
(numba) loop for numpy images, and for torch tensors one vectorised gather and
multiply-add per tap over the whole batch (any device, autograd kept).
"""

import math
from numbers import Real

import numpy as np
import torch
from numba import njit

__all__ = ["imresize", "resize_weights"]


def _cubic(x):
    """Keys' cubic convolution kernel with a = -0.5 (float64 numpy)."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def resize_weights(in_length, out_length, scale):
    """Taps of one axis: ``(weights, indices)``, both ``(out_length, P)``.

    ``indices`` are 0-based and already clamped to the image; output pixel i is
    ``sum_p weights[i, p] * input[indices[i, p]]``. Tap columns whose weight is zero for
    every output pixel are dropped (MATLAB does the same; it does not change the result).
    """
    width = 4.0
    if scale < 1:
        width = width / scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    distance = u[:, None] - indices
    if scale < 1:
        weights = scale * _cubic(scale * distance)
    else:
        weights = _cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    indices = np.clip(indices, 1, in_length).astype(np.int64) - 1
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def _output_size(shape_hw, scale, output_size):
    if (scale is None) == (output_size is None):
        raise ValueError("imresize: give exactly one of scale and output_size")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise ValueError(f"imresize: scale must be a number, got {scale!r}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"imresize: scale must be a positive finite number, got {scale}")
        size = tuple(int(math.ceil(scale * n)) for n in shape_hw)
        return size, (scale, scale)
    try:
        size = tuple(int(n) for n in output_size)
    except TypeError:
        raise ValueError(f"imresize: output_size must be (height, width), got {output_size!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"imresize: output_size must be two positive ints, got {output_size!r}")
    return size, (size[0] / shape_hw[0], size[1] / shape_hw[1])


@njit(cache=True, nogil=True)
def _resize_rows(x, indices, weights, round_uint8):
    """``out[a, i, b] = sum_p weights[i, p] * x[a, indices[i, p], b]`` for ``x`` (A, n, B)."""
    n_out, taps = weights.shape
    out = np.zeros((x.shape[0], n_out, x.shape[2]))
    for a in range(x.shape[0]):
        for i in range(n_out):
            for p in range(taps):
                w = weights[i, p]
                src = indices[i, p]
                for b in range(x.shape[2]):
                    out[a, i, b] += w * x[a, src, b]
            if round_uint8:
                for b in range(x.shape[2]):
                    out[a, i, b] = min(max(np.floor(out[a, i, b] + 0.5), 0.0), 255.0)
    return out


def _resize_axis(x, dim, out_length, scale, round_uint8):
    """Resize ``x`` (float64 numpy HxW[xC], or a torch tensor) along ``dim``."""
    weights, indices = resize_weights(x.shape[dim], out_length, scale)
    if isinstance(x, np.ndarray):
        lead = int(np.prod(x.shape[:dim]))
        x3 = x.reshape(lead, x.shape[dim], -1)
        out = _resize_rows(x3, indices, weights, round_uint8)
        return out.reshape(x.shape[:dim] + (out_length,) + x.shape[dim + 1:])
    shape = [1] * x.dim()
    shape[dim] = out_length
    w = torch.from_numpy(weights).to(device=x.device, dtype=x.dtype)
    idx = torch.from_numpy(indices).to(device=x.device)
    out = None
    for p in range(w.shape[1]):
        term = x.index_select(dim, idx[:, p]) * w[:, p].reshape(shape)
        out = term if out is None else out + term
    return out


def _resize(x, dims, in_hw, scale, output_size, round_uint8):
    size, scales = _output_size(in_hw, scale, output_size)
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    for axis in order:
        if size[axis] != x.shape[dims[axis]] or scales[axis] != 1:
            x = _resize_axis(x, dims[axis], size[axis], scales[axis], round_uint8)
    return x


def imresize(img, scale=None, output_size=None):
    """Resize like MATLAB ``imresize(img, scale, 'bicubic')``.

    ``img``: numpy uint8 ``HxW`` / ``HxWxC`` (uint8 out, bit-exact MATLAB), a float numpy
    array of the same layouts (float64 out, not rounded) or a float torch tensor
    ``(..., H, W)`` on any device (same dtype and device out, not rounded, batched).
    ``scale`` > 1 enlarges, < 1 shrinks (e.g. ``1 / 4``); the output size is
    ``ceil(scale * size)``. Alternatively ``output_size=(height, width)``.
    """
    if isinstance(img, torch.Tensor):
        if not img.is_floating_point():
            raise ValueError(f"imresize: torch tensors must be floating point, got {img.dtype}")
        if img.dim() < 2 or min(img.shape[-2:]) < 1:
            raise ValueError(f"imresize: expected a (..., H, W) tensor, got shape {tuple(img.shape)}")
        return _resize(img, (img.dim() - 2, img.dim() - 1), tuple(img.shape[-2:]), scale,
                       output_size, round_uint8=False)
    if not isinstance(img, np.ndarray):
        raise ValueError(f"imresize: expected a numpy array or torch tensor, got {type(img).__name__}")
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"imresize: expected an HxW or HxWxC image, got shape {img.shape}")
    if img.dtype == np.uint8:
        round_uint8 = True
    elif np.issubdtype(img.dtype, np.floating):
        round_uint8 = False
    else:
        raise ValueError(f"imresize: numpy images must be uint8 or float, got {img.dtype}")
    x = np.ascontiguousarray(img, dtype=np.float64)
    out = _resize(x, (0, 1), img.shape[:2], scale, output_size, round_uint8)
    return out.astype(np.uint8) if round_uint8 else out
