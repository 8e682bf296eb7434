"""The weights the demo offers: their listing and labels, the Set5 score their JSON records,
the preview rule, the default model and each model's twin."""

import functools
import math
from pathlib import Path

from addersr import models
from addersr.eval import evaluate

PREVIEW_MARGIN_DB = 1.0  # a model less than this much above bicubic on Set5 is a preview
ASSETS = Path(models.__file__).resolve().parent.parent / "assets" / "Set5"
OP_NAMES = {"adder": "AdderSR", "conv": "CNN"}


def set5_psnr(meta):
    """Set5 PSNR recorded in a weights JSON (``metrics.Set5.psnr``, as training exports it); else None."""
    metrics = meta.get("metrics")
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            if key.lower() == "set5" and isinstance(value, dict) and "psnr" in value:
                return float(value["psnr"])
    return None


@functools.cache
def bicubic_set5(scale):
    """Set5 PSNR of bicubic interpolation at ``scale`` (the bench protocol, shipped Set5)."""
    return evaluate("bicubic", ASSETS, scale, progress=False)["psnr"]


def set5_gain(meta):
    """The weights' recorded Set5 PSNR minus bicubic's at their scale; None without a score."""
    psnr = set5_psnr(meta)
    return None if psnr is None else psnr - bicubic_set5(int(meta["scale"]))


def is_preview(meta):
    """True when the weights' recorded Set5 PSNR is less than PREVIEW_MARGIN_DB above bicubic."""
    gain = set5_gain(meta)
    return gain is not None and gain < PREVIEW_MARGIN_DB


def weights_label(name, meta):
    """Dropdown label: ``edsr-baseline x2 · AdderSR · Set5 37.10 dB (name)``, with
    ``· preview`` for a preview model."""
    label = f"{meta['model']} x{meta['scale']} · {OP_NAMES.get(meta['op'], meta['op'])}"
    psnr = set5_psnr(meta)
    if psnr is not None:
        label += f" · Set5 {psnr:.2f} dB" + (" · preview" if is_preview(meta) else "")
    return f"{label} ({name})"


class Catalogue:
    """The weights in ``weights_dir``, a folder of ``NAME.safetensors`` + ``NAME.json``
    (default: see :func:`addersr.models.weights_dir`): ``weights`` maps NAME to its JSON."""

    def __init__(self, weights_dir=None):
        self.weights_dir = Path(weights_dir) if weights_dir else models.weights_dir()
        self.weights = {path.stem: meta for path, meta in models.list_weights(self.weights_dir)}

    def scales(self):
        return sorted({int(meta["scale"]) for meta in self.weights.values()})

    def choices(self, scale=None):
        """``[(label, name)]`` of the weights, those for ``scale`` only when given."""
        return [(weights_label(name, meta), name) for name, meta in self.weights.items()
                if scale is None or int(meta["scale"]) == int(scale)]

    def default(self, scale=None):
        """The best adder model (of ``scale`` when given): the largest recorded Set5 gain over
        bicubic; CNN twins and models without a score come after. None without weights."""
        def rank(name):
            gain = set5_gain(self.weights[name])
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
