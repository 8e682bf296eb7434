"""Exact tiled inference and the image formats of ``upscale``."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

import addersr.inference as inference
from addersr.data import imresize
from addersr.inference import auto_tile, forward_tiled, upscale
from addersr.models import build
from addersr.nn import PowerActivation

SMALL = {"vdsr": {"depth": 5, "n_feats": 8}, "edsr-baseline": {"n_blocks": 2, "n_feats": 8},
         "edsr": {"n_blocks": 2, "n_feats": 8}}


def _calibrated(name, scale, op):
    """A small model whose BN statistics come from data (untrained eval-mode BN would let
    adder outputs grow into the thousands) and whose power activations are not identities."""
    model = build(name, scale, op, **SMALL[name])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
        if isinstance(m, PowerActivation):
            m.alpha.data.fill_(0.9)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 12, 12))
    return model.eval()


@pytest.mark.parametrize("op", ["adder", "conv"])
@pytest.mark.parametrize("name,scale", [("vdsr", 3), ("edsr-baseline", 3), ("edsr", 2), ("edsr-baseline", 4)])
def test_tiled_equals_untiled(name, scale, op):
    model = _calibrated(name, scale, op)
    lr = torch.rand(2, 3, 17, 13)
    with torch.no_grad():
        full = model(lr)
    calls = []
    tiled = forward_tiled(model, lr, tile=(6, 5), progress=lambda d, t: calls.append((d, t)))
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)
    assert calls == [(i, 9) for i in range(1, 10)]
    # the overlap matters: without enough context the seams show
    short = forward_tiled(model, lr, tile=(6, 5), overlap=1)
    assert (short - full).abs().max() > 1e-3


def test_forward_tiled_options_and_errors():
    model = _calibrated("edsr-baseline", 2, "conv")
    model.train()
    lr = torch.rand(1, 3, 9, 11)

    class Bar:  # tqdm-like
        total, n = None, 0

        def update(self, k):
            self.n += k

    bar = Bar()
    out = forward_tiled(model, lr, 4, progress=bar)
    assert model.training, "the training flag must be restored"
    assert bar.total == 9 and bar.n == 9
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(lr), rtol=1e-5, atol=1e-5)
    assert torch.equal(forward_tiled(model, lr, 64), forward_tiled(model, lr, (9, 11)))
    for bad in (0, -3, (4,), 2.5, True):
        with pytest.raises(ValueError, match="tile"):
            forward_tiled(model, lr, bad)
    with pytest.raises(ValueError, match="overlap"):
        forward_tiled(model, lr, 4, overlap=-1)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        forward_tiled(model, lr[0], 4)


def test_auto_tile_bounds_memory_for_4k():
    with torch.device("meta"):
        big = build("edsr", 4, "adder")
        base = build("edsr-baseline", 4, "adder")
    assert auto_tile(base, (64, 64)) is None  # small images run whole
    for model in (big, base):
        t = auto_tile(model, (2160, 3840))
        assert t is not None and 16 <= t < 2160 and t % 16 == 0
    # the baseline's activations are four times smaller, so its tiles are larger
    assert auto_tile(base, (2160, 3840)) > auto_tile(big, (2160, 3840))
    assert auto_tile(base, (2160, 3840), budget=1 << 28) < auto_tile(base, (2160, 3840))


# ----------------------------------------------------------------------------- image formats

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _calibrated("edsr-baseline", 2, "conv")


def _expected(model, rgb01):
    """Reference: the model on the whole float image, channels last, unclamped."""
    x = torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model(x)[0].permute(1, 2, 0).numpy().astype(np.float64)


def _quantised(values, maxv):
    return np.floor(np.clip(values, 0, 1) * maxv + 0.5)


def _rgb(h=9, w=11, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_pil_and_numpy(model):
    arr = _rgb()
    out = upscale(Image.fromarray(arr), model)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (22, 18)
    expected = _quantised(_expected(model, arr / 255.0), 255)
    got = np.asarray(out).astype(np.float64)
    assert np.abs(got - expected).max() <= 1 and (got == expected).mean() > 0.99
    out_np = upscale(arr, model)
    assert out_np.dtype == np.uint8 and np.array_equal(out_np, np.asarray(out))


def test_tiled_upscale_matches_whole(model):
    arr = _rgb(21, 17, seed=3)
    whole = upscale(arr, model)
    tiled = upscale(arr, model, tile=5)
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_automatic_tiling_is_used_for_large_images(model, monkeypatch):
    monkeypatch.setattr(inference, "TILE_BUDGET_BYTES", 200_000)
    arr = _rgb(80, 72, seed=4)
    seen = []
    tiled = upscale(arr, model, progress=lambda d, t: seen.append(t))
    assert seen and seen[0] > 1
    monkeypatch.undo()
    diff = np.abs(upscale(arr, model).astype(int) - tiled.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_check_tile_floor():
    for ok in (None, 0, inference.MIN_TILE, 500):
        inference.check_tile(ok)
    for bad in (1, inference.MIN_TILE - 1, -3):
        with pytest.raises(ValueError, match=f"at least {inference.MIN_TILE} pixels"):
            inference.check_tile(bad)


def _rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_memory_is_the_output_plus_one_tile():
    """Only one tile at a time is in floating point: upscaling a 2048x2048 image in tiles
    of 128 raises the peak resident memory by little more than the uint8 output (a float
    copy of the whole input would add 4 bytes per input value, twice the output's size)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.PixelShuffle(2))
    model.scale = 2
    arr = _rgb(2048, 2048, seed=6)
    upscale(arr[:200, :200], model, tile=128)  # warm-up: thread pools, allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _rss("VmRSS")
    out = upscale(arr, model, tile=128)
    growth = _rss("VmHWM") - before
    assert growth < 1.75 * out.nbytes, (growth / 2**20, out.nbytes / 2**20)


def test_rgba_tiled_equals_whole(model):
    rgba = np.dstack([_rgb(70, 75, seed=7), np.random.default_rng(8).integers(0, 256, (70, 75))])
    rgba = rgba.astype(np.uint8)
    whole, tiled = upscale(rgba, model), upscale(rgba, model, tile=64)
    np.testing.assert_array_equal(whole[..., 3], tiled[..., 3])
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1


def test_grayscale(model):
    gray = _rgb()[..., 0]
    out = upscale(Image.fromarray(gray), model)
    assert out.mode == "L" and out.size == (22, 18)
    rgb = np.repeat(gray[..., None], 3, axis=2) / 255.0
    expected = _quantised(_expected(model, rgb).mean(2), 255)
    assert np.abs(np.asarray(out) - expected).max() <= 1
    assert upscale(gray, model).shape == (18, 22)
    assert upscale(gray[..., None], model).shape == (18, 22, 1)


def test_rgba_alpha_is_bicubic(model):
    arr = _rgb()
    alpha = np.random.default_rng(1).integers(0, 256, arr.shape[:2], dtype=np.uint8)
    out = upscale(Image.fromarray(np.dstack([arr, alpha])), model)
    assert out.mode == "RGBA"
    got = np.asarray(out)
    assert np.array_equal(got[..., :3], upscale(arr, model))
    expected_alpha = _quantised(imresize(alpha / 255.0, 2), 255)
    assert np.abs(got[..., 3] - expected_alpha).max() <= 1
    la = upscale(Image.fromarray(np.dstack([arr[..., 0], alpha])), model)
    assert la.mode == "LA" and np.array_equal(np.asarray(la)[..., 1], got[..., 3])


def test_16_bit_keeps_its_precision(model, tmp_path):
    rng = np.random.default_rng(2)
    gray16 = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    image = Image.open(tmp_path / "g16.png")
    assert image.mode == "I;16"
    out = upscale(image, model)
    assert out.mode == "I;16"
    got = np.asarray(out).astype(np.float64)
    rgb = np.repeat(gray16[..., None], 3, axis=2) / 65535.0
    expected = _quantised(_expected(model, rgb).mean(2), 65535)
    assert np.abs(got - expected).max() <= 2
    assert (got % 257 != 0).mean() > 0.9  # not 8-bit values stretched to 16 bits

    rgb16 = rng.integers(0, 65536, (7, 6, 3), dtype=np.uint16)
    out16 = upscale(rgb16, model)
    assert out16.dtype == np.uint16 and out16.shape == (14, 12, 3)
    expected = _quantised(_expected(model, rgb16 / 65535.0), 65535)
    assert np.abs(out16 - expected).max() <= 2

    out_i = upscale(Image.fromarray(gray16.astype(np.int32)), model)
    assert out_i.mode == "I" and np.abs(np.asarray(out_i) - np.asarray(out).astype(np.int32)).max() == 0


def test_palette_and_float(model):
    arr = _rgb()
    palette = Image.fromarray(arr).quantize(16)
    assert palette.mode == "P"
    out = upscale(palette, model)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), upscale(np.asarray(palette.convert("RGB")), model))
    palette.info["transparency"] = 0
    assert upscale(palette, model).mode == "RGBA"

    f = (arr / 255.0).astype(np.float32)
    out_f = upscale(f, model)
    assert out_f.dtype == np.float32 and out_f.min() >= 0 and out_f.max() <= 1
    np.testing.assert_allclose(out_f, np.clip(_expected(model, f), 0, 1), atol=1e-5)


def test_upscale_errors(model):
    with pytest.raises(ValueError, match="dtype"):
        upscale(np.zeros((4, 4, 3), dtype=np.int64), model)
    with pytest.raises(ValueError, match="shape"):
        upscale(np.zeros((4, 4, 5), dtype=np.uint8), model)
    with pytest.raises(ValueError, match="mode 'F'"):
        upscale(Image.fromarray(np.zeros((4, 4), dtype=np.float32)), model)
    with pytest.raises(ValueError, match="PIL image or a numpy array"):
        upscale(torch.zeros(3, 4, 4), model)
