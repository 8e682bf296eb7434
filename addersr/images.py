"""Image files: the one place that reads them, checks their size and writes them.

Reading goes through :func:`open_image`, which turns every failure into a one-line
:class:`ImageError` naming the file (:class:`ImageTooLarge` for sizes over a limit).
:func:`read_image` gives the uint8 arrays of the evaluation protocol and training;
:func:`load_image` keeps an image's mode and bit depth for upscaling (Pillow for most
images, ``tifffile`` for 16-bit colour TIFFs and ``pypng`` for 16-bit colour PNGs, which
Pillow reduces to 8 bits). :func:`check_size` reads only the header and refuses images
whose upscaled output would exceed a pixel limit. :func:`save_png` writes PNGs
atomically (Pillow, or ``pypng`` for 16 bits).
"""

import contextlib
import struct
import zlib
from pathlib import Path

import numpy as np
import png
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import atomic_write, reason

__all__ = ["ImageError", "ImageTooLarge", "check_size", "image_size", "load_image",
           "open_image", "read_image", "save_png"]


class ImageError(ValueError):
    """An image file that cannot be read: ``str()`` is ``"PATH: REASON"``; ``.path``,
    ``.reason`` (no path in it, for messages that must not show folders)."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


class ImageTooLarge(ImageError):
    """An image over a size limit (ours, or the most pixels Pillow agrees to decode);
    ``.what``: the reason without the limit (for messages that state the limit their way)."""

    def __init__(self, path, reason, what=None):
        super().__init__(path, reason)
        self.what = what or reason


@contextlib.contextmanager
def open_image(path):
    """Open ``path`` with Pillow (lazily: the header only until ``load()``).

    Every error while the block reads the file (open, decoding, a damaged PNG or TIFF
    seen by pypng or tifffile) becomes an :class:`ImageError`; a missing file raises
    FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            _one_frame(img, path)
            yield img
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        limit = 2 * Image.MAX_IMAGE_PIXELS / 1e6
        raise ImageTooLarge(path, f"more than {limit:.0f} megapixels, the most this program "
                                  "decodes") from err
    except UnidentifiedImageError as err:
        raise ImageError(path, "not an image file Pillow recognises") from err
    except (OSError, SyntaxError, ValueError, png.Error, zlib.error, struct.error) as err:
        raise ImageError(path, f"damaged or unsupported image ({reason(err)})") from err


def _one_frame(img, path):
    """Refuse an animated or multi-page image: only its first frame would be used."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ImageError(path, f"an animated or multi-page image ({frames} frames); save the "
                               "frame you want as a still image")


def image_size(path):
    """``(width, height)`` of an image file as stored, read from its header only."""
    with open_image(path) as img:
        return img.size


def check_size(path, scale, max_pixels):
    """``(width, height)`` of ``path`` (header only); raises :class:`ImageTooLarge` when
    the image enlarged ``scale`` times would have more than ``max_pixels`` pixels."""
    w, h = image_size(path)
    if w * h * scale * scale > max_pixels:
        what = (f"{w}x{h} at x{scale} would give a {w * scale}x{h * scale} image "
                f"({w * h * scale * scale / 1e6:.1f} megapixels)")
        raise ImageTooLarge(path, f"{what}; the limit is {max_pixels / 1e6:.1f} megapixels", what)
    return w, h


# --------------------------------------------------------------------------- reading

def _to_uint8(img):
    """A decoded Pillow image as uint8 numpy: HxW for gray modes, HxWx3 otherwise."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return np.asarray(img, dtype=np.uint8)
    if mode in ("1", "LA", "La"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: 0..65535 -> 0..255
        values = np.asarray(img).astype(np.float64)
        return np.clip(np.floor(values / 257.0 + 0.5), 0, 255).astype(np.uint8)
    if mode == "F":
        raise ValueError("floating-point images (Pillow mode F) have no defined range")
    # P, PA, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV: colour; alpha is dropped.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path):
    """Read an image file as uint8 numpy: ``HxWx3`` RGB, or ``HxW`` for grayscale files.

    Palette, alpha (dropped), CMYK and 16-bit images are converted; no EXIF rotation (the
    benchmark protocol scores images as stored). Raises FileNotFoundError or
    :class:`ImageError`.
    """
    with open_image(path) as img:
        img.load()
        return _to_uint8(img)


def load_image(path):
    """Read an image for upscaling, keeping its mode and bit depth.

    Returns a Pillow image (EXIF orientation applied) of mode L, LA, RGB, RGBA or I;16
    (others are converted: palette to RGB/RGBA, CMYK to RGB, 32-bit integer to I;16) or,
    for 16-bit colour PNG/TIFF files that Pillow would reduce to 8 bits, a uint16 numpy
    array ``HxWx3`` or ``HxWx4``. Raises FileNotFoundError or :class:`ImageError`.
    """
    with open_image(path) as img:
        read16 = {"PNG": _read_png16, "TIFF": _read_tiff16}.get(img.format)
        array = read16(path) if read16 else None
        if array is not None:
            return array
        img = ImageOps.exif_transpose(img)
        img.load()
        return _normalise(img)


def _normalise(img):
    """Convert a decoded Pillow image to one of the modes L, LA, RGB, RGBA, I;16."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA", "I;16"):
        return img
    if mode.startswith("I;16") or mode == "I":  # other 16-bit layouts, 32-bit integer
        return Image.fromarray(np.clip(np.asarray(img), 0, 65535).astype(np.uint16))
    if mode == "F":
        raise ValueError("32-bit floating-point images have no defined range; save it as "
                         "8- or 16-bit")
    if mode == "1":
        return img.convert("L")
    if mode == "La":
        return img.convert("LA")
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if alpha else "RGB")
    if mode == "RGBa":
        return img.convert("RGBA")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _read_png16(path):
    """A 16-bit colour PNG (RGB or RGBA) as uint16 ``HxWxC`` through pypng; None for others.

    The samples are returned as stored: no ``sBIT`` down-shift and no alpha made from a
    ``tRNS`` colour (as for 8-bit RGB PNGs read through Pillow).
    """
    with open(path, "rb") as f:
        reader = png.Reader(file=f)
        reader.preamble()
        if reader.bitdepth != 16 or reader.greyscale:
            return None
        rows = [np.frombuffer(row, dtype=np.uint16) for row in reader.read()[2]]
    if len(rows) != reader.height:
        raise ValueError(f"damaged PNG: {len(rows)} rows of image data, the header says "
                         f"{reader.height}")
    return np.stack(rows).reshape(reader.height, reader.width, reader.planes)


def _read_tiff16(path):
    """A 16-bit colour TIFF as uint16 ``HxWxC`` through tifffile; None for other TIFFs."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.dtype != np.uint16 or page.samplesperpixel < 3:
            return None
        try:
            array = page.asarray()
        except Exception as err:  # tifffile raises many kinds (missing codecs, damaged data)
            raise ValueError(f"16-bit TIFF not decodable by tifffile: {err}") from err
        if page.axes.startswith("S"):  # planar configuration: samples first
            array = np.moveaxis(array, 0, -1)
    return np.ascontiguousarray(array[..., :4])


# --------------------------------------------------------------------------- writing

def save_png(image, path, compress_level=6):
    """Write a Pillow image or a uint8/uint16 numpy array (HxW, HxWx2/3/4) as PNG, atomically.

    ``compress_level``: zlib's 0-9 for 8-bit images (6, Pillow's default; 1 writes a
    1024x1024 picture about 5x faster and 15% larger). Returns ``path``; on any error no
    file (or the previous one) is left at ``path``.
    """
    if isinstance(image, Image.Image):
        return atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=compress_level))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG",
                                                                        compress_level=compress_level))
    if array.dtype == np.uint16:
        return atomic_write(path, lambda f: _write_png16(array, f))
    raise ValueError(f"cannot save a {array.dtype} array as PNG (expected uint8 or uint16)")


def _write_png16(array, f):
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) through pypng, row by row (no copy)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"cannot save an array of shape {array.shape} as PNG")
    h, w, c = array.shape
    writer = png.Writer(w, h, greyscale=c < 3, alpha=c in (2, 4), bitdepth=16)
    rows = (row.astype(">u2").tobytes() for row in array)  # packed big-endian samples
    writer.write_packed(f, rows)
