"""Image quality metrics with the protocol of the SR literature (DESIGN.md section 3).

PSNR and SSIM are computed on uint8 images: RGB images on their luma
``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` in float64 (not rounded), grayscale
images on their own values; ``crop_border`` pixels are removed from every side. SSIM is
MATLAB's ``ssim_index``: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255,
mean over the 'valid' region. LPIPS (AlexNet) needs torchvision's AlexNet weights in the
torch hub cache; without them it returns None (the package never downloads).
"""

import math
import warnings
from pathlib import Path

import numpy as np
from numba import njit

__all__ = ["lpips", "psnr", "rgb_to_y", "ssim"]

_WINDOW = 11
SSIM_WINDOW = _WINDOW  # the least side an image needs after cropping, for SSIM
_SIGMA = 1.5


def rgb_to_y(img):
    """Luma of an ``HxWx3`` RGB image (0..255 scale) in float64, not rounded."""
    img = np.asarray(img)
    if img.ndim < 1 or img.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (last axis 3), got shape {img.shape}")
    return 16.0 + (img.astype(np.float64) @ np.array([65.481, 128.553, 24.966])) / 255.0


def _prepare(sr, hr, crop_border):
    """The evaluated channel of both images (float64, cropped)."""
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")
    if sr.ndim == 3 and sr.shape[2] == 1:
        sr, hr = sr[..., 0], hr[..., 0]
    if sr.ndim == 3 and sr.shape[2] == 3:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    elif sr.ndim == 2:
        sr, hr = sr.astype(np.float64), hr.astype(np.float64)
    else:
        raise ValueError(f"expected HxW or HxWx3 images, got shape {sr.shape}")
    crop = int(crop_border)
    if crop < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop:
        sr, hr = sr[crop:-crop, crop:-crop], hr[crop:-crop, crop:-crop]
    if sr.size == 0:
        raise ValueError(f"nothing left after cropping {crop} px from a {np.shape(hr)} image")
    return sr, hr


def psnr(sr, hr, crop_border=0):
    """PSNR in dB, ``10 log10(255^2 / MSE)``; inf for identical images."""
    a, b = _prepare(sr, hr, crop_border)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def _gaussian_window():
    x = np.arange(_WINDOW, dtype=np.float64) - (_WINDOW - 1) / 2
    g = np.exp(-(x * x) / (2 * _SIGMA ** 2))
    return g / g.sum()  # the 2-D window is the outer product, which is normalised too


@njit(cache=True, nogil=True)
def _ssim_mean(a, b, g, c1, c2):
    """Mean SSIM map over the 'valid' region of the separable window ``g x g``."""
    k = g.shape[0]
    rows, cols = a.shape[0] - k + 1, a.shape[1] - k + 1
    width = a.shape[1]
    col = np.zeros((5, width))  # vertical pass of one output row: a, b, aa, bb, ab
    win = np.zeros((5, cols))   # then horizontal pass
    total = 0.0
    for i in range(rows):
        col[:] = 0.0
        for t in range(k):
            gt = g[t]
            for j in range(width):
                x = a[i + t, j]
                y = b[i + t, j]
                col[0, j] += gt * x
                col[1, j] += gt * y
                col[2, j] += gt * (x * x)
                col[3, j] += gt * (y * y)
                col[4, j] += gt * (x * y)
        win[:] = 0.0
        for t in range(k):
            gt = g[t]
            for m in range(5):
                for j in range(cols):
                    win[m, j] += gt * col[m, j + t]
        for j in range(cols):
            mu_a, mu_b = win[0, j], win[1, j]
            mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
            num = (2.0 * mu_ab + c1) * (2.0 * (win[4, j] - mu_ab) + c2)
            den = (mu_aa + mu_bb + c1) * ((win[2, j] - mu_aa) + (win[3, j] - mu_bb) + c2)
            total += num / den
    return total / (rows * cols)


def ssim(sr, hr, crop_border=0):
    """Mean SSIM (MATLAB ``ssim_index``, Gaussian window, 'valid' region); 1.0 if identical."""
    a, b = _prepare(sr, hr, crop_border)
    if min(a.shape) < _WINDOW:
        raise ValueError(f"SSIM needs at least {_WINDOW}x{_WINDOW} pixels after cropping, "
                         f"got {a.shape[0]}x{a.shape[1]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(_ssim_mean(np.ascontiguousarray(a), np.ascontiguousarray(b),
                            _gaussian_window(), c1, c2))


_LPIPS = {}
_LPIPS_WARNED = False


def _alexnet_cached():
    """Whether torchvision's AlexNet weights are in the torch hub cache (no download)."""
    import torch
    from torchvision.models import AlexNet_Weights

    name = Path(AlexNet_Weights.IMAGENET1K_V1.url).name
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def _lpips_model(device):
    global _LPIPS_WARNED
    key = str(device)
    if key in _LPIPS:
        return _LPIPS[key]
    if not _alexnet_cached():
        if not _LPIPS_WARNED:
            warnings.warn("LPIPS unavailable: torchvision's AlexNet weights are not in the torch "
                          "hub cache and nothing is downloaded at run time; LPIPS is left empty",
                          RuntimeWarning, stacklevel=3)
            _LPIPS_WARNED = True
        return None
    import lpips as lpips_package

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips_package.LPIPS(net="alex", verbose=False).to(device).eval()
    _LPIPS[key] = model
    return model


def lpips(sr, hr, crop_border=0, device="cpu"):
    """LPIPS distance (AlexNet, v0.1) of two uint8 RGB or gray images; None if unavailable.

    Gray images are replicated to three channels. Lower is better; 0 for identical images.
    """
    import torch

    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"image shapes differ: {sr.shape} vs {hr.shape}")
    if sr.ndim == 2:
        sr, hr = np.repeat(sr[..., None], 3, axis=2), np.repeat(hr[..., None], 3, axis=2)
    if sr.ndim != 3 or sr.shape[2] != 3:
        raise ValueError(f"expected HxW or HxWx3 images, got shape {sr.shape}")
    crop = int(crop_border)
    if crop:
        sr, hr = sr[crop:-crop, crop:-crop], hr[crop:-crop, crop:-crop]
    model = _lpips_model(device)
    if model is None:
        return None

    def tensor(img):
        t = torch.from_numpy(np.ascontiguousarray(img)).to(device=device, dtype=torch.float32)
        return (t.permute(2, 0, 1)[None] / 127.5) - 1.0

    with torch.no_grad():
        return float(model(tensor(sr), tensor(hr)).item())
