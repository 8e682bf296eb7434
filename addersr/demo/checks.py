"""The demo's request checks: its limits, and :class:`Refused` (a message for the user) for
an upload or a request it turns down, decided from the image's header alone."""

from pathlib import Path
from typing import NamedTuple

from addersr import models
from addersr.demo.catalogue import OP_NAMES
from addersr.images import ImageError, ImageTooLarge, check_size, image_size
from addersr.inference import check_tile

MAX_OUTPUT_PIXELS = 4096 * 4096  # largest output accepted: 16.8 megapixels
TILE = 256  # inputs wider or taller than this many pixels are upscaled in exact tiles
BICUBIC, TWIN = "bicubic", "twin"  # what the result is shown against
COMPARE = (BICUBIC, TWIN)
INT8, FP32 = "int8", "fp32"  # the adder layers' precision (int8: 8-bit, CPU only)
PRECISIONS = (INT8, FP32)


class Refused(ValueError):
    """A request turned down; its message is for the user (it names no server folder)."""


class Request(NamedTuple):
    """A checked request: the image file, the weights' name and scale, the image's
    ``(width, height)``, the tile size to use (None: the whole image at once), the comparison,
    the precision the model runs at ("int8" or "fp32")."""
    path: Path
    name: str
    scale: int
    size: tuple
    tile: int | None
    compare: str
    precision: str = FP32


def limit(scales):
    """The output limit in words, with the largest input for each of ``scales``."""
    side = int(MAX_OUTPUT_PIXELS ** 0.5)
    sides = ", ".join(f"{side // s}x{side // s} at x{s}" for s in scales or [1])
    return f"the limit is {MAX_OUTPUT_PIXELS / 1e6:.1f} megapixels of output ({sides})"


def _unreadable(name):
    return Refused(f"{name} is not an image this app can read (PNG, JPEG, WebP, BMP or TIFF).")


def check_upload(path, name, scales):
    """Refuse the upload ``path`` (shown as ``name``) that is not an image or is far too large
    to decode; ``scales``: those offered, for the limit in the message."""
    try:
        image_size(path)
    except ImageTooLarge as err:
        raise Refused(f"{name} is too large ({err.reason}); {limit(scales)}.") from None
    except (FileNotFoundError, ImageError):
        raise _unreadable(name) from None


def _scale(scale):
    """A requested scale as an int (None: not given); Refused for anything else."""
    if scale is None or scale == "":
        return None
    try:
        value = float(scale)
        whole = not isinstance(scale, bool) and value.is_integer()
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise Refused(f"Scale {scale!r}? Give a whole number such as 2, 3 or 4.")
    return int(value)


def served_scale(catalogue, name, scale):
    """The scale the weights ``name`` run at: ``scale`` (None: their recorded one) when they
    were trained for it; else :class:`Refused`."""
    served = models.trained_scales(catalogue.weights[name])
    scale = _scale(scale)
    if scale is None:
        return served[0]
    if scale not in served:
        raise Refused(f"{name} enlarges {', '.join(f'x{s}' for s in served)}, not x{scale}.")
    return scale


def precisions(catalogue, name, scale=None, int8=True):
    """The precisions the weights ``name`` run at ``scale`` (None: their recorded one), the
    default first: ("int8", "fp32") for adder weights with an int8 calibration, at its
    scales, when ``int8`` (the server computes on a CPU); else ("fp32",)."""
    return PRECISIONS if int8 and catalogue.calibrated(name, scale) else (FP32,)


def check_precision(catalogue, name, scale, precision=None, int8=True):
    """``precision`` (None: the default, see :func:`precisions`) for the weights ``name`` at
    ``scale``; :class:`Refused` when they do not run at it."""
    served = precisions(catalogue, name, scale, int8)
    if precision is None or precision == "":
        return served[0]
    if precision not in PRECISIONS:
        raise Refused(f"Precision {precision!r}? Choose one of: {', '.join(PRECISIONS)}.")
    if precision in served:
        return precision
    meta = catalogue.weights[name]
    if meta["op"] != "adder":
        why = f"{name} is a CNN: 8-bit (int8) runs AdderSR models only"
    elif not int8:
        why = "8-bit (int8) runs on a CPU only, and this server computes on a GPU"
    elif not catalogue.int8_scales(name):
        why = f"{name} has no int8 calibration"
    else:
        covered = ", ".join(f"x{s}" for s in catalogue.int8_scales(name))
        why = f"8-bit (int8) serves {name} at {covered} only (its calibration)"
    raise Refused(f"{why}; choose fp32.")


def check_request(catalogue, image, weights=None, tile=0, compare=BICUBIC, scale=None,
                  precision=None, int8=True):
    """The :class:`Request` for upscaling the file ``image`` with the weights named ``weights``
    of ``catalogue`` (None: its default, for ``scale`` when given) at ``scale`` (None: their
    recorded scale) and ``precision`` (None: int8 where calibrated and ``int8``, else fp32).
    Raises :class:`Refused` for a missing, unreadable or too large image, unknown weights, a
    scale or precision they do not serve, a bad tile size or a comparison with a twin that is
    not offered."""
    offered = catalogue.weights
    if not offered:
        raise Refused(catalogue.no_weights_message())
    if image is None:
        raise Refused("Upload an image first.")
    name = weights or catalogue.default(_scale(scale)) or catalogue.default()
    if name not in offered:
        raise Refused(f"Unknown weights {name!r}; available: {', '.join(offered)}.")
    if compare not in COMPARE:
        raise Refused(f"Compare with {compare!r}? Choose one of: {', '.join(COMPARE)}.")
    if compare == TWIN and catalogue.twin(name) is None:
        op = OP_NAMES.get(offered[name]["op"], "")
        raise Refused(f"No twin of this {op} model is offered; compare with bicubic.")
    try:
        check_tile(0 if tile is None else int(tile))
    except ValueError as err:
        raise Refused(f"Tile size (pieces): {err}; 0 chooses automatically.") from None
    path, scale = Path(image), served_scale(catalogue, name, scale)
    precision = check_precision(catalogue, name, scale, precision, int8)
    try:
        size = check_size(path, scale, MAX_OUTPUT_PIXELS)
    except ImageTooLarge as err:
        raise Refused(f"{path.name} is too large: {err.what}; "
                      f"{limit(catalogue.scales())}.") from None
    except (FileNotFoundError, ImageError):
        raise _unreadable(path.name) from None
    tile = int(tile or 0) or (TILE if max(size) > TILE else None)
    return Request(path, name, scale, size, tile, compare, precision)
