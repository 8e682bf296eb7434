"""8-bit adder models: calibration files and loading (inference on the CPU only).

``NAME.int8.json`` beside ``NAME.safetensors`` holds, for every adder layer, the input
range measured on a handful of training images (never a benchmark set), widened by a
margin (multi-scale weights: one set of ranges per trained scale, and their union); the
layer's scale and zero point follow from it (:func:`addersr.nn.quantized.qparams`), so loading is instant and deterministic. The file records the SHA-256 of the weights it
was calibrated for and is refused for any other weights.

``python -m addersr.quant weights/NAME [...] [--data-root DIR]`` (re)calibrates from
``DIR/train/T91`` (default ``$ADDERSR_DATA``); ``addersr.models.load(NAME, precision="int8")``
loads the result (:func:`load_int8`).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from .nn import AdderSRLayer
from .nn.quantized import quantized_class

__all__ = ["CALIBRATION_SET", "SUFFIX", "calibrate", "calibrate_by_scale", "calibration_images",
           "calibration_path", "calibrated_scales", "load_int8", "main", "quantize",
           "save_calibration", "served_scales"]

SUFFIX = ".int8.json"
FORMAT = "addersr-int8"
FORMAT_VERSION = 1
CALIBRATION_SET = "T91"
IMAGES = 8          # calibration images, spread evenly over the sorted training set
MARGIN = 0.1        # each measured range is widened by this fraction of its span (each side)


def calibration_path(stem):
    """``NAME.int8.json`` for the weights ``NAME`` (a stem without suffix)."""
    stem = Path(stem)
    return stem.with_name(stem.name + SUFFIX)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def calibration_images(data_root=None, count=IMAGES):
    """``count`` RGB uint8 HR images of ``DATA_ROOT/train/T91`` (default ``$ADDERSR_DATA``) and
    their names. Raises FileNotFoundError when the training set is absent."""
    from .data.patches import load_training_images
    root = data_root or os.environ.get("ADDERSR_DATA")
    if not root:
        raise FileNotFoundError("calibration needs the training images: pass --data-root DIR "
                                f"(holding train/{CALIBRATION_SET}) or set ADDERSR_DATA")
    folder = Path(root) / "train"
    if not (folder / CALIBRATION_SET).is_dir():
        raise FileNotFoundError(f"training set {folder / CALIBRATION_SET} not found")
    images, paths = load_training_images(folder, [CALIBRATION_SET])
    pick = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int))
    return [images[i] for i in pick], [paths[i].name for i in pick]


@torch.no_grad()
def calibrate_by_scale(model, images, margin=MARGIN):
    """``{scale: {layer name: [lo, hi]}}``: the input range of every adder layer of the fp32
    ``model`` over the HR uint8 ``images`` shrunk by each scale the model serves (multi-scale
    VDSR weights: every trained scale, see :func:`served_scales`), widened by ``margin``.
    VDSR's inner layers see 40-65% of their x2 range at x4 (its input is a blurrier
    enlargement), so each scale keeps its own ranges."""
    from .data.patches import make_lr_images
    if not images:
        raise ValueError("calibration needs at least one image")
    out = {}
    for scale in served_scales(model):
        ranges = {}

        def hook(name):
            def record(module, inputs):
                x = inputs[0]
                lo, hi = ranges.get(name, (np.inf, -np.inf))
                ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            return record

        net = model if scale == model.scale else model.at_scale(scale)
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in net.named_modules()
                   if isinstance(m, AdderSRLayer)]
        try:
            net.eval()
            for lr in make_lr_images(images, scale)[1]:
                net(torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float() / 255)
        finally:
            for h in handles:
                h.remove()
        out[scale] = {}
        for name, (lo, hi) in ranges.items():
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            pad = margin * (hi - lo)
            out[scale][name] = [lo - pad if lo < 0 else 0.0, hi + pad]
    return out


def calibrate(model, images, margin=MARGIN):
    """``{layer name: [lo, hi]}``: the union over the served scales of
    :func:`calibrate_by_scale`'s ranges (one set of ranges valid at every scale)."""
    return _union(calibrate_by_scale(model, images, margin).values())


def _union(range_sets):
    out = {}
    for ranges in range_sets:
        for name, (lo, hi) in ranges.items():
            old = out.get(name, (lo, hi))
            out[name] = [min(old[0], lo), max(old[1], hi)]
    return out


def served_scales(model):
    """The scales an fp32 ``model`` serves: its weights' trained ones (``model.meta``), else its own."""
    from .models.store import trained_scales
    meta = getattr(model, "meta", None)
    return trained_scales(meta) if meta else [model.scale]


def quantize(model, ranges, bits=8):
    """The int8 form of the fp32 adder ``model`` for calibrated ``ranges``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return quantized_class(model)(model, ranges, bits)


def save_calibration(stem, ranges, images, margin=MARGIN, bits=8, scales=None, by_scale=None):
    """Write ``NAME.int8.json`` for the weights ``stem`` (atomically), valid at ``scales``
    (None: the weights' recorded scale); ``by_scale`` (``{scale: ranges}``, optional) is used
    at each of its scales instead of ``ranges``. Returns the path."""
    stem = Path(stem)

    def floats(r):
        return {k: [float(v) for v in lohi] for k, lohi in r.items()}

    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "bits": bits,
            "weights_sha256": _sha256(stem.with_name(stem.name + ".safetensors")),
            "calibration": {"set": CALIBRATION_SET, "images": list(images), "margin": margin},
            "ranges": floats(ranges)}
    if scales is not None:
        info["scales"] = [int(x) for x in scales]
    if by_scale:
        info["ranges_by_scale"] = {str(int(k)): floats(r) for k, r in by_scale.items()}
    path = calibration_path(stem)
    atomic_write(path, lambda f: f.write(json.dumps(info, indent=2) + "\n"), mode="w")
    return path


def _read_calibration(stem):
    path = calibration_path(stem)
    if not path.is_file():
        raise ValueError(f"no int8 calibration for {stem.name} ({path.name} is missing); "
                         f"make it with: python -m addersr.quant {stem}")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("ranges"), dict):
        raise ValueError(f"{path} is not an AdderSR int8 calibration file")
    if info.get("weights_sha256") != _sha256(stem.with_name(stem.name + ".safetensors")):
        raise ValueError(f"{path} was calibrated for other weights; recalibrate: "
                         f"python -m addersr.quant {stem}")
    return info


def calibrated_scales(info, recorded):
    """The scales a calibration file's ``info`` covers: its ``scales``, else the weights'
    ``recorded`` scale (files written before multi-scale calibration)."""
    scales = info.get("scales", [recorded])
    if not isinstance(scales, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in scales):
        raise ValueError(f"\"scales\" must be a list of scales, got {scales!r}")
    return scales


def load_int8(path_or_name, device="cpu", backend=None, scale=None):
    """The int8 model of adder weights ``path_or_name`` (calibration beside them) at ``scale``
    (None: the recorded one); its ``int8_scales`` lists the scales the calibration covers.

    Raises ValueError (one line) for a CNN, a missing or stale calibration, a scale it does
    not cover or a non-CPU device.
    """
    from .models.store import _resolve, _stem, load, trained_scales
    if torch.device(device).type != "cpu":
        raise ValueError(f"int8 models run on the CPU only, not {device}")
    model = load(path_or_name, device="cpu", backend=backend)
    if model.op != "adder":
        raise ValueError(f"{Path(str(path_or_name)).name} is a CNN: int8 needs an adder model")
    stem = _resolve(path_or_name)[0]
    info = _read_calibration(stem)
    try:
        covered = calibrated_scales(info, model.scale)
    except ValueError as e:
        raise ValueError(f"{calibration_path(stem)}: {e}") from None
    if scale is not None and scale != model.scale:
        if scale not in covered:
            name = _stem(path_or_name).name
            fix = (f"; recalibrate (python -m addersr.quant {name}) or use fp32 for it"
                   if scale in trained_scales(model.meta) else "")
            raise ValueError(f"{name}: int8 serves {', '.join(f'x{x}' for x in covered)} only "
                             f"(its calibration), not x{scale}{fix}")
        model = model.at_scale(scale)  # multi-scale VDSR: the same layers, another enlargement
    try:
        by_scale = info.get("ranges_by_scale", {})
        if not isinstance(by_scale, dict):
            raise ValueError(f"\"ranges_by_scale\" must map scales to ranges, got {type(by_scale).__name__}")
        ranges = by_scale.get(str(model.scale), info["ranges"])  # files before per-scale ranges: the union
        qmodel = quantize(model, ranges, int(info.get("bits", 8)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{calibration_path(stem)}: {e}") from None
    qmodel.calibration, qmodel.int8_scales = info["calibration"], covered
    return qmodel.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m addersr.quant",
                                     description="(Re)calibrate adder weights for 8-bit inference.")
    parser.add_argument("weights", nargs="+", metavar="NAME|PATH", help="adder weights to calibrate")
    parser.add_argument("--data-root", help="folder holding train/T91 (default: $ADDERSR_DATA)")
    parser.add_argument("--images", type=int, default=IMAGES, help=f"calibration images (default {IMAGES})")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help=f"widen each range by this fraction of its span (default {MARGIN})")
    args = parser.parse_args(argv)
    from .models.store import _resolve, load
    try:
        images, names = calibration_images(args.data_root, args.images)
        for source in args.weights:
            model = load(source)
            if model.op != "adder":
                raise ValueError(f"{source} is a CNN: only adder models are calibrated")
            stem = _resolve(source)[0]
            by_scale = calibrate_by_scale(model, images, args.margin)
            ranges, scales = _union(by_scale.values()), served_scales(model)
            path = save_calibration(stem, ranges, names, args.margin, scales=scales,
                                    by_scale=by_scale if len(by_scale) > 1 else None)
            print(f"{path}: {len(ranges)} layers from {len(names)} {CALIBRATION_SET} images "
                  f"at {', '.join(f'x{x}' for x in scales)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
