"""VDSR (Kim et al., CVPR 2016) and its adder twin.

The CNN: 20 layers of 3x3 convolutions with 64 channels (first 1 -> 64, last 64 -> 1, all
with biases, ReLU after all but the last) predicting the residual of the bicubic-upsampled
Y channel: 665,921 parameters.

The adder network (AdderSR): the 18 hidden 64 -> 64 layers become
:class:`~addersr.nn.AdderSRLayer` (adder, BN, self-shortcut, ReLU, power activation); the
first and the last convolution stay multiplicative.

Both take an RGB LR batch in [0, 1]: it is enlarged with MATLAB bicubic, converted to
YCbCr (MATLAB ``rgb2ycbcr``), Y goes through the network, Cb / Cr stay bicubic, and the
result is converted back to RGB (unclamped).

Only the bicubic enlargement depends on the scale, so one network serves several (VDSR's
multi-scale training): :meth:`VDSR.forward` takes a list of LR batches of different scales
in one call, and :meth:`VDSR.at_scale` gives the same network for another scale.
"""

import copy

import torch
from torch import nn

from ..nn import hidden_layer
from .common import OPS, SCALES, Bicubic, rgb_to_ycbcr, ycbcr_to_rgb


class VDSR(nn.Module):
    """VDSR for ``scale`` with ``op`` "conv" or "adder"; ``depth`` layers of ``n_feats`` channels."""

    def __init__(self, scale, op="adder", depth=20, n_feats=64, backend=None):
        super().__init__()
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        if depth < 3:
            raise ValueError(f"VDSR needs at least 3 layers, got depth={depth}")
        self.upsample = Bicubic(scale)
        self.head = nn.Sequential(nn.Conv2d(1, n_feats, 3, padding=1), nn.ReLU(inplace=True))
        self.body = nn.Sequential(*[hidden_layer(op, n_feats, relu=True, backend=backend)
                                    for _ in range(depth - 2)])
        self.tail = nn.Conv2d(n_feats, 1, 3, padding=1)

    def forward(self, x, scale=None):
        """``x``: an RGB LR batch, enlarged by the model's scale; or a list of batches and
        ``scale`` the list of their scales: each is enlarged by its own, and the enlargements,
        all of one size, go through the layers together as one batch (in the list's order)."""
        if isinstance(x, (list, tuple)):
            if scale is None or len(scale) != len(x):
                raise ValueError(f"a list of {len(x)} LR batches needs a list of as many scales, got {scale!r}")
            ups = [Bicubic(s)(part) for part, s in zip(x, scale)]
            if len({u.shape[-2:] for u in ups}) > 1:
                raise ValueError(f"the LR batches enlarge to different sizes: {[tuple(u.shape[-2:]) for u in ups]}")
            up = torch.cat(ups)
        elif scale is not None:
            raise ValueError("scale= goes with a list of LR batches; use at_scale() for one other scale")
        else:
            up = self.upsample(x)
        ycbcr = rgb_to_ycbcr(up)
        y = ycbcr[:, :1]
        y = y + self.tail(self.body(self.head(y)))
        return ycbcr_to_rgb(torch.cat([y, ycbcr[:, 1:]], 1))

    def at_scale(self, scale):
        """A copy of this network, the same weights, for ``scale`` (its enlargement alone changes)."""
        if isinstance(scale, bool) or scale not in SCALES:
            raise ValueError(f"unsupported scale {scale!r}; available: {list(SCALES)}")
        twin = copy.deepcopy(self)
        twin.upsample = Bicubic(int(scale))
        if hasattr(self, "config"):  # set by addersr.models.build
            twin.scale, twin.config = int(scale), {**self.config, "scale": int(scale)}
        return twin

    def own_ops(self, inputs, output):
        """Colour conversions (3x3 matrix + offset, both ways) and the global residual add."""
        px = output.numel() // output.shape[1]
        return {"mults": 2 * 9 * px, "adds": 2 * 9 * px + px}
