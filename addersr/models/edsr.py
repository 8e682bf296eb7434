"""EDSR (Lim et al., CVPRW 2017) and its adder twin.

The CNN, as in EDSR-PyTorch: mean shift (DIV2K mean), head conv 3 -> C, ``n_blocks``
residual blocks (conv, ReLU, conv, x ``res_scale``, + x), body conv and the long skip,
sub-pixel upsampler (x4 = two x2 stages), tail conv C -> 3, mean shift back. All
convolutions 3x3 with biases; the mean shift is a constant buffer, not parameters.

The adder network (AdderSR): every 3x3 C -> C convolution of the body becomes an
:class:`~addersr.nn.AdderSRLayer`: in each residual block the first one with ReLU and
power activation, the second (where the CNN has no ReLU) with the power activation right
after its self-shortcut; the block's own ``x res_scale, + x`` is kept. The body's final
convolution (before the long skip) is also a C -> C body layer, so it becomes an adder
layer too (without ReLU, as in the CNN). The head conv, the upsampler convs and the
tail conv - the first and the reconstruction / upsampling convolutions - stay
multiplicative, as DESIGN.md section 2 prescribes.
"""

from torch import nn

from ..nn import hidden_layer
from .common import OPS, MeanShift, Upsampler

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


class ResBlock(nn.Module):
    """``x + res_scale * layer2(layer1(x))`` with conv or adder layers."""

    def __init__(self, op, n_feats, res_scale, backend=None):
        super().__init__()
        self.body = nn.Sequential(hidden_layer(op, n_feats, relu=True, backend=backend),
                                  hidden_layer(op, n_feats, relu=False, backend=backend))
        self.res_scale = res_scale

    def forward(self, x):
        res = self.body(x)
        if self.res_scale != 1:
            res = res * self.res_scale
        return x + res

    def own_ops(self, inputs, output):
        """The residual addition, and the ``res_scale`` multiplication when it is not 1."""
        n = output.numel()
        return {"mults": n if self.res_scale != 1 else 0, "adds": n}

    def extra_repr(self):
        return f"res_scale={self.res_scale}"


class EDSR(nn.Module):
    """EDSR for ``scale`` with ``op`` "conv" or "adder"."""

    def __init__(self, scale, op="adder", n_blocks=16, n_feats=64, res_scale=1.0, backend=None):
        super().__init__()
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        if n_blocks < 0 or n_feats < 1:
            raise ValueError(f"EDSR needs n_blocks >= 0 and n_feats >= 1, got {n_blocks}, {n_feats}")
        self.sub_mean = MeanShift(DIV2K_MEAN, -1)
        self.head = nn.Conv2d(3, n_feats, 3, padding=1)
        self.body = nn.Sequential(
            *[ResBlock(op, n_feats, res_scale, backend) for _ in range(n_blocks)],
            hidden_layer(op, n_feats, relu=False, backend=backend))
        self.tail = nn.Sequential(Upsampler(scale, n_feats), nn.Conv2d(n_feats, 3, 3, padding=1))
        self.add_mean = MeanShift(DIV2K_MEAN, +1)

    def forward(self, x):
        x = self.head(self.sub_mean(x))
        x = x + self.body(x)
        return self.add_mean(self.tail(x))

    def own_ops(self, inputs, output):
        """The long skip addition (on the head's output, at LR resolution)."""
        (x,) = inputs
        return {"adds": x.numel() // x.shape[1] * self.head.out_channels}
