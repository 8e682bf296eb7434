"""The evaluation protocol: LR making, quantisation, gray images, self-ensemble, and the
published bicubic numbers of DESIGN.md section 3."""

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from addersr.data import imresize, read_image
from addersr.data.datasets import ASSETS
from addersr.eval import evaluate, load_images, make_pair, super_resolve, to_uint8
from addersr.metrics import psnr

# DESIGN.md section 3: published bicubic PSNR/SSIM (Y, border = scale)
PUBLISHED = {
    2: {"Set5": (33.66, 0.9299), "Set14": (30.24, 0.8688), "B100": (29.56, 0.8431), "Urban100": (26.88, 0.8403)},
    3: {"Set5": (30.39, 0.8682), "Set14": (27.55, 0.7742), "B100": (27.21, 0.7385), "Urban100": (24.46, 0.7349)},
    4: {"Set5": (28.42, 0.8104), "Set14": (26.00, 0.7027), "B100": (25.96, 0.6675), "Urban100": (23.14, 0.6577)},
}
SET5 = ASSETS / "Set5"


class Nearest(nn.Module):
    """Pixel replication: equivariant to flips and rotations."""

    def __init__(self, scale, ramp=0.0):
        super().__init__()
        self.scale, self.ramp = scale, ramp
        self.weight = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        y = x.repeat_interleave(self.scale, -2).repeat_interleave(self.scale, -1)
        if self.ramp:  # a left-to-right ramp, which no flip/rotation leaves unchanged
            y = y + self.ramp * torch.linspace(0, 1, y.shape[-1])
        return y


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_set5_matches_published(scale):
    res = evaluate("bicubic", SET5, scale, progress=False)
    psnr_pub, ssim_pub = PUBLISHED[scale]["Set5"]
    assert abs(res["psnr"] - psnr_pub) <= 0.02
    assert abs(res["ssim"] - ssim_pub) <= 0.001
    assert [r["name"] for r in res["per_image"]] == ["baby", "bird", "butterfly", "head", "woman"]
    assert res["psnr"] == pytest.approx(np.mean([r["psnr"] for r in res["per_image"]]))
    assert res["lpips"] is None and res["images"] == 5


@pytest.mark.slow
def test_bicubic_all_sets_match_published(data_root):
    for name in ("Set5", "Set14", "B100", "Urban100"):
        images = load_images(data_root / "benchmark" / name)
        for scale, row in PUBLISHED.items():
            res = evaluate("bicubic", images, scale, progress=False)
            assert abs(res["psnr"] - row[name][0]) <= 0.02, (name, scale, res["psnr"])
            assert abs(res["ssim"] - row[name][1]) <= 0.001, (name, scale, res["ssim"])


def test_make_pair_crops_to_a_multiple_of_the_scale():
    hr = np.random.default_rng(0).integers(0, 256, (31, 26, 3), dtype=np.uint8)
    lr, crop = make_pair(hr, 3)
    assert crop.shape == (30, 24, 3) and np.array_equal(crop, hr[:30, :24])
    assert lr.shape == (10, 8, 3) and lr.dtype == np.uint8
    assert np.array_equal(lr, imresize(hr[:30, :24], 1 / 3))
    with pytest.raises(ValueError, match="smaller than the scale"):
        make_pair(hr[:2], 4)
    with pytest.raises(ValueError, match="uint8"):
        make_pair(hr.astype(np.float32), 2)
    with pytest.raises(ValueError, match="positive integer"):
        make_pair(hr, 2.5)


def test_to_uint8_clamps_and_rounds_half_up():
    t = torch.tensor([-0.2, 0.0, 0.5, 1.0, 1.3, 2.4 / 255]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    out = to_uint8(t)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[..., 0].ravel().tolist() == [0, 0, 128, 255, 255, 2]
    assert to_uint8(t[:, :1]).shape == (2, 3)
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(2, 3, 4, 4))


def test_bicubic_super_resolve_is_uint8_imresize():
    lr = read_image(SET5 / "bird.png")[:40, :50]
    assert np.array_equal(super_resolve("bicubic", lr, 3), imresize(lr, 3))


def test_model_path_matches_bicubic_pipeline():
    """A network doing float bicubic in torch scores like the uint8 bicubic baseline."""

    class TorchBicubic(nn.Module):
        scale = 2

        def forward(self, x):
            return imresize(x, 2)

    res = evaluate(TorchBicubic(), SET5, 2, progress=False)
    ref = evaluate("bicubic", SET5, 2, progress=False)
    assert abs(res["psnr"] - ref["psnr"]) < 0.02 and abs(res["ssim"] - ref["ssim"]) < 0.001
    assert res["seconds_per_image"] > 0


def test_gray_image_fed_as_rgb_and_scored_on_its_values():
    class Tinted(Nearest):  # channels differ; their mean is the nearest enlargement
        def forward(self, x):
            return super().forward(x) + torch.tensor([0.06, 0.0, -0.06]).view(1, 3, 1, 1)

    gray = read_image(SET5 / "head.png")[..., 1]
    model = Tinted(2)
    res = evaluate(model, [("head", gray)], 2, progress=False)
    x = model.seen[0]
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    lr, hr = make_pair(gray, 2)
    expected = psnr(lr.repeat(2, 0).repeat(2, 1), hr, 2)  # nearest on the gray values
    assert res["per_image"][0]["psnr"] == pytest.approx(expected, abs=1e-12)


def test_self_ensemble_averages_the_8_transforms():
    lr = np.random.default_rng(1).integers(20, 200, (9, 13, 3), dtype=np.uint8)
    plain = super_resolve(Nearest(2), lr, 2)
    assert np.array_equal(super_resolve(Nearest(2), lr, 2, self_ensemble=True), plain)
    # the ramp averages to 0.5 over the dihedral group: output = nearest + 0.05
    ramp = Nearest(2, ramp=0.1)
    out = super_resolve(ramp, lr, 2, self_ensemble=True)
    assert len(ramp.seen) == 8
    up = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    expected = to_uint8(Nearest(2)(up) + 0.05)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert np.abs(super_resolve(Nearest(2, ramp=0.1), lr, 2).astype(int) - expected).max() > 5


def test_evaluate_restores_mode_and_checks_scale(tmp_path):
    model = Nearest(3)
    model.train()
    evaluate(model, [SET5 / "bird.png"], 3, progress=False, save_dir=tmp_path / "out")
    assert model.training
    saved = read_image(tmp_path / "out" / "bird.png")
    lr, hr = make_pair(read_image(SET5 / "bird.png"), 3)
    assert saved.shape == hr.shape and np.array_equal(saved, lr.repeat(3, 0).repeat(3, 1))
    with pytest.raises(ValueError, match="scale x3"):
        evaluate(model, SET5, 2, progress=False)
    with pytest.raises(ValueError, match="bicubic"):
        evaluate("nearest", SET5, 2, progress=False)


def test_load_images_inputs(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    assert [n for n, _ in load_images([img, ("x", img)])] == ["image_000", "x"]
    assert load_images([SET5 / "bird.png"])[0][0] == "bird"
    with pytest.raises(FileNotFoundError, match="no images"):
        load_images(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_images(tmp_path / "missing")


@pytest.mark.skipif(importlib.util.find_spec("addersr.inference") is None,
                    reason="addersr.inference not written yet")
def test_tiled_evaluation_equals_whole_image():
    from addersr.models import build

    model = build("edsr-baseline", 2, "conv", n_blocks=2, n_feats=8)
    images = [("bird", read_image(SET5 / "bird.png")[:80, :96])]
    whole = evaluate(model, images, 2, progress=False)
    tiled = evaluate(model, images, 2, tile=16, progress=False)
    assert tiled["psnr"] == pytest.approx(whole["psnr"], abs=1e-9)
    assert tiled["ssim"] == pytest.approx(whole["ssim"], abs=1e-12)


def test_random_registry_model_runs():
    from addersr.models import build

    model = build("edsr-baseline", 2, "adder", n_blocks=1, n_feats=8)
    images = [("bird", read_image(SET5 / "bird.png")[:40, :48])]
    res = evaluate(model, images, 2, progress=False, self_ensemble=True)
    assert np.isfinite(res["psnr"]) and -1 <= res["ssim"] <= 1


def test_read_image_modes(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.webp", lossless=True)
    assert np.array_equal(read_image(tmp_path / "rgb.webp"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    assert np.array_equal(read_image(tmp_path / "gray.png"), rgb[..., 0])
    rgba = np.dstack([rgb, np.full((5, 7), 9, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (5, 7, 3)
    Image.fromarray(np.array([[0, 257 * 100, 65535, 257 * 7 + 128]], np.uint16)).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png").tolist() == [[0, 100, 255, 7]]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        read_image(tmp_path / "bad.png")


def test_folders(tmp_path, monkeypatch):
    from addersr.data import dataset_root, find_datasets, list_images

    for name in ("Zed", "Set14", "Set5", "Empty"):
        (tmp_path / name).mkdir()
    img = np.zeros((4, 4), np.uint8)
    from PIL import Image
    for name in ("Zed/b.png", "Zed/a.jpg", "Set14/x.webp", "Set5/y.bmp"):
        Image.fromarray(img).save(tmp_path / name)
    (tmp_path / "Zed" / "notes.txt").write_text("x")
    (tmp_path / "Zed" / ".hidden.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path / "Zed")] == ["a.jpg", "b.png"]
    assert list(find_datasets(tmp_path)) == ["Set5", "Set14", "Zed"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")
    assert dataset_root(tmp_path) == tmp_path
    monkeypatch.setenv("ADDERSR_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="benchmark"):
        dataset_root()
    (tmp_path / "benchmark").mkdir()
    assert dataset_root() == tmp_path / "benchmark"
    monkeypatch.delenv("ADDERSR_DATA")
    assert dataset_root() == ASSETS and "Set5" in find_datasets(ASSETS)
    assert len(list_images(ASSETS / "Set5")) == 5
