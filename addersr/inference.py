"""Upscaling images with a model: exact tiled inference and image-format handling.

Tiling: the LR image is cut into ``tile x tile`` cores; each core is run with ``overlap``
LR pixels of context on every side (clipped at the image border), and only the core's
part of the output is kept. With ``overlap >= receptive_radius(model)`` (the default)
every output pixel sees exactly the context it sees in a whole-image run, so tiled and
untiled outputs agree up to floating-point summation order. Inference runs in eval mode
(BatchNorm uses its frozen statistics); a model in training mode is switched for the
call and switched back.
"""

import math

import numpy as np
import torch
from PIL import Image

from .data.imresize import imresize
from .models.trace import eval_mode, receptive_radius, trace

# Upper bound on the activations of one tile (bytes) when the tile size is automatic.
TILE_BUDGET_BYTES = 2 * 2**30
# Smallest tile a user may ask for (LR pixels). Each tile is run with the model's receptive
# radius of context on every side (8 to 69 LR pixels for the registry's networks): below
# this, the context would cost many times the tile itself.
MIN_TILE = 64
# Tensors of the largest activation's size alive at the peak of a forward pass: measured
# (peak resident memory on the CPU) up to 7 for the adder VDSR, 4 for the adder EDSR-baseline.
_LIVE_TENSORS = 8


def _report(progress, done, total):
    if progress is None:
        return
    if hasattr(progress, "update"):
        if getattr(progress, "total", None) is None:
            progress.total = total
        progress.update(1)
    else:
        progress(done, total)


def _pair(tile):
    pair = (tile, tile) if isinstance(tile, int) else tuple(tile) if isinstance(tile, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in pair):
        raise ValueError(f"tile must be a positive int or a pair of them, got {tile!r}")
    return pair


def _scale(model):
    scale = getattr(model, "scale", None)
    if not isinstance(scale, int):
        raise ValueError("the model needs an integer .scale (build it with addersr.models.build)")
    return scale


def _tiles(model, size, crop, tile, overlap, progress):
    """Yield ``((Y0, Y1, X0, X1), sr_core)`` for each tile, in HR pixel coordinates.

    ``size``: the LR ``(h, w)``; ``crop(a0, a1, b0, b1)``: the model's input for LR rows
    ``a0:a1`` and columns ``b0:b1`` (a core and its context), made only when needed.
    """
    s = _scale(model)
    th, tw = _pair(tile)
    h, w = size
    grid = [(y, min(y + th, h), x, min(x + tw, w)) for y in range(0, h, th) for x in range(0, w, tw)]
    if overlap is None:
        overlap = receptive_radius(model) if len(grid) > 1 else 0
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be a non-negative int, got {overlap!r}")
    for i, (y0, y1, x0, x1) in enumerate(grid):
        a0, a1 = max(0, y0 - overlap), min(h, y1 + overlap)
        b0, b1 = max(0, x0 - overlap), min(w, x1 + overlap)
        sr = model(crop(a0, a1, b0, b1))
        core = sr[..., (y0 - a0) * s:(y1 - a0) * s, (x0 - b0) * s:(x1 - b0) * s]
        yield (y0 * s, y1 * s, x0 * s, x1 * s), core
        _report(progress, i + 1, len(grid))


def check_tile(tile):
    """Refuse a tile size asked for by a user unless it is None, 0 or at least MIN_TILE.

    (What 0 means is up to the tool.) Raises ValueError with a one-line message.
    """
    if tile is not None and tile != 0 and not (isinstance(tile, int) and tile >= MIN_TILE):
        raise ValueError(f"tiles must be at least {MIN_TILE} pixels (smaller ones spend most "
                         f"of their time on the context around them), got {tile}")


def _check_batch(lr):
    if not isinstance(lr, torch.Tensor) or lr.dim() != 4:
        shape = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
        raise ValueError(f"expected an LR batch tensor (N, C, h, w), got {shape}")


def forward_tiled(model, lr, tile, overlap=None, progress=None):
    """``model(lr)`` computed tile by tile; equal to the whole-image output.

    ``lr``: (N, C, h, w) tensor on the model's device. ``tile``: core size in LR pixels
    (an int or ``(th, tw)``). ``overlap``: LR pixels of context per side, default
    :func:`~addersr.models.receptive_radius` (smaller values are allowed but no longer
    exact). ``progress``: ``callable(done, total)`` or a tqdm-like object (``update(1)``
    per tile; its ``total`` is set when None). Runs under ``torch.no_grad`` in eval mode.
    """
    _check_batch(lr)
    s = _scale(model)
    out = None
    with torch.no_grad(), eval_mode(model):
        tiles = _tiles(model, lr.shape[-2:], lambda a0, a1, b0, b1: lr[..., a0:a1, b0:b1],
                       tile, overlap, progress)
        for (y0, y1, x0, x1), core in tiles:
            if out is None:
                out = core.new_empty(*core.shape[:-2], lr.shape[-2] * s, lr.shape[-1] * s)
            out[..., y0:y1, x0:x1] = core
    return out


def auto_tile(model, lr_size, overlap=None, budget=None):
    """The LR tile size :func:`upscale` uses for an image of ``lr_size=(h, w)``.

    None when the whole image fits ``budget`` bytes of activations; else the largest
    multiple of 16 whose padded tile fits (at least MIN_TILE); ``budget`` defaults to
    ``TILE_BUDGET_BYTES`` (2 GiB). The estimate is the largest
    activation of the model per LR pixel (from a run on a 4 x 4 input) times the padded
    tile's pixels, float32, times the tensors alive at the peak.
    """
    probe = 4
    largest = max(out.numel() for *_, out in trace(model, (probe, probe), meta=False)
                  if isinstance(out, torch.Tensor))
    bytes_per_pixel = largest / probe**2 * 4 * _LIVE_TENSORS
    budget = TILE_BUDGET_BYTES if budget is None else budget
    h, w = lr_size
    if h * w * bytes_per_pixel <= budget:
        return None
    if overlap is None:
        overlap = receptive_radius(model)
    side = math.isqrt(int(budget / bytes_per_pixel)) - 2 * overlap
    return max(MIN_TILE, side // 16 * 16)


# ----------------------------------------------------------------------------- images

_CONVERT_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
# LR pixels of context for enlarging an alpha channel tile by tile: MATLAB's bicubic
# kernel reaches 2 input pixels from an output pixel's centre, so the result is exact.
_ALPHA_MARGIN = 4


def _from_pil(image):
    """(array, description) for a PIL image; the array is what :func:`_from_numpy` takes."""
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode in _CONVERT_TO_RGB:
        image = image.convert("RGB")
    mode = image.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        return np.asarray(image), mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), "I;16"
    if mode == "I":
        return np.asarray(image).clip(0, 65535).astype(np.uint16), "I"
    raise ValueError(f"unsupported PIL image mode {image.mode!r}; convert it to RGB, L or I;16 first")


def _to_pil(array, mode):
    if mode == "I":
        array = array.astype(np.int32)
    image = Image.fromarray(array)
    return image


def _max_value(dtype):
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ValueError(f"unsupported image dtype {dtype}; expected uint8, uint16 or float in [0, 1]")


def upscale(image, model, tile=None, overlap=None, progress=None, device=None):
    """Upscale a PIL image or a numpy array by ``model.scale``; returns the same kind.

    * RGB goes through the model. Grayscale (PIL ``L``, numpy HxW or HxWx1) is replicated
      to RGB and the output's channel mean returned in the input's layout.
    * An alpha channel (PIL ``RGBA`` / ``LA``, numpy HxWx4 / HxWx2) is enlarged with MATLAB
      bicubic, not the model.
    * 16-bit input (PIL ``I;16`` / ``I``, numpy uint16) keeps its precision: it is scaled
      to [0, 1] floats and back to 16 bits. numpy float input is taken as [0, 1] and
      returned as the same float dtype, clamped to [0, 1] but not rounded.
    * Palette images become RGB (RGBA when they have transparency); ``1`` becomes ``L``;
      CMYK, YCbCr, LAB and HSV become RGB.
    * Integer outputs are clamped and rounded half up.

    ``tile`` (LR pixels) and ``overlap`` as in :func:`forward_tiled`; ``tile=None`` picks
    :func:`auto_tile` (whole image when it fits in ``TILE_BUDGET_BYTES`` of activations).
    ``device``: where to run (the model is moved there); default the model's device.
    ``progress``: ``callable(done, total)`` or tqdm-like, once per tile.
    """
    if isinstance(image, Image.Image):
        array, mode = _from_pil(image)
        return _to_pil(_upscale_array(array, model, tile, overlap, progress, device), mode)
    if isinstance(image, np.ndarray):
        return _upscale_array(image, model, tile, overlap, progress, device)
    raise ValueError(f"upscale expects a PIL image or a numpy array, got {type(image).__name__}")


def _upscale_array(array, model, tile, overlap, progress, device):
    """The work of :func:`upscale` on an array; only one tile at a time is in floating point."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f"expected an HxW, HxWx1, HxWx2, HxWx3 or HxWx4 image, got shape {array.shape}")
    if min(array.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {array.shape}")
    maxv = _max_value(array.dtype)
    s = _scale(model)
    if device is not None:
        model.to(device)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    image = array.reshape(h, w, channels)
    colors = 3 if channels >= 3 else 1
    work = np.float64 if dtype == torch.float64 else np.float32

    def crop(a0, a1, b0, b1):  # an LR region, as the model's RGB input in [0, 1]
        region = np.array(image[a0:a1, b0:b1, :colors], dtype=work)
        x = torch.from_numpy(region).to(device=device, dtype=dtype).div_(maxv).permute(2, 0, 1)
        return x[None].expand(-1, 3, -1, -1) if colors == 1 else x[None]

    def quantise(values):  # a float tensor, clamped to [0, 1] and rounded in place -> numpy
        values = values.clamp_(0, 1)
        if maxv != 1.0:
            values = values.mul_(maxv).add_(0.5).floor_()
        return values.cpu().numpy()

    out = np.empty((h * s, w * s, channels), dtype=array.dtype)
    if tile is None:
        tile = auto_tile(model, (h, w), overlap) or (h, w)
    with torch.no_grad(), eval_mode(model):
        for (y0, y1, x0, x1), core in _tiles(model, (h, w), crop, tile, overlap, progress):
            if colors == 1:
                core = core.mean(1, keepdim=True)
            out[y0:y1, x0:x1, :colors] = quantise(core[0].permute(1, 2, 0))
            if channels in (2, 4):  # alpha: MATLAB bicubic on the same core plus a margin
                a0, a1, b0, b1 = y0 // s, y1 // s, x0 // s, x1 // s
                m0, m1 = max(0, a0 - _ALPHA_MARGIN), min(h, a1 + _ALPHA_MARGIN)
                n0, n1 = max(0, b0 - _ALPHA_MARGIN), min(w, b1 + _ALPHA_MARGIN)
                alpha = imresize(image[m0:m1, n0:n1, -1].astype(np.float64) / maxv, s)
                out[y0:y1, x0:x1, -1] = quantise(torch.from_numpy(
                    alpha[(a0 - m0) * s:(a1 - m0) * s, (b0 - n0) * s:(b1 - n0) * s]))
    return out.reshape(h * s, w * s) if array.ndim == 2 else out
