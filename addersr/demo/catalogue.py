"""The weights the demo offers: their listing and labels, the Set5 score their JSON records,
the preview rule, the default model and each model's twin. Multi-scale weights (VDSR) are
offered at each scale they were trained for, with that scale's score; the functions taking
``scale`` default to the weights' recorded one."""

import functools
import math
import warnings
from pathlib import Path

from addersr import models, quant
from addersr.eval import evaluate

PREVIEW_MARGIN_DB = 1.0  # a model less than this much above bicubic on Set5 is a preview
ASSETS = Path(models.__file__).resolve().parent.parent / "assets" / "Set5"
OP_NAMES = {"adder": "AdderSR", "conv": "CNN"}


def set5_psnr(meta, scale=None):
    """Set5 PSNR recorded in a weights JSON (``metrics.Set5.psnr``, as training exports it; at
    another of multi-scale weights' scales ``metrics_by_scale[scale]``); else None."""
    metrics = meta.get("metrics")
    if scale is not None and int(scale) != int(meta["scale"]):
        by_scale = meta.get("metrics_by_scale")
        metrics = by_scale.get(str(int(scale))) if isinstance(by_scale, dict) else None
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            if key.lower() == "set5" and isinstance(value, dict) and "psnr" in value:
                return float(value["psnr"])
    return None


@functools.cache
def bicubic_set5(scale):
    """Set5 PSNR of bicubic interpolation at ``scale`` (the bench protocol, shipped Set5)."""
    return evaluate("bicubic", ASSETS, scale, progress=False)["psnr"]


def set5_gain(meta, scale=None):
    """The weights' recorded Set5 PSNR minus bicubic's at that scale; None without a score."""
    psnr = set5_psnr(meta, scale)
    return None if psnr is None else psnr - bicubic_set5(int(scale or meta["scale"]))


def is_preview(meta, scale=None):
    """True when the weights' recorded Set5 PSNR is less than PREVIEW_MARGIN_DB above bicubic."""
    gain = set5_gain(meta, scale)
    return gain is not None and gain < PREVIEW_MARGIN_DB


def weights_label(name, meta, scale=None):
    """Dropdown label: ``edsr-baseline x2 · AdderSR · Set5 37.10 dB (name)``, with
    ``· preview`` for a preview model."""
    label = f"{meta['model']} x{scale or meta['scale']} · {OP_NAMES.get(meta['op'], meta['op'])}"
    psnr = set5_psnr(meta, scale)
    if psnr is not None:
        label += f" · Set5 {psnr:.2f} dB" + (" · preview" if is_preview(meta, scale) else "")
    return f"{label} ({name})"


class Catalogue:
    """The weights in ``weights_dir``, a folder of ``NAME.safetensors`` + ``NAME.json``
    (default: see :func:`addersr.models.weights_dir`): ``weights`` maps NAME to its JSON."""

    def __init__(self, weights_dir=None):
        self.weights_dir = Path(weights_dir) if weights_dir else models.weights_dir()
        self.weights = {path.stem: meta for path, meta in models.list_weights(self.weights_dir)}
        self._int8 = {name: self._int8_calibration(name) for name in self.weights}

    def _int8_calibration(self, name):
        """The scales at which adder weights ``name`` run in int8: those their valid
        ``NAME.int8.json`` covers (:mod:`addersr.quant`'s checks), else none; a present but
        unusable file is warned about."""
        stem, meta = self.weights_dir / name, self.weights[name]
        if meta["op"] != "adder" or not quant.calibration_path(stem).is_file():
            return []
        try:
            covered = quant.calibrated_scales(quant._read_calibration(stem), meta["scale"])
        except (OSError, ValueError) as err:
            warnings.warn(f"int8 not offered for {name}: {err}", stacklevel=3)
            return []
        return [s for s in covered if s in models.trained_scales(meta)]

    def calibrated(self, name, scale=None):
        """True when the weights ``name`` can run in int8 at ``scale`` (None: their recorded one)."""
        covered = self._int8.get(name, [])
        return bool(covered) and int(scale or self.weights[name]["scale"]) in covered

    def int8_scales(self, name):
        """The scales at which the weights ``name`` run in int8 (empty: none)."""
        return list(self._int8.get(name, []))

    def scales(self):
        return sorted({s for meta in self.weights.values() for s in models.trained_scales(meta)})

    def choices(self, scale=None):
        """``[(label, name)]`` of the weights, those serving ``scale`` only (labelled at it) when given."""
        return [(weights_label(name, meta, scale), name) for name, meta in self.weights.items()
                if scale is None or int(scale) in models.trained_scales(meta)]

    def default(self, scale=None):
        """The best adder model (of ``scale`` when given): the largest recorded Set5 gain over
        bicubic; CNN twins and models without a score come after. None without weights."""
        def rank(name):
            gain = set5_gain(self.weights[name], scale)
            return self.weights[name]["op"] != "adder", math.inf if gain is None else -gain, name
        names = [name for _, name in self.choices(scale)]
        return min(names, key=rank) if names else None

    def twin(self, name):
        """The weights of ``name``'s twin: same model, scale and architecture, the other op
        (the CNN of an AdderSR model and vice versa); None when none is offered."""
        meta = self.weights.get(name)
        if meta is None:
            return None
        twins = [other for other, m in self.weights.items()
                 if m["op"] != meta["op"] and models.twin_key(m) == models.twin_key(meta)]
        return min(twins) if twins else None

    def no_weights_message(self):
        return (f"No model weights found in `{self.weights_dir}`. Train one with "
                "`python -m addersr.train ... --export weights/NAME`, or start the app with "
                "`--weights-dir DIR` (or `ADDERSR_WEIGHTS=DIR`) pointing at a folder of "
                "`NAME.safetensors` + `NAME.json` files.")
