"""MATLAB bicubic imresize: sizes, exact values, uint8 rounding, numpy/torch agreement."""

import math

import numpy as np
import pytest
import torch

from addersr.data import imresize


def _cubic(x):
    x = abs(x)
    if x <= 1:
        return 1.5 * x ** 3 - 2.5 * x ** 2 + 1
    if x <= 2:
        return -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2
    return 0.0


def _reference_1d(signal, scale):
    """MATLAB's contributions written out pixel by pixel from the DESIGN.md text."""
    n_in = len(signal)
    n_out = math.ceil(n_in * scale)
    width = 4 / scale if scale < 1 else 4
    out = []
    for x in range(1, n_out + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + p for p in range(math.ceil(width) + 2)]
        if scale < 1:
            w = [scale * _cubic(scale * (u - j)) for j in taps]
        else:
            w = [_cubic(u - j) for j in taps]
        total = sum(w)
        out.append(sum(wi / total * signal[min(max(j, 1), n_in) - 1] for wi, j in zip(w, taps)))
    return out


def _reference(img, scale):
    rows = np.array([_reference_1d(list(img[:, c]), scale) for c in range(img.shape[1])]).T
    return np.array([_reference_1d(list(rows[r]), scale) for r in range(rows.shape[0])])


def _round(x):
    return np.clip(np.floor(x + 0.5), 0, 255)


@pytest.mark.parametrize("shape,scale,expected", [
    ((7, 11), 1 / 3, (3, 4)), ((9, 12), 1 / 3, (3, 4)), ((13, 8), 3, (39, 24)),
    ((10, 15), 0.5, (5, 8)), ((16, 17), 1 / 4, (4, 5)), ((5, 6), 2, (10, 12)),
])
def test_output_sizes(shape, scale, expected):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    out = imresize(img, scale)
    assert out.shape == expected + (3,) and out.dtype == np.uint8
    assert imresize(img[..., 0], scale).shape == expected
    assert imresize(img.astype(np.float32), scale).dtype == np.float64
    assert imresize(img, output_size=(4, 9)).shape == (4, 9, 3)


def test_matlab_values_of_a_ramp():
    # hand-computed: u = 0.75, 1.25, ...; cubic(0.25) = 0.8671875, cubic(0.75) = 0.2265625,
    # cubic(1.25) = -0.0703125, cubic(1.75) = -0.0234375; taps left of the image clamp to 1
    out = imresize(np.array([[0.0, 1.0]]), output_size=(1, 4))
    np.testing.assert_allclose(out[0], [-0.0703125, 0.203125, 0.796875, 1.0703125], atol=1e-15)


@pytest.mark.parametrize("shape,scale", [((13, 9), 1 / 3), ((11, 14), 1 / 4), ((7, 5), 3),
                                         ((6, 9), 2), ((17, 10), 0.5), ((9, 8), 1 / 2.5)])
def test_float_path_matches_pixel_by_pixel_reference(shape, scale):
    img = np.random.default_rng(2).random(shape) * 255
    np.testing.assert_allclose(imresize(img, scale), _reference(img, scale), rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", [1 / 3, 1 / 4, 2, 3])
def test_uint8_rounds_after_each_pass(scale):
    # sides divisible by the scale, so that output_size implies exactly the same scale
    img = np.random.default_rng(3).integers(0, 256, size=(24, 36, 3), dtype=np.uint8)
    h, w = round(24 * scale), round(36 * scale)
    # one pass: the uint8 path is the float path rounded half away from zero and clipped
    one = imresize(img, output_size=(h, 36))
    assert np.array_equal(one, _round(imresize(img.astype(np.float64), output_size=(h, 36))))
    # two passes: rounded after the height pass, then again after the width pass
    mid = _round(imresize(img.astype(np.float64), output_size=(h, 36)))
    expected = _round(imresize(mid, output_size=(h, w)))
    assert np.array_equal(imresize(img, scale), expected)


def test_rounding_is_half_away_from_zero():
    # width x2 of [0 32]: weights (1.0703125, -0.0703125), (0.796875, 0.203125), ... give
    # exactly [-2.25, 6.5, 25.5, 34.25]; MATLAB's uint8 cast makes that [0 7 26 34]
    img = np.array([[0, 32]], dtype=np.uint8)
    exact = imresize(img.astype(np.float64), output_size=(1, 4))
    assert exact.tolist() == [[-2.25, 6.5, 25.5, 34.25]]
    assert imresize(img, output_size=(1, 4)).tolist() == [[0, 7, 26, 34]]


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 0.5, 2, 3, 4])
def test_constant_images_stay_constant(scale):
    img = np.full((19, 13, 3), 137, dtype=np.uint8)
    assert np.all(imresize(img, scale) == 137)
    out = imresize(np.full((19, 13), 0.3), scale)
    np.testing.assert_allclose(out, 0.3, atol=1e-12)


def test_shrink_then_enlarge_a_smooth_image_stays_close():
    y, x = np.mgrid[0:96, 0:120].astype(np.float64)
    img = 128 + 60 * np.sin(x / 13.0) * np.cos(y / 17.0)
    for s in (2, 3, 4):
        back = imresize(imresize(img, 1 / s), s)
        assert back.shape == img.shape
        err = np.abs(back - img)[8:-8, 8:-8].max()
        assert err < 0.5 * s, (s, err)
        u8 = imresize(imresize(np.round(img).astype(np.uint8), 1 / s), s).astype(float)
        assert np.abs(u8 - img)[8:-8, 8:-8].max() < 1 + 0.5 * s


@pytest.mark.parametrize("scale", [1 / 3, 2, 3, 1 / 4])
def test_torch_batched_matches_numpy(scale):
    rng = np.random.default_rng(4)
    batch = rng.random((2, 3, 14, 19))
    out = imresize(torch.from_numpy(batch), scale)
    assert out.dtype == torch.float64 and out.shape[:2] == (2, 3)
    for n in range(2):
        ref = imresize(batch[n].transpose(1, 2, 0), scale).transpose(2, 0, 1)
        np.testing.assert_allclose(out[n].numpy(), ref, rtol=0, atol=1e-12)
    out32 = imresize(torch.from_numpy(batch).float(), scale)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), out.numpy(), atol=1e-5)


def test_torch_keeps_autograd():
    x = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: imresize(t, 2), (x,))


@pytest.mark.parametrize("bad", [0, -2, float("nan"), float("inf"), "2", True])
def test_bad_scale(bad):
    with pytest.raises(ValueError, match="scale"):
        imresize(np.zeros((4, 4), np.uint8), bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating point"):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="HxW"):
        imresize(np.zeros((2, 4, 4, 3), np.uint8), 2)
    with pytest.raises(ValueError, match="uint8 or float"):
        imresize(np.zeros((4, 4), np.int32), 2)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(np.zeros((4, 4), np.uint8), 2, output_size=(8, 8))
    with pytest.raises(ValueError, match="exactly one"):
        imresize(np.zeros((4, 4), np.uint8))
