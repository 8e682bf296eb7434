"""The demo's upscale call: :class:`Upscaler` checks a request, runs it on cached models with
progress and cancellation callbacks, keeps each request's files in a folder of their own
(pruned after KEEP_RESULTS_S) and returns the figures as a :class:`Result`."""

import shutil
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from addersr import models
from addersr.data import imresize
from addersr.demo.catalogue import ASSETS, OP_NAMES, Catalogue
from addersr.demo.checks import (BICUBIC, FP32, INT8, TWIN, Refused, Request, check_precision,
                                 check_request, check_upload, precisions, served_scale)
from addersr.device import resolve
from addersr.energy import count_ops
from addersr.images import ImageError, load_image, read_image, save_png
from addersr.inference import upscale

KEEP_RESULTS_S = 3600  # results older than this are deleted
FAST_PNG = 1  # zlib level of the result PNGs: a request's time is the user's (lossless; ~15% larger)
EXAMPLE_REDUCTION = 4  # the Set5 examples are shrunk this much (MATLAB bicubic) to be LR inputs


class Cancelled(Exception):
    """The request was stopped because its ``cancelled()`` callback said so."""


@dataclass(frozen=True)
class Result:
    """One upscaled request. ``output``: the result's PNG; ``other``: what it is compared
    with, bicubic's PNG or (``twin`` named) the twin's; times in seconds; sizes as
    ``(width, height)``; ``kind``: the input's kind in words ("RGB", "gray 16-bit", ...);
    ``ops`` and ``twin_ops``: ``mults``, ``adds`` and ``energy_pj`` (45 nm) spent for this
    output by the model (its adder layers' adds at ``precision``) and by its twin (the same
    network with ``twin_op``, fp32)."""
    request: Request
    output: Path
    other: Path
    seconds: float
    twin: str | None
    twin_seconds: float | None
    in_size: tuple
    out_size: tuple
    kind: str
    ops: dict
    twin_ops: dict
    twin_op: str

    @property
    def precision(self):
        """The precision the model ran at: "int8" or "fp32"."""
        return self.request.precision


def _size(image):
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def image_kind(image):
    """An image as ``load_image`` returns it, in words: "RGB", "gray 16-bit", ..."""
    if isinstance(image, np.ndarray):
        return f"{'RGBA' if image.shape[-1] == 4 else 'RGB'} 16-bit"
    return {"I;16": "gray 16-bit", "L": "gray", "LA": "gray + alpha"}.get(image.mode, image.mode)


def bicubic(image, scale):
    """MATLAB-bicubic enlargement of an image as returned by ``load_image``, same kind out."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        out = imresize(array, scale)
    else:  # 16-bit: resize in float, round back
        out = imresize(array.astype(np.float64), scale)
        out = np.clip(np.rint(out), 0, np.iinfo(array.dtype).max).astype(array.dtype)
    if isinstance(image, np.ndarray):
        return out
    return Image.fromarray(out)


def example_images(folder):
    """The shipped Set5 images shrunk EXAMPLE_REDUCTION times, written to ``folder`` as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for hr_path in sorted(ASSETS.glob("*.png")):
        lr = imresize(read_image(hr_path), 1 / EXAMPLE_REDUCTION)
        paths.append(save_png(lr, folder / hr_path.name))
    return paths


class Upscaler:
    """Upscale image files with the weights of a :class:`Catalogue`, for any front end.

    ``weights_dir``: folder of ``NAME.safetensors`` + ``NAME.json`` (default: see
    :func:`addersr.models.weights_dir`). ``device``: "auto" (GPU when present), "cpu", ...
    ``temp_dir``: where its folder of results is made (default: the system's); the folder
    goes with the Upscaler. Loaded models and operation counts are cached; the methods may
    be called from several threads.
    """

    def __init__(self, weights_dir=None, device="auto", temp_dir=None):
        self.catalogue = Catalogue(weights_dir)
        self.device = str(resolve(device))
        self.scratch = Path(tempfile.mkdtemp(prefix="addersr-app-", dir=temp_dir))
        weakref.finalize(self, shutil.rmtree, self.scratch, True)
        self.results = self.scratch / "results"
        self.results.mkdir()
        self._models, self._counts = {}, {}
        self._lock = threading.Lock()
        self.int8 = self.device.split(":")[0] == "cpu"  # the 8-bit adder kernels run on a CPU

    def precisions(self, name, scale=None):
        """The precisions the weights ``name`` run at here at ``scale``, the default first:
        ``("int8", "fp32")`` where int8 is calibrated (and the device a CPU), else ``("fp32",)``."""
        return precisions(self.catalogue, name, scale, self.int8)

    def model(self, name, scale=None, precision=None):
        """The loaded model of the weights ``name`` at ``scale`` (None: their recorded scale;
        multi-scale weights serve several) and ``precision`` (None: the default, see
        :meth:`precisions`), loaded and warmed up once per scale and precision."""
        scale = served_scale(self.catalogue, name, scale)
        key = (name, scale, check_precision(self.catalogue, name, scale, precision, self.int8))
        with self._lock:
            if key not in self._models:
                try:
                    model = models.load(self.catalogue.weights_dir / name, device=self.device,
                                        scale=scale, precision=key[2])
                except (OSError, ValueError) as err:  # damaged files, NaN weights
                    print(f"warning: cannot load the weights {name} ({key[2]}): {err}",
                          file=sys.stderr)
                    if key[2] == INT8:
                        raise Refused(f"The 8-bit (int8) form of {name} cannot be used (its "
                                      "calibration does not fit); choose fp32.") from None
                    raise Refused(f"The weights {name} cannot be used (damaged, or holding NaN "
                                  "values); choose another model.") from None
                # compile kernels and load lazy imports now, not in the first request's time
                upscale(np.zeros((8, 8, 3), np.uint8), model)
                self._models[key] = model
            return self._models[key]

    def counts(self, name, out_size, scale=None, precision=FP32):
        """``(own, twin, twin_op)``: operation counts of the model and of its twin (other op,
        fp32) for one output size ``(height, width)`` at ``scale`` (None: the recorded one);
        the model's adder-layer adds are charged at ``precision``."""
        scale = served_scale(self.catalogue, name, scale)
        key = (name, scale, tuple(out_size), precision)
        with self._lock:
            if key not in self._counts:
                meta = self.catalogue.weights[name]
                twin_op = "conv" if meta["op"] == "adder" else "adder"
                totals = []
                for op, adders in ((meta["op"], precision), (twin_op, FP32)):
                    net = models.build(meta["model"], scale, op=op,
                                       **(meta.get("config") or {}))
                    counts = count_ops(net, out_size=out_size, adder_precision=adders)
                    totals.append({k: v for k, v in counts.items() if k != "layers"})
                self._counts[key] = (*totals, twin_op)
            return self._counts[key]

    def check(self, image, weights=None, tile=0, compare=BICUBIC, scale=None, precision=None):
        """The :class:`Request` for these arguments (see :meth:`upscale`), from the image's
        header only; raises :class:`Refused` for a bad one."""
        return check_request(self.catalogue, image, weights, tile, compare, scale, precision,
                             self.int8)

    def check_upload(self, path, name):
        """Raise :class:`Refused` when the upload ``path`` (named ``name``) is not an image or
        is far too large to decode."""
        check_upload(path, name, self.catalogue.scales())

    def upscale(self, image, weights=None, tile=0, compare=BICUBIC, progress=None,
                cancelled=None, scale=None, precision=None):
        """Upscale the image file ``image`` with ``weights`` (a name; None: the default) at
        ``scale`` (None: the weights' recorded scale; multi-scale weights serve several) with
        adder layers at ``precision``: "int8" (8-bit, CPU) or "fp32"; None: int8 where the
        weights are calibrated for it (:meth:`precisions`), else fp32. The twin runs in fp32.

        ``tile``: 0 picks tiles of TILE pixels for large inputs, N >= MIN_TILE forces tiles
        of N. ``compare``: what the result is shown against, ``"bicubic"`` or ``"twin"`` (the
        same image upscaled by the model's twin, which runs too). ``progress(done, total,
        what)`` is called after each tile; ``cancelled()`` is asked before each, and when it
        is true :class:`Cancelled` is raised. Raises :class:`Refused` for a bad request.
        """
        request = self.check(image, weights, tile, compare, scale, precision)
        try:
            lr = load_image(request.path)
        except ImageError as err:
            raise Refused(f"{request.path.name} could not be read: {err.reason}.") from None

        def run(name, what, precision=FP32):
            def report(done, total):
                if cancelled is not None and cancelled():
                    raise Cancelled(f"cancelled at tile {done} of {total}")
                if progress is not None:
                    progress(done, total, what)

            model = self.model(name, request.scale, precision)
            start = time.perf_counter()
            sr = upscale(lr, model, tile=request.tile, progress=report)
            return sr, time.perf_counter() - start

        sr, seconds = run(request.name, "Upscaling tiles", request.precision)
        folder, stem = self._result_dir(), f"{request.path.stem}_x{request.scale}"
        suffix = "-int8" if request.precision == INT8 else ""
        twin = twin_seconds = None
        # the result's PNG is encoded beside the comparison (Pillow lets go of the GIL)
        with ThreadPoolExecutor(1) as pool:
            output = pool.submit(save_png, sr, folder / f"{stem}_{request.name}{suffix}.png",
                                 FAST_PNG)
            if request.compare == TWIN:
                twin = self.catalogue.twin(request.name)
                op = OP_NAMES[self.catalogue.weights[twin]["op"]]
                twin_sr, twin_seconds = run(twin, f"{op} twin: upscaling tiles")
                other = save_png(twin_sr, folder / f"{stem}_{twin}.png", FAST_PNG)
            else:
                other = save_png(bicubic(lr, request.scale), folder / f"{stem}_bicubic.png",
                                 FAST_PNG)
            output = output.result()
        out_w, out_h = _size(sr)
        ops, twin_ops, twin_op = self.counts(request.name, (out_h, out_w), request.scale,
                                             request.precision)
        return Result(request, Path(output), Path(other), seconds, twin, twin_seconds,
                      _size(lr), (out_w, out_h), image_kind(lr), ops, twin_ops, twin_op)

    def _result_dir(self):
        """A fresh folder for one request's files; deletes those older than KEEP_RESULTS_S."""
        now = time.time()
        for old in self.results.iterdir():
            if now - old.stat().st_mtime > KEEP_RESULTS_S:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.results))
