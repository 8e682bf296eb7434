"""The demo's request checks: its limits, and :class:`Refused` (a message for the user) for
an upload or a request it turns down, decided from the image's header alone."""

from pathlib import Path
from typing import NamedTuple

from addersr.demo.catalogue import OP_NAMES
from addersr.images import ImageError, ImageTooLarge, check_size, image_size
from addersr.inference import check_tile

MAX_OUTPUT_PIXELS = 4096 * 4096  # largest output accepted: 16.8 megapixels
TILE = 256  # inputs wider or taller than this many pixels are upscaled in exact tiles
BICUBIC, TWIN = "bicubic", "twin"  # what the result is shown against
COMPARE = (BICUBIC, TWIN)


class Refused(ValueError):
    """A request turned down; its message is for the user (it names no server folder)."""


class Request(NamedTuple):
    """A checked request: the image file, the weights' name and scale, the image's
    ``(width, height)``, the tile size to use (None: the whole image at once), the comparison."""
    path: Path
    name: str
    scale: int
    size: tuple
    tile: int | None
    compare: str


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


def check_request(catalogue, image, weights=None, tile=0, compare=BICUBIC):
    """The :class:`Request` for upscaling the file ``image`` with the weights named ``weights``
    of ``catalogue`` (None: its default). Raises :class:`Refused` for a missing, unreadable
    or too large image, unknown weights, a bad tile size or a comparison with a twin that is
    not offered."""
    offered = catalogue.weights
    if not offered:
        raise Refused(catalogue.no_weights_message())
    if image is None:
        raise Refused("Upload an image first.")
    name = weights or catalogue.default()
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
    path, scale = Path(image), int(offered[name]["scale"])
    try:
        size = check_size(path, scale, MAX_OUTPUT_PIXELS)
    except ImageTooLarge as err:
        raise Refused(f"{path.name} is too large: {err.reason}; "
                      f"{limit(catalogue.scales())}.") from None
    except (FileNotFoundError, ImageError):
        raise _unreadable(path.name) from None
    tile = int(tile or 0) or (TILE if max(size) > TILE else None)
    return Request(path, name, scale, size, tile, compare)
