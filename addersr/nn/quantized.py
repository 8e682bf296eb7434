"""8-bit adder networks for inference on the CPU (DESIGN.md section 1, "8-bit adder layers").

:class:`QuantAdderLayer` turns a trained :class:`~addersr.nn.AdderSRLayer` and the
calibrated range ``[lo, hi]`` of its input into the constants of the fused uint8 kernel
(:func:`addersr.ops.sad.adder_layer`): one scale ``s`` and zero point ``z`` shared by input
and filters (0 exactly representable), each weight clamped to the representable range
with the exact per-filter compensation ``sum |w - clamp(w)|`` (lossless whenever the
input lies in the range), and BN, compensation and the shortcut's constant folded into
``alpha * SAD + beta``. :class:`QuantizedEDSR` and :class:`QuantizedVDSR` run the
full-precision head, tail and upsampler convolutions in fp32 torch and every adder layer
in uint8, each layer's output stage writing the next one's padded uint8 input.
"""

import numpy as np
import torch
from torch import nn

from ..ops import sad


def qparams(lo, hi, bits=8):
    """(scale, zero point) covering ``[min(lo, 0), max(hi, 0)]`` with 0 exactly representable."""
    levels = 2 ** bits - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0:
        hi = 1.0
    scale = (hi - lo) / levels
    return scale, int(min(max(round(-lo / scale), 0), levels))


class QuantAdderLayer:
    """The uint8 constants of one AdderSR layer (3x3 or any odd square kernel, C -> C)."""

    def __init__(self, layer, lo, hi, bits=8):
        w = layer.adder.weight.detach().double()
        o, c, kh, kw = w.shape
        self.scale, self.zero_point = qparams(lo, hi, bits)
        s, z = self.scale, self.zero_point
        wc = w.clamp(-z * s, (2 ** bits - 1 - z) * s)
        comp = (w - wc).abs().sum((1, 2, 3))
        self.channels, self.cp, self.kernel = c, sad.padded_channels(c, kw), (kh, kw)
        qw = np.zeros((o, kh, kw, self.cp), np.uint8)
        qw[..., :c] = (torch.round(wc / s) + z).clamp(0, 255).permute(0, 2, 3, 1).numpy()
        self.wq, self._packed = qw, {}
        bn = layer.bn
        a = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        b = bn.bias.detach().double() - bn.running_mean.double() * a
        self.alpha = (-a * s).float().numpy()
        self.beta = (b - a * comp - s * z).float().numpy()
        self.relu = layer.relu
        self.a_pow = float(layer.power.alpha.detach())

    def buffer(self, n, h, w):
        """A padded uint8 NHWC input buffer for this layer (border = zero point)."""
        kh, kw = self.kernel
        buf = np.zeros((n, h + kh - 1, w + kw - 1, self.cp), np.uint8)
        sad.fill_border(buf, self.zero_point, (kh // 2, kw // 2), self.channels)
        return buf

    def __call__(self, xq, nxt=None, skip=None, res_scale=1.0, fout=None, variant=None):
        """Run on the padded input ``xq``; requantise into a new buffer for layer ``nxt``
        (returned) and / or write ``skip + res_scale * y`` to float32 NHWC ``fout``."""
        n, hp, wp, _ = xq.shape
        qout = None if nxt is None else nxt.buffer(n, hp - self.kernel[0] + 1, wp - self.kernel[1] + 1)
        sad.adder_layer(xq, self.filters(variant), self.alpha, self.beta, self.scale, self.a_pow, self.relu, skip,
                        res_scale, fout, qout, nxt.scale if nxt else 1.0, nxt.zero_point if nxt else 0,
                        variant)
        return qout

    def filters(self, variant=None):
        """The filters packed for SAD ``variant`` (packed on first use)."""
        name = sad.default_variant(variant)
        if name not in self._packed:
            self._packed[name] = sad.pack_filters(self.wq, name)
        return self._packed[name]

    def quantize_input(self, x):
        """Float32 NHWC ``x`` -> this layer's padded uint8 input."""
        buf = self.buffer(*x.shape[:3])
        sad.quantize_nhwc(x, self.scale, self.zero_point, buf)
        return buf

    def radius(self):
        return max(self.kernel) // 2


def _nhwc(x):
    """A float32 NCHW tensor as a contiguous NHWC numpy array (free for channels_last)."""
    return np.ascontiguousarray(x.detach().permute(0, 2, 3, 1).numpy())


def _nchw(a):
    return torch.from_numpy(a).permute(0, 3, 1, 2)


class _Quantized(nn.Module):
    """Shared parts: fp32 modules of the source model, uint8 adder layers, bookkeeping.

    Inference only (no gradients), float32 on the CPU. ``variant`` picks the SAD kernel
    (None: the fastest this CPU has, see :mod:`addersr.ops.sad`); ``adder_precision``
    tells :func:`addersr.energy.count_ops` to charge the adder layers' adds at INT8.
    """

    adder_precision = "int8"

    def __init__(self, model, ranges, bits, layer_names):
        super().__init__()
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if n not in ranges]
        if missing:
            raise ValueError(f"calibration lacks the adder layer(s) {missing}")
        self.layers = [QuantAdderLayer(modules[n], *ranges[n], bits=bits) for n in layer_names]
        self.bits, self.variant = bits, None
        for key in ("name", "scale", "op", "config", "meta"):
            if hasattr(model, key):
                setattr(self, key, getattr(model, key))

    def radius(self):
        """LR pixels of context the uint8 layers add (the fp32 convs report their own)."""
        return sum(layer.radius() for layer in self.layers)

    def _check(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB batch (N, 3, h, w), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"int8 models run float32 CPU input, got {x.dtype} on {x.device}")

    def extra_repr(self):
        return f"adder layers: {len(self.layers)} x uint8 SAD, bits={self.bits}"


def edsr_layer_names(model):
    """The EDSR adder layers in execution order: two per block, then the body's last layer."""
    names = [f"body.{b}.body.{i}" for b in range(len(model.body) - 1) for i in (0, 1)]
    return names + [f"body.{len(model.body) - 1}"]


class QuantizedEDSR(_Quantized):
    """EDSR with uint8 adder layers; takes and returns what the fp32 EDSR does."""

    def __init__(self, model, ranges, bits=8):
        super().__init__(model, ranges, bits, edsr_layer_names(model))
        self.sub_mean, self.head, self.tail, self.add_mean = model.sub_mean, model.head, model.tail, model.add_mean
        self.res_scale = [blk.res_scale for blk in list(model.body)[:-1]]

    @torch.no_grad()
    def forward(self, x):
        self._check(x)
        h = _nhwc(self.head(self.sub_mean(x).contiguous(memory_format=torch.channels_last)))
        stream = h.copy()
        q = self.layers[0].quantize_input(h)
        layers, v = self.layers, self.variant
        for b, res in enumerate(self.res_scale):
            first, second, nxt = layers[2 * b], layers[2 * b + 1], layers[2 * b + 2]
            q = first(q, second, variant=v)
            q = second(q, nxt, skip=stream, res_scale=res, fout=stream, variant=v)
        layers[-1](q, skip=h, fout=stream, variant=v)
        return self.add_mean(self.tail(_nchw(stream))).contiguous()


class QuantizedVDSR(_Quantized):
    """VDSR with uint8 adder layers; takes and returns what the fp32 VDSR does."""

    def __init__(self, model, ranges, bits=8):
        super().__init__(model, ranges, bits, [f"body.{i}" for i in range(len(model.body))])
        self.upsample, self.head, self.tail = model.upsample, model.head, model.tail
        self._forward = model.forward.__func__

    def radius(self):
        """The uint8 layers run at HR resolution: their reach in LR pixels."""
        return super().radius() / self.scale

    @torch.no_grad()
    def forward(self, x):
        self._check(x)
        return self._forward(self, x)

    def body(self, y):
        """The uint8 chain between the fp32 head and tail (called by VDSR.forward)."""
        h = _nhwc(y.contiguous(memory_format=torch.channels_last))
        q = self.layers[0].quantize_input(h)
        for layer, nxt in zip(self.layers[:-1], self.layers[1:]):
            q = layer(q, nxt, variant=self.variant)
        out = np.empty(h.shape[:3] + (self.layers[-1].wq.shape[0],), np.float32)
        self.layers[-1](q, fout=out, variant=self.variant)
        return _nchw(out)


def quantized_class(model):
    """The int8 class for an fp32 adder ``model`` (EDSR family or VDSR); ValueError otherwise."""
    from ..models import EDSR, VDSR
    if getattr(model, "op", "adder") != "adder":
        raise ValueError("only adder models have an int8 form (this one is a CNN)")
    if isinstance(model, EDSR):
        return QuantizedEDSR
    if isinstance(model, VDSR):
        return QuantizedVDSR
    raise ValueError(f"no int8 form for {type(model).__name__}")
