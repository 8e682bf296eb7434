"""Batch upscaling: ``python -m addersr.upscale INPUT... -o OUT [--weights NAME|PATH]``.

INPUT may be image files, folders (their images, not recursive) or glob patterns. Each
result is written as ``OUT/<stem>_x<scale>.png`` with the input's mode kept (gray, RGB,
RGBA, 8 or 16 bits per channel). A file that fails is reported on stderr and the others
go on; the exit status is 1 when any file failed. Inputs are never overwritten.

Also the image reading and PNG writing used by ``app.py``: Pillow for most images,
``tifffile`` for 16-bit colour TIFFs and ``pypng`` for 16-bit colour PNGs (Pillow reduces
those to 8 bits) and for writing 16-bit PNGs.
"""

import argparse
import glob
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import png
from PIL import Image, ImageOps, UnidentifiedImageError

from .inference import upscale

__all__ = ["upscale", "ImageTooLarge", "load_image", "image_size", "save_png", "output_name",
           "main"]

_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------- image files

class ImageTooLarge(ValueError):
    """An image with more pixels than Pillow agrees to decode (a decompression bomb)."""


def _open(path):
    """``Image.open`` with clear errors (FileNotFoundError, ValueError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image {path} is too large: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: not an image file Pillow recognises") from err


def image_size(path):
    """``(width, height)`` of an image file as stored, read from its header without decoding."""
    with _open(path) as img:
        return img.size


def load_image(path):
    """Read an image for upscaling, keeping its mode and bit depth.

    Returns a Pillow image (EXIF orientation applied) of mode L, LA, RGB, RGBA or I;16
    (others are converted: palette to RGB/RGBA, CMYK to RGB, 32-bit integer to I;16) or,
    for 16-bit colour PNG/TIFF files that Pillow would reduce to 8 bits, a uint16 numpy
    array ``HxWx3`` or ``HxWx4``. Raises FileNotFoundError or ValueError naming the file
    (:class:`ImageTooLarge` for images Pillow refuses as decompression bombs).
    """
    path = Path(path)
    with _open(path) as img:
        fmt = img.format
    try:
        read16 = {"PNG": _read_png16, "TIFF": _read_tiff16}.get(fmt)
        array = read16(path) if read16 else None
        if array is not None:
            return array
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return _normalise(img)
    except (OSError, SyntaxError, ValueError, png.Error, zlib.error, struct.error) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


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


def save_png(image, path):
    """Write a Pillow image or a uint8/uint16 numpy array (HxW, HxWx3, HxWx4) as PNG."""
    path = Path(path)
    if isinstance(image, Image.Image):
        image.save(path, format="PNG")
        return path
    array = np.asarray(image)
    if array.dtype == np.uint8:
        Image.fromarray(array).save(path, format="PNG")
    elif array.dtype == np.uint16:
        _write_png16(array, path)
    else:
        raise ValueError(f"cannot save a {array.dtype} array as PNG (expected uint8 or uint16)")
    return path


def _write_png16(array, path):
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) through pypng."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"cannot save an array of shape {array.shape} as PNG")
    h, w, c = array.shape
    writer = png.Writer(w, h, greyscale=c < 3, alpha=c in (2, 4), bitdepth=16)
    rows = np.ascontiguousarray(array, dtype=">u2").view(np.uint8).reshape(h, -1)
    with open(path, "wb") as f:
        writer.write_packed(f, rows)  # rows already packed as big-endian bytes


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


# --------------------------------------------------------------------------- the CLI

def output_name(path, scale):
    """The output file name for ``path``: ``<stem>_x<scale>.png``."""
    return f"{Path(path).stem}_x{scale}.png"


def _expand(inputs):
    """Input arguments -> (files in order without duplicates, arguments that matched nothing)."""
    from .data import list_images

    files, missing, seen = [], [], set()
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            found = list_images(path)
        elif path.is_file():
            found = [path]
        elif _GLOB_CHARS & set(arg):
            known = {ext.lower() for ext in Image.registered_extensions()}
            found = sorted(Path(p) for p in glob.glob(arg, recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in known)
        else:
            found = []
        if not found:
            missing.append(arg)
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    return files, missing


def _resolve_device(device):
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_model(weights, device):
    from .models import list_weights, load

    if weights is None:
        shipped = list_weights()
        if not shipped:
            raise ValueError("no trained weights ship with this installation; "
                             "pass --weights PATH to a NAME.safetensors file")
        weights = shipped[0][0]
    return load(weights, device=device)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m addersr.upscale",
        description="Upscale images with an AdderSR model. Writes OUT/<stem>_x<scale>.png.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of images or glob patterns (quote them)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created)")
    p.add_argument("--weights", metavar="NAME|PATH", default=None,
                   help="shipped weights name or a NAME.safetensors path "
                        "(default: the first shipped weights)")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tile size in input pixels for exact tiled inference (default: "
                        "tiles only when the image would not fit in memory; 0: never tile)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    return p


def main(argv=None):
    """Run the CLI; returns the exit status (0 ok, 1 some files failed, 2 bad arguments)."""
    from tqdm import tqdm

    args = _parser().parse_args(argv)
    if args.tile is not None and args.tile < 0:
        print("error: --tile must be >= 0", file=sys.stderr)
        return 2
    files, missing = _expand(args.inputs)
    for arg in missing:
        print(f"error: {arg}: no such image file, folder or matching file", file=sys.stderr)
    if not files:
        print("error: no input images", file=sys.stderr)
        return 2
    try:
        model = _load_model(args.weights, _resolve_device(args.device))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: cannot load weights: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {p.resolve() for p in files}
    written, failed = {}, len(missing)
    tile = args.tile or None
    start = time.perf_counter()
    bar = tqdm(files, unit="image", file=sys.stderr, desc=f"x{model.scale}")
    for path in bar:
        target = out_dir / output_name(path, model.scale)
        try:
            if target.resolve() in inputs:
                raise ValueError(f"refusing to overwrite the input file {target}")
            if target.resolve() in written:
                raise ValueError(f"{target} is already the output of {written[target.resolve()]} "
                                 "(two inputs share the stem)")
            image = load_image(path)
            if args.tile == 0:  # one tile covering the whole image
                tile = max(image.shape[:2] if isinstance(image, np.ndarray) else image.size)
            result = upscale(image, model, tile=tile)
            save_png(result, target)
            written[target.resolve()] = path
        except Exception as err:  # one bad file must not stop the batch
            failed += 1
            tqdm.write(f"error: {path}: {err}", file=sys.stderr)
    bar.close()
    print(f"{len(written)} written to {out_dir}, {failed} failed, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
