"""PSNR / SSIM / LPIPS of addersr.metrics: hand-computed values and the Y protocol."""

import math
import warnings

import numpy as np
import pytest
import torch

from addersr import metrics
from addersr.metrics import lpips, psnr, rgb_to_y, ssim


def test_psnr_hand_computed_gray():
    hr = np.full((4, 4), 100, np.uint8)
    sr = hr.copy()
    sr[1, 2] = 110  # MSE = 100 / 16 = 6.25 -> 10 log10(65025 / 6.25) = 10 log10(10404)
    assert psnr(sr, hr) == pytest.approx(10 * math.log10(10404), abs=1e-12)
    assert psnr(sr, hr) == pytest.approx(40.17200, abs=1e-5)


def test_psnr_rgb_uses_unrounded_y():
    hr = np.full((6, 5, 3), 50, np.uint8)
    sr = hr.copy()
    sr[..., 0] += 10  # Y changes by 65.481 * 10 / 255 = 2.5679 everywhere
    dy = 65.481 * 10 / 255
    assert psnr(sr, hr) == pytest.approx(20 * math.log10(255 / dy), abs=1e-10)
    assert rgb_to_y(np.array([[[255, 255, 255]]], np.uint8))[0, 0] == pytest.approx(235.0)
    assert rgb_to_y(np.array([[[0, 0, 0]]], np.uint8))[0, 0] == pytest.approx(16.0)


def test_gray_is_scored_on_its_own_values():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-9, 10, hr.shape), 0, 255).astype(np.uint8)
    gray = psnr(sr, hr)
    assert gray == pytest.approx(10 * math.log10(255 ** 2 / np.mean((sr - hr.astype(float)) ** 2)))
    # the same image as RGB is scored on Y = 16 + 219/255 v: errors shrink by 219/255
    rgb = psnr(np.repeat(sr[..., None], 3, 2), np.repeat(hr[..., None], 3, 2))
    assert rgb - gray == pytest.approx(-20 * math.log10(219 / 255), abs=1e-9)
    assert psnr(sr[..., None], hr[..., None]) == pytest.approx(gray)  # HxWx1 is gray too


def test_crop_border():
    hr = np.full((16, 16), 80, np.uint8)
    sr = hr.copy()
    sr[0, :] = 90
    sr[:, -2] = 70
    assert math.isfinite(psnr(sr, hr, 1))
    assert psnr(sr, hr, 2) == math.inf
    assert ssim(sr, hr, 2) == 1.0 and ssim(sr, hr, 1) < 1.0
    inner = psnr(sr, hr, 1)  # 14x14 left, one column of 14 pixels off by 10
    assert inner == pytest.approx(10 * math.log10(255 ** 2 / (14 * 100 / 196)))


def test_identical_images():
    img = np.random.default_rng(1).integers(0, 256, (32, 30, 3), dtype=np.uint8)
    assert psnr(img, img, 2) == math.inf
    assert ssim(img, img, 2) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_images_hand_computed():
    # no variance: SSIM = (2 p q + C1) / (p^2 + q^2 + C1) with C1 = (0.01 * 255)^2
    p, q, c1 = 100.0, 110.0, 6.5025
    value = ssim(np.full((15, 17), 110, np.uint8), np.full((15, 17), 100, np.uint8))
    assert value == pytest.approx((2 * p * q + c1) / (p * p + q * q + c1), abs=1e-12)


def test_ssim_matches_skimage_gaussian_valid():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(2)
    hr = rng.integers(0, 256, (41, 37, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-30, 31, hr.shape), 0, 255).astype(np.uint8)
    a, b = rgb_to_y(sr)[3:-3, 3:-3], rgb_to_y(hr)[3:-3, 3:-3]
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255)
    assert ssim(sr, hr, 3) == pytest.approx(ref, abs=1e-12)
    assert ssim(hr, sr, 3) == pytest.approx(ref, abs=1e-12)


def test_ssim_window_is_gaussian_11x11_sigma_1_5():
    # a single bright pixel in the middle of a 11x11 image: the one 'valid' window sees it
    # with weight g(0)^2, g = normalised exp(-x^2 / 4.5), x = -5..5
    g = np.exp(-np.arange(-5, 6) ** 2 / 4.5)
    g /= g.sum()
    hr = np.zeros((11, 11), np.uint8)
    sr = hr.copy()
    sr[5, 5] = 200
    w = g[5] ** 2
    mu = 200 * w
    var = 200 ** 2 * w - mu ** 2
    c1, c2 = 6.5025, 58.5225
    assert ssim(sr, hr) == pytest.approx(c1 / (mu * mu + c1) * c2 / (var + c2), rel=1e-12)


def test_errors():
    a = np.zeros((20, 20), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, np.zeros((20, 21), np.uint8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a, 5)
    with pytest.raises(ValueError, match="HxW or HxWx3"):
        psnr(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="nothing left"):
        psnr(a, a, 10)


@pytest.fixture
def lpips_state(monkeypatch, tmp_path):
    """An empty torch hub cache and a fresh LPIPS module state."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    monkeypatch.setattr(metrics, "_LPIPS", {})
    monkeypatch.setattr(metrics, "_LPIPS_WARNED", False)
    return tmp_path / "hub" / "checkpoints"


def test_lpips_without_backbone_weights_warns_once_and_returns_none(lpips_state):
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.warns(RuntimeWarning, match="LPIPS unavailable"):
        assert lpips(img, img) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lpips(img, img) is None  # no second warning


def test_lpips_with_cached_backbone(lpips_state):
    # stand-in AlexNet weights in the hub cache (the real ones need a download)
    from torchvision.models import AlexNet_Weights, alexnet

    lpips_state.mkdir(parents=True)
    torch.save(alexnet().state_dict(), lpips_state / AlexNet_Weights.IMAGENET1K_V1.url.split("/")[-1])
    rng = np.random.default_rng(3)
    hr = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-40, 41, hr.shape), 0, 255).astype(np.uint8)
    assert lpips(hr, hr) == pytest.approx(0.0, abs=1e-6)
    assert lpips(sr, hr) > 0
    assert isinstance(lpips(sr[..., 0], hr[..., 0]), float)
