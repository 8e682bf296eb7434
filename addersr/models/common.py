"""Pieces shared by the architectures: mean shift, upsampler, bicubic resize, YCbCr.

Modules here that do arithmetic outside their sub-modules describe it in
``own_ops(inputs, output) -> dict`` (keys ``mults``, ``adds``), read by
:func:`addersr.energy.count_ops`.
"""

import torch
from torch import nn

from ..data.imresize import imresize, resize_weights

SCALES = (2, 3, 4)
OPS = ("adder", "conv")

# MATLAB rgb2ycbcr for images in [0, 1]: ycbcr = (_OFFSET + _RGB2YCBCR @ rgb) / 255.
_RGB2YCBCR = ((65.481, 128.553, 24.966),
              (-37.797, -74.203, 112.0),
              (112.0, -93.786, -18.214))
_OFFSET = (16.0, 128.0, 128.0)


def rgb_to_ycbcr(x):
    """MATLAB ``rgb2ycbcr`` of an RGB batch (N, 3, H, W) in [0, 1]: YCbCr in [0, 1]."""
    m = x.new_tensor(_RGB2YCBCR) / 255
    off = x.new_tensor(_OFFSET).reshape(1, 3, 1, 1) / 255
    return torch.einsum("ij,njhw->nihw", m, x) + off


def ycbcr_to_rgb(x):
    """Inverse of :func:`rgb_to_ycbcr` (MATLAB ``ycbcr2rgb``), unclamped."""
    m_inv = torch.linalg.inv(torch.tensor(_RGB2YCBCR, dtype=torch.float64) / 255).to(x)
    off = x.new_tensor(_OFFSET).reshape(1, 3, 1, 1) / 255
    return torch.einsum("ij,njhw->nihw", m_inv, x - off)


class MeanShift(nn.Module):
    """Subtract (``sign=-1``) or add (``sign=+1``) the RGB mean; a constant buffer, not parameters."""

    def __init__(self, mean, sign):
        super().__init__()
        self.sign = sign
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return x + self.sign * self.mean.to(x.dtype)

    def own_ops(self, inputs, output):
        return {"adds": output.numel()}


class Upsampler(nn.Sequential):
    """EDSR's sub-pixel upsampler: conv C -> s^2 C + PixelShuffle(s); x4 is two x2 stages."""

    def __init__(self, scale, n_feats):
        if scale not in SCALES:
            raise ValueError(f"Upsampler supports scales {SCALES}, got {scale!r}")
        stages = [2, 2] if scale == 4 else [scale]
        layers = []
        for s in stages:
            layers += [nn.Conv2d(n_feats, s * s * n_feats, 3, padding=1), nn.PixelShuffle(s)]
        super().__init__(*layers)


class Bicubic(nn.Module):
    """MATLAB bicubic enlargement by an integer ``scale`` (:func:`addersr.data.imresize`)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return imresize(x, self.scale)

    def own_ops(self, inputs, output):
        """One multiply per tap and (taps - 1) adds per output value, height pass then width pass."""
        (x,) = inputs
        h, w = x.shape[-2:]
        ho, wo = output.shape[-2:]
        lead = x.numel() // (h * w)
        th = resize_weights(h, ho, self.scale)[0].shape[1]
        tw = resize_weights(w, wo, self.scale)[0].shape[1]
        first, second = lead * ho * w, lead * ho * wo
        return {"mults": th * first + tw * second, "adds": (th - 1) * first + (tw - 1) * second}

    def radius(self):
        """Input pixels on each side that an output pixel reads (the cubic's support, 2)."""
        return 2

    def extra_repr(self):
        return f"scale={self.scale}"
