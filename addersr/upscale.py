"""Batch upscaling: ``python -m addersr.upscale INPUT... -o OUT [--weights NAME|PATH]``.

INPUT may be image files, folders (their images, not recursive) or glob patterns. Each
result is written as ``OUT/<stem>_x<scale>.png`` with the input's mode kept (gray, RGB,
RGBA, 8 or 16 bits per channel), through a temporary file renamed when complete. The
output folder is created and checked before any work. Images whose output would exceed
``--max-pixels`` (default ``DEFAULT_MAX_PIXELS``) are refused from their header, before
decoding; every image shows a progress bar of its tiles with an estimate of the time
left. A file that fails is reported on stderr and the others go on (a full or read-only
disk stops the batch); the exit status is 1 when any file failed. Inputs are never
overwritten.
"""

import argparse
import errno
import glob
import sys
import time
from pathlib import Path

from PIL import Image

from . import signals
from .device import DeviceError, resolve
from .files import OutputError, prepare_output_dir, reason
from .images import ImageError, ImageTooLarge, check_size, load_image, save_png
from .inference import MIN_TILE, check_tile, upscale
from .memory import keep_freed_memory

__all__ = ["DEFAULT_MAX_PIXELS", "main", "output_name", "upscale"]

_GLOB_CHARS = set("*?[")
# Largest output accepted by default: 64 megapixels (e.g. 4000x4000 enlarged to 8000x8000
# at x2: 192 MB as 8-bit RGB; about 13 minutes with the shipped model on a 2-core CPU).
DEFAULT_MAX_PIXELS = 64_000_000
# Write errors after which no later file can be written either.
_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


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


def _load_model(weights, device, precision="fp32", scale=None):
    from .models import list_weights, load, trained_scales

    if weights is None:
        shipped = [w for w in list_weights() if precision == "fp32" or w[1]["op"] == "adder"]
        if not shipped:
            raise ValueError("no trained weights ship with this installation; "
                             "pass --weights PATH to a NAME.safetensors file")
        if scale is not None:  # the first shipped weights trained for that scale
            shipped = [w for w in shipped if scale in trained_scales(w[1])] or shipped
        weights = shipped[0][0]
    return load(weights, device=device, precision=precision, scale=scale)


def _pixels(text):
    """``--max-pixels``: a positive number of output pixels (``100000000`` or ``1e8``)."""
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {text!r}")
    return value


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
                   help=f"tile size in input pixels for exact tiled inference, at least {MIN_TILE} "
                        "(default: tiles only when the image would not fit in memory; "
                        "0: never tile)")
    p.add_argument("--max-pixels", type=_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse images whose output would have more pixels than this "
                        f"(default {DEFAULT_MAX_PIXELS}: {DEFAULT_MAX_PIXELS / 1e6:.0f} "
                        "megapixels; 1e8 is accepted)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8: 8-bit adder layers on the CPU (adder weights with NAME.int8.json)")
    p.add_argument("--scale", type=int, default=None, metavar="S",
                   help="enlargement: one of the scales the weights were trained for (multi-scale "
                        "VDSR weights serve several; default: their recorded scale)")
    return p


def _upscale_file(path, model, args, bar):
    """Read, size-check and upscale one file, its tiles counted on the tqdm ``bar``."""
    check_size(path, model.scale, args.max_pixels)
    image = load_image(path)
    tile = args.tile or None
    if args.tile == 0:  # one tile covering the whole image
        tile = max(image.size if isinstance(image, Image.Image) else image.shape[:2])
    return upscale(image, model, tile=tile, progress=bar)


def _batch(images, files, model, args, out_dir, written, failures):
    """Upscale ``files`` (iterated through the tqdm ``images``) into ``out_dir``: each result
    recorded in ``written`` (output -> input), each file that fails in ``failures``."""
    from tqdm import tqdm

    inputs = {p.resolve() for p in files}
    for done, path in enumerate(images):
        target = out_dir / output_name(path, model.scale)
        try:
            if target.resolve() in inputs:
                raise ValueError(f"refusing to overwrite the input file {target}")
            if target.resolve() in written:
                raise ValueError(f"{target} is already the output of {written[target.resolve()]} "
                                 "(two inputs share the stem)")
            with tqdm(desc=path.name, unit="tile", file=sys.stderr, leave=False,
                      mininterval=0) as tiles:  # every tile shown, with the time left
                result = _upscale_file(path, model, args, tiles)
        except ImageError as err:  # its message names the file
            failures.append(path)
            hint = "; allow more with --max-pixels N" if isinstance(err, ImageTooLarge) else ""
            tqdm.write(f"error: {err}{hint}", file=sys.stderr)
            continue
        except Exception as err:  # one bad file must not stop the batch
            failures.append(path)
            tqdm.write(f"error: {path}: {err}", file=sys.stderr)
            continue
        try:
            save_png(result, target)
        except OSError as err:
            failures.append(path)
            tqdm.write(f"error: cannot write {target}: {reason(err)}", file=sys.stderr)
            if err.errno in _DISK_ERRORS:
                failures.extend(files[done + 1:])
                tqdm.write(f"error: stopping: no further file can be written to {out_dir}",
                           file=sys.stderr)
                break
            continue
        written[target.resolve()] = path


def main(argv=None):
    """Run the CLI; returns the exit status (0 ok, 1 some files failed, 2 bad arguments)."""
    from tqdm import tqdm

    args = _parser().parse_args(argv)
    try:
        check_tile(args.tile)
    except ValueError as err:
        print(f"error: --tile: {err}", file=sys.stderr)
        return 2
    # our own limit replaces Pillow's decompression-bomb guard when it is the larger one
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, args.max_pixels)
    files, missing = _expand(args.inputs)
    for arg in missing:
        print(f"error: {arg}: no such image file, folder or matching file", file=sys.stderr)
    if not files:
        print("error: no input images", file=sys.stderr)
        return 2
    try:
        out_dir = prepare_output_dir(args.output)
    except OutputError as err:
        print(f"error: -o: {err}", file=sys.stderr)
        return 2
    try:
        device = resolve(args.device)
    except DeviceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        model = _load_model(args.weights, device, args.precision, args.scale)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: cannot load weights: {err}", file=sys.stderr)
        return 2
    written, failed = {}, len(missing)
    start = time.perf_counter()
    images = tqdm(files, unit="image", file=sys.stderr, desc=f"x{model.scale}")
    stopped, failures = None, []
    with signals.interruptible():  # Ctrl-C, SIGTERM: the files written stay, complete
        try:
            _batch(images, files, model, args, out_dir, written, failures)
        except KeyboardInterrupt:
            stopped = signals.received()
    failed += len(failures)
    images.close()
    print(f"{len(written)} written to {out_dir}, {failed} failed, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    if stopped:
        print(f"interrupted by {signals.name(stopped)}: {len(files) - len(written) - len(failures)} "
              "images not done (no partial file is left)", file=sys.stderr)
        return signals.exit_status(stopped)
    return 1 if failed else 0


if __name__ == "__main__":
    keep_freed_memory()  # many large passes: keep their memory instead of faulting it in again
    sys.exit(main())
