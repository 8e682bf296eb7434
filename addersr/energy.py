"""Operation and energy counts of a model for one output image (DESIGN.md section 5).

Counted per layer, from a shape-only run on the meta device (fast even for the 43 M
parameter EDSR at 1280x720):

* convolution: ``macs`` multiply-accumulates = one multiply and one add each (the bias
  add stands in for the first accumulation, which needs none);
* adder layer: ``adder_ops`` = one subtraction and one accumulation = 2 adds each;
* batch normalisation (eval): one multiply and one add per value (folded scale, shift);
* power activation: ``pows`` ``sign(y) |y|^alpha`` evaluations, reported but left out of
  the energy (no 45 nm figure for a power; the AdderSR paper also omits them);
* arithmetic a module does itself (self-shortcuts, residual and long-skip adds, res_scale
  multiplies, mean shift, VDSR's bicubic resize and YCbCr conversions) from its
  ``own_ops(inputs, output)`` method; ReLU, PixelShuffle and copies count as nothing.

``energy_pj = mults * E_mult + adds * E_add`` with Horowitz's 45 nm figures (FP32: 3.7 pJ
and 0.9 pJ); the adds of adder layers may be charged at another precision than the rest
(``adder_precision``: an 8-bit adder model's SAD layers cost 2 x 0.03 pJ per adder op
while its convolutions, BN and activations stay FP32). When the output size is not a multiple of the scale the counts are pro-rated
to exactly H x W output pixels, as published tables are.

``python -m addersr.energy --model edsr-baseline --scale 4 --size 1280x720`` prints the
adder network beside its CNN twin.
"""

import argparse
import math

import torch

from .models import MODELS, SCALES, build
from .models.trace import trace
from .nn import Adder2d, PowerActivation

# (multiply, add) energy in pJ, 45 nm (Horowitz, ISSCC 2014).
ENERGY_PJ = {"fp32": (3.7, 0.9), "int32": (3.1, 0.1), "int8": (0.2, 0.03)}
_KEYS = ("mults", "adds", "adder_ops", "macs", "pows")


def _module_ops(m, inputs, out):
    ops = dict.fromkeys(_KEYS, 0)
    n = out.numel()
    if isinstance(m, torch.nn.Conv2d):
        k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        ops["macs"] = ops["mults"] = n * k
        ops["adds"] = n * k - (0 if m.bias is not None else n)
    elif isinstance(m, Adder2d):
        ops["adder_ops"] = n * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        ops["adds"] = 2 * ops["adder_ops"] + (n if m.bias is not None else 0)
    elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        ops["mults"] = ops["adds"] = n
    elif isinstance(m, PowerActivation):
        ops["pows"] = n
    if hasattr(m, "own_ops"):
        for key, value in m.own_ops(inputs, out).items():
            ops[key] += value
    return ops


def _size(out_size):
    try:
        h, w = (int(v) for v in out_size)
    except (TypeError, ValueError):
        raise ValueError(f"out_size must be (height, width), got {out_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"out_size must be positive, got {out_size!r}")
    return h, w


def _energy(ops, precision, adder_precision):
    """Energy in pJ of a counts dict; adder-op adds charged at ``adder_precision``."""
    e_mult, e_add = ENERGY_PJ[precision]
    if adder_precision == precision:
        return ops["mults"] * e_mult + ops["adds"] * e_add
    adder_adds = 2 * ops["adder_ops"]
    return ops["mults"] * e_mult + (ops["adds"] - adder_adds) * e_add \
        + adder_adds * ENERGY_PJ[adder_precision][1]


def count_ops(model, out_size=(720, 1280), precision="fp32", adder_precision=None):
    """Operation counts and energy of ``model`` for one image of ``out_size=(H, W)``.

    Returns ``dict(mults, adds, adder_ops, macs, pows, energy_pj, layers)``; ``macs``
    counts convolutions only (they are also in ``mults`` and ``adds``); ``layers`` is a
    list of per-module dicts (``name``, ``type``, ``shape`` of the traced output - LR size
    rounded up to whole pixels -, the counts, ``energy_pj``) for every module that computes something, children before parents.
    ``precision``: "fp32" (default), "int32" or "int8" energy constants; ``adder_precision``:
    those of the adder layers' adds (default: the model's ``adder_precision`` attribute,
    "int8" for :func:`addersr.quant.quantize` models, else ``precision``).
    """
    adder_precision = adder_precision or getattr(model, "adder_precision", None) or precision
    for p in (precision, adder_precision):
        if p not in ENERGY_PJ:
            raise ValueError(f"unknown precision {p!r}; expected one of {sorted(ENERGY_PJ)}")
    h, w = _size(out_size)
    s = getattr(model, "scale", None)
    if s is None:
        raise ValueError("count_ops needs a model with a .scale (build one with addersr.models.build)")
    lr = (math.ceil(h / s), math.ceil(w / s))
    prorate = (h * w) / (lr[0] * s * lr[1] * s)
    layers = []
    for name, m, inputs, out in trace(model, lr):
        ops = _module_ops(m, inputs, out)
        if not any(ops.values()):
            continue
        ops = {k: round(v * prorate) for k, v in ops.items()}
        ops["energy_pj"] = _energy(ops, precision, adder_precision)
        layers.append({"name": name or "(model)", "type": type(m).__name__,
                       "shape": tuple(out.shape[1:]), **ops})
    totals = {k: sum(layer[k] for layer in layers) for k in _KEYS}
    totals["energy_pj"] = _energy(totals, precision, adder_precision)
    return {**totals, "layers": layers}


def _table(rows):
    header = ("network", "mults (G)", "adds (G)", "adder ops (G)", "conv MACs (G)", "pows (G)",
              "energy (mJ)", "energy ratio")
    base = rows[0][1]["energy_pj"]
    lines = [header]
    for label, c in rows:
        lines.append((label, *(f"{c[k] / 1e9:.2f}" for k in ("mults", "adds", "adder_ops", "macs", "pows")),
                      f"{c['energy_pj'] / 1e9:.2f}", f"{base / c['energy_pj']:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(wd) if i == 0 else cell.rjust(wd)
                               for i, (cell, wd) in enumerate(zip(line, widths))) for line in lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m addersr.energy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="edsr-baseline", choices=sorted(MODELS))
    parser.add_argument("--scale", type=int, default=4, choices=SCALES)
    parser.add_argument("--size", default="1280x720", help="output size WIDTHxHEIGHT (default 1280x720)")
    parser.add_argument("--precision", default="fp32", choices=sorted(ENERGY_PJ))
    parser.add_argument("--layers", action="store_true", help="also print the adder network's layers")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must look like 1280x720, got {args.size!r}")
    if width < 1 or height < 1:
        parser.error(f"--size must be at least 1x1, got {args.size!r}")
    rows = []
    for op, label in (("conv", "CNN"), ("adder", "AdderSR")):
        with torch.device("meta"):
            model = build(args.model, args.scale, op)
        rows.append((label, count_ops(model, (height, width), args.precision)))
    e_mult, e_add = ENERGY_PJ[args.precision]
    print(f"{args.model} x{args.scale}, one {width}x{height} output, {args.precision.upper()} 45 nm "
          f"(multiply {e_mult} pJ, add {e_add} pJ); energy ratio = CNN energy / this row's\n")
    print(_table(rows))
    if args.layers:
        print("\nAdderSR layers:")
        for layer in rows[1][1]["layers"]:
            print(f"  {layer['name']:<28} {layer['type']:<16} {str(layer['shape']):<18} "
                  f"mults {layer['mults']:>14,}  adds {layer['adds']:>15,}  adder ops {layer['adder_ops']:>14,}  "
                  f"pows {layer['pows']:>12,}")


if __name__ == "__main__":
    main()
