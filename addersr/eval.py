"""The evaluation protocol of DESIGN.md section 3; training validation and the bench use it.

For every HR image: crop it at the right/bottom to a multiple of the scale, make the LR
image with MATLAB bicubic ``imresize(HR, 1/scale)`` (uint8), super-resolve it, clamp and
round the result to uint8, and score it against the cropped HR with
:mod:`addersr.metrics` (``crop_border = scale``; RGB images on Y, gray ones on their
own values). The bicubic baseline is ``imresize(LR, scale)`` on the uint8 image.

Models take an RGB batch in [0, 1]. A grayscale image is fed to a model replicated to
three channels, and the mean of the output's channels (before rounding) is its gray SR
image, as :func:`addersr.inference.upscale` does; the gray image is thus still scored on
its own values.
"""

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics
from .data import imresize, list_images, read_image
from .images import ImageError, save_png

__all__ = ["crop_to_scale", "evaluate", "load_images", "make_pair", "super_resolve", "to_uint8",
           "unscorable"]

def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _check_image(img):
    img = np.asarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"expected a uint8 HxW or HxWx3 image, got {img.dtype} {img.shape}")
    return img


def crop_to_scale(hr, scale):
    """``hr`` cropped at the right and bottom to a multiple of ``scale``."""
    hr, scale = _check_image(hr), _check_scale(scale)
    h, w = hr.shape[0] - hr.shape[0] % scale, hr.shape[1] - hr.shape[1] % scale
    if h == 0 or w == 0:
        raise ValueError(f"a {hr.shape[0]}x{hr.shape[1]} image is smaller than the scale {scale}")
    return hr[:h, :w]


def unscorable(shape, scale):
    """Why an HR image of ``shape`` (height, width, ...) cannot be scored at ``scale``, or
    None: smaller than the scale, or less than SSIM's window left after the border crop."""
    h, w = shape[0] - shape[0] % scale, shape[1] - shape[1] % scale
    left = min(h, w) - 2 * scale
    if left >= metrics.SSIM_WINDOW:
        return None
    size = f"{shape[1]}x{shape[0]}"
    if h == 0 or w == 0:
        return f"a {size} image is smaller than the scale {scale}"
    return (f"a {size} image keeps {max(left, 0)} pixels on its short side after the x{scale} "
            f"border crop; SSIM needs {metrics.SSIM_WINDOW}")


def make_pair(hr, scale):
    """``(lr, hr_cropped)``: the uint8 LR image (MATLAB bicubic) and the HR it came from."""
    hr = crop_to_scale(hr, scale)
    return imresize(hr, 1 / scale), hr


def to_uint8(sr):
    """A model output in [0, 1], ``(1, C, H, W)`` or ``(C, H, W)``, as uint8 numpy.

    Clamped to [0, 255] and rounded half up; ``HxWx3`` for three channels, ``HxW`` for one.
    """
    if not isinstance(sr, torch.Tensor) or not sr.is_floating_point():
        raise ValueError("to_uint8 expects a floating-point torch tensor")
    if sr.dim() == 4:
        if sr.shape[0] != 1:
            raise ValueError(f"to_uint8 expects one image, got a batch of {sr.shape[0]}")
        sr = sr[0]
    if sr.dim() != 3 or sr.shape[0] not in (1, 3):
        raise ValueError(f"to_uint8 expects (C, H, W) with C = 1 or 3, got {tuple(sr.shape)}")
    img = torch.floor((sr.detach().double() * 255.0).clamp(0.0, 255.0) + 0.5)
    img = img.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return img[..., 0] if img.shape[2] == 1 else img


def _self_ensemble(forward, x):
    """Mean of ``forward`` over the 8 flips/rotations of ``x``, each transformed back."""
    total = None
    for flip in (False, True):
        for k in range(4):
            t = torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))
            y = torch.rot90(forward(t), -k, (-2, -1))
            y = y.flip(-1) if flip else y
            total = y if total is None else total + y
    return total / 8


def _is_bicubic(model):
    return isinstance(model, str) and model.lower() == "bicubic"


def _model_device(model):
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def super_resolve(model, lr, scale, tile=None, self_ensemble=False):
    """Super-resolve one uint8 LR image (``HxW`` or ``HxWx3``) with ``model`` or "bicubic".

    Returns uint8 of the same layout, ``scale`` times larger. A model runs on its own
    device; ``tile`` uses exact tiling (:func:`addersr.inference.forward_tiled`);
    ``self_ensemble`` averages the 8 flips/rotations. Bicubic ignores both.
    """
    lr, scale = _check_image(lr), _check_scale(scale)
    if _is_bicubic(model):
        return imresize(lr, scale)
    gray = lr.ndim == 2
    device = _model_device(model)
    x = torch.from_numpy(np.ascontiguousarray(lr)).to(device)
    x = (x[None, None] if gray else x.permute(2, 0, 1)[None]).float() / 255.0
    if gray:
        x = x.repeat(1, 3, 1, 1)

    def forward(t):
        if tile:
            from .inference import forward_tiled
            return forward_tiled(model, t, tile, overlap=None, progress=None)
        return model(t)

    with torch.no_grad():
        y = _self_ensemble(forward, x) if self_ensemble else forward(x)
    if y.shape[-2:] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise ValueError(f"the model returned {tuple(y.shape)} for a {lr.shape[0]}x{lr.shape[1]} "
                         f"input; expected x{scale}")
    if gray:
        y = y.mean(1, keepdim=True)
    return to_uint8(y)


def load_images(images_or_folder, on_error=None):
    """``[(name, uint8 image)]`` from a folder, or from a list of paths, arrays or
    ``(name, array)`` pairs.

    ``on_error(err)``: called with the :class:`~addersr.images.ImageError` of each file
    that cannot be read, which is then left out; without it the error is raised.
    """
    sources = images_or_folder
    if isinstance(images_or_folder, (str, Path)):
        sources = list_images(images_or_folder)
        if not sources:
            raise FileNotFoundError(f"no images in {images_or_folder}")
    items = []
    for i, item in enumerate(sources):
        if isinstance(item, (str, Path)):
            try:
                items.append((Path(item).stem, read_image(item)))
            except ImageError as err:
                if on_error is None:
                    raise
                on_error(err)
        elif isinstance(item, tuple) and len(item) == 2:
            items.append((str(item[0]), _check_image(item[1])))
        else:
            items.append((f"image_{i:03d}", _check_image(item)))
    if not items:
        raise ValueError("no images to evaluate")
    return items


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model, images_or_folder, scale, device=None, tile=None, self_ensemble=False,
             lpips=False, progress=True, desc=None, save_dir=None):
    """Score ``model`` (a network or "bicubic") on HR images at ``scale``.

    ``images_or_folder``: a folder of HR images, or a list of paths, uint8 arrays or
    ``(name, array)`` pairs. ``device``: where a network runs (default: where it is; it is
    moved there if needed, and evaluated in eval mode, its mode restored afterwards).
    ``lpips``: also compute LPIPS (None when its weights are unavailable). ``save_dir``:
    write the SR images there as PNG. Returns ``dict(psnr, ssim, lpips,
    seconds_per_image, images, mean_size, per_image=[{name, psnr, ssim[, lpips]}])``;
    ``seconds_per_image`` times only the super-resolution step, ``mean_size`` is the mean
    (height, width) of the cropped HR images.
    """
    scale = _check_scale(scale)
    items = load_images(images_or_folder)
    bicubic = _is_bicubic(model)
    if isinstance(model, str) and not bicubic:
        raise ValueError(f"model must be a network or 'bicubic', got {model!r}")
    was_training = False
    run_device = torch.device("cpu")
    if not bicubic:
        if getattr(model, "scale", scale) != scale:
            raise ValueError(f"the model is for scale x{model.scale}, not x{scale}")
        if device is not None and torch.device(device) != _model_device(model):
            model.to(device)
        run_device = _model_device(model)
        was_training = model.training
        model.eval()
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    per_image, seconds, sizes = [], 0.0, []
    try:
        for name, hr in tqdm(items, desc=desc or f"x{scale}", unit="img", leave=False,
                             disable=not progress):
            lr, hr = make_pair(hr, scale)
            _sync(run_device)
            start = time.perf_counter()
            sr = super_resolve(model, lr, scale, tile=tile, self_ensemble=self_ensemble)
            _sync(run_device)
            seconds += time.perf_counter() - start
            row = {"name": name, "psnr": metrics.psnr(sr, hr, scale),
                   "ssim": metrics.ssim(sr, hr, scale)}
            if lpips:
                row["lpips"] = metrics.lpips(sr, hr, crop_border=scale, device=run_device)
            per_image.append(row)
            sizes.append(hr.shape[:2])
            if save_dir is not None:
                save_png(sr, save_dir / f"{name}.png")
    finally:
        if was_training:
            model.train()
    lpips_values = [r.get("lpips") for r in per_image]
    n = len(per_image)
    return {
        "psnr": float(np.mean([r["psnr"] for r in per_image])),
        "ssim": float(np.mean([r["ssim"] for r in per_image])),
        "lpips": float(np.mean(lpips_values)) if lpips and None not in lpips_values else None,
        "seconds_per_image": seconds / n,
        "images": n,
        "mean_size": tuple(float(v) for v in np.mean(sizes, axis=0)),
        "per_image": per_image,
    }
