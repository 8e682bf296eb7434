"""The Gradio demo: the handler called directly, then the served app through gradio_client."""

import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402

from addersr import metrics, models, quant  # noqa: E402
from addersr.data import imresize  # noqa: E402
from addersr.demo import (Cancelled, Catalogue, Refused, Upscaler, catalogue, checks,  # noqa: E402
                          service)
from addersr.energy import count_ops  # noqa: E402
from addersr.images import load_image, save_png  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


app = _import("addersr_app", ROOT / "app.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_weights(folder, metrics=True):
    """Small random-weight models: edsr-baseline x2 (adder, conv), vdsr x2 (adder); the
    adder ones get a made-up Set5 PSNR in their JSON when ``metrics``."""
    torch.manual_seed(0)
    specs = [("edsr-baseline", "adder", {"n_blocks": 1, "n_feats": 8}, "edsr-baseline_x2_adder"),
             ("edsr-baseline", "conv", {"n_blocks": 1, "n_feats": 8}, "edsr-baseline_x2_conv"),
             ("vdsr", "adder", {"depth": 3, "n_feats": 8}, "vdsr_x2_adder")]
    for name, op, arch, stem in specs:
        meta = {"note": "random weights for tests"}
        if metrics and op == "adder":
            meta["metrics"] = {"Set5": {"psnr": 30.5, "ssim": 0.9}}
        models.save(models.build(name, 2, op=op, **arch), Path(folder) / stem, meta)
    return Path(folder)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def upscaler(weights_dir):
    return Upscaler(weights_dir, device="cpu")


@pytest.fixture(scope="module")
def handle(upscaler):
    """The page's ``/upscale`` handler on the service, as the server calls it."""
    return app.handler(upscaler)


def _expected_rgb(weights_dir, name, rgb_uint8):
    """The model applied directly to a uint8 RGB image (clamped, rounded)."""
    model = models.load(weights_dir / name)
    x = torch.from_numpy(rgb_uint8).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return np.rint(y * 255).astype(np.int16)


class Recorder:
    """Stands in for gr.Progress: records the (done, total) pairs it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, progress, desc=None, unit=None, **_):
        self.calls.append(progress)


# ----------------------------------------------------------------------- handler, directly

def test_lists_weights_with_labels(upscaler):
    assert upscaler.catalogue.scales() == [2]
    labels = dict((name, label) for label, name in upscaler.catalogue.choices(2))
    assert set(labels) == {"edsr-baseline_x2_adder", "edsr-baseline_x2_conv", "vdsr_x2_adder"}
    assert "Set5 30.50 dB" in labels["edsr-baseline_x2_adder"] and "AdderSR" in labels[
        "edsr-baseline_x2_adder"]
    assert "CNN" in labels["edsr-baseline_x2_conv"] and "dB" not in labels["edsr-baseline_x2_conv"]
    assert upscaler.catalogue.choices(3) == []


def test_rgb_matches_model_and_bicubic(tmp_path, handle, weights_dir):
    rgb = np.random.default_rng(0).integers(0, 256, (11, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    name = "edsr-baseline_x2_adder"
    out, (bic, out2), stats = handle(str(tmp_path / "photo.png"), name, 0, progress=Recorder())
    assert out == out2 and Path(out).name == f"photo_x2_{name}.png"
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (28, 22)
        got = np.asarray(im).astype(np.int16)
    assert np.abs(got - _expected_rgb(weights_dir, name, rgb)).max() <= 1
    with Image.open(bic) as im:
        np.testing.assert_array_equal(np.asarray(im), imresize(rgb, 2))
    # the statistics: size, time and the operation counts of both twins
    own = count_ops(models.build("edsr-baseline", 2, "adder", n_blocks=1, n_feats=8), (22, 28))
    twin = count_ops(models.build("edsr-baseline", 2, "conv", n_blocks=1, n_feats=8), (22, 28))
    assert "28x22" in stats and " s**" in stats
    assert app._count(own["mults"]) in stats and app._count(twin["mults"]) in stats
    assert app._energy(own["energy_pj"]) in stats and app._energy(twin["energy_pj"]) in stats
    assert own["mults"] < twin["mults"]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "I;16", "RGB16"])
def test_modes_are_kept(tmp_path, handle, mode):
    rng = np.random.default_rng(1)
    path = tmp_path / "img.png"
    if mode == "RGB16":
        save_png(rng.integers(0, 65536, (7, 9, 3), dtype=np.uint16), path)
    elif mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (7, 9), dtype=np.uint16)).save(path)
    else:
        channels = {"L": 1, "LA": 2, "RGBA": 4}[mode]
        array = rng.integers(0, 256, (7, 9, channels), dtype=np.uint8)
        Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
    out, (bic, _), _ = handle(str(path), "vdsr_x2_adder", 0, progress=Recorder())
    result, bicubic = load_image(out), load_image(bic)
    for img in (result, bicubic):
        if mode == "RGB16":
            assert isinstance(img, np.ndarray) and img.dtype == np.uint16
            assert img.shape == (14, 18, 3)
        else:
            assert img.mode == mode and img.size == (18, 14)


def test_large_input_is_tiled_exactly(tmp_path, handle, monkeypatch):
    rgb = np.random.default_rng(2).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    whole, _, _ = handle(str(tmp_path / "big.png"), "edsr-baseline_x2_conv", 64,
                           progress=Recorder())
    monkeypatch.setattr(checks, "TILE", 12)  # "large" now: tiles chosen automatically
    progress = Recorder()
    tiled, _, stats = handle(str(tmp_path / "big.png"), "edsr-baseline_x2_conv", 0,
                               progress=progress)
    assert "tiles of 12 px" in stats
    np.testing.assert_array_equal(np.asarray(Image.open(whole)), np.asarray(Image.open(tiled)))
    assert len(progress.calls) >= 2 and progress.calls[-1][0] == progress.calls[-1][1] > 1


def test_size_limit(tmp_path, handle, monkeypatch):
    # the real limit: 2049 x 2049 at x2 is just over 4096 x 4096; refused before decoding
    Image.new("L", (2049, 2049)).save(tmp_path / "huge.png")
    with pytest.raises(gr.Error, match="megapixels"):
        handle(str(tmp_path / "huge.png"), "vdsr_x2_adder", 0, progress=Recorder())
    # a header claiming 20000 x 20000 pixels: Pillow refuses it as a decompression bomb
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(gr.Error, match="too large"):
        handle(str(tmp_path / "bomb.png"), "vdsr_x2_adder", 0, progress=Recorder())
    monkeypatch.setattr(checks, "MAX_OUTPUT_PIXELS", 20 * 20)
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    Image.new("RGB", (11, 10)).save(tmp_path / "over.png")
    handle(str(tmp_path / "ok.png"), "vdsr_x2_adder", 0, progress=Recorder())
    with pytest.raises(gr.Error, match="22x20"):
        handle(str(tmp_path / "over.png"), "vdsr_x2_adder", 0, progress=Recorder())


def test_bad_requests(tmp_path, handle):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(gr.Error, match="corrupt.png"):
        handle(str(tmp_path / "corrupt.png"), "vdsr_x2_adder", 0, progress=Recorder())
    Image.new("RGB", (40, 40), (5, 6, 7)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 3])
    with pytest.raises(gr.Error, match="cut.jpg"):
        handle(str(tmp_path / "cut.jpg"), "vdsr_x2_adder", 0, progress=Recorder())
    with pytest.raises(gr.Error, match="Upload"):
        handle(None, "vdsr_x2_adder", 0, progress=Recorder())
    with pytest.raises(gr.Error, match="Unknown weights"):
        handle(str(tmp_path / "full.jpg"), "nope", 0, progress=Recorder())
    for tile in (-3, 1, app.MIN_TILE - 1):  # tile 1: minutes of work for a 64x64 image
        with pytest.raises(gr.Error, match=f"Tile size.*at least {app.MIN_TILE} pixels"):
            handle(str(tmp_path / "full.jpg"), "vdsr_x2_adder", tile, progress=Recorder())


def test_twin_is_the_same_network_with_the_other_op(upscaler):
    twin = upscaler.catalogue.twin
    assert twin("edsr-baseline_x2_adder") == "edsr-baseline_x2_conv"
    assert twin("edsr-baseline_x2_conv") == "edsr-baseline_x2_adder"
    assert twin("vdsr_x2_adder") is None and twin("nope") is None


def test_compare_with_the_cnn_twin(tmp_path, handle, weights_dir):
    """On request the slider's left half is the CNN twin's result for the same image (its
    own model's output, exactly), and the statistics give the twin's time."""
    rgb = np.random.default_rng(5).integers(0, 256, (10, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "p.png")
    progress = Recorder()
    out, (left, right), stats = handle(str(tmp_path / "p.png"), "edsr-baseline_x2_adder", 0,
                                         "twin", progress=progress)
    assert right == out and Path(left).name == "p_x2_edsr-baseline_x2_conv.png"
    for path, name in ((out, "edsr-baseline_x2_adder"), (left, "edsr-baseline_x2_conv")):
        with Image.open(path) as im:
            got = np.asarray(im).astype(np.int16)
        assert np.abs(got - _expected_rgb(weights_dir, name, rgb)).max() <= 1
    assert "CNN twin (edsr-baseline_x2_conv)" in stats and stats.count(" s**") == 2
    assert len(progress.calls) >= 2  # both networks report their tiles
    with pytest.raises(gr.Error, match="No twin of this AdderSR model"):
        handle(str(tmp_path / "p.png"), "vdsr_x2_adder", 0, "twin", progress=Recorder())
    with pytest.raises(gr.Error, match="Choose one of: bicubic, twin"):
        handle(str(tmp_path / "p.png"), "edsr-baseline_x2_adder", 0, "cnn", progress=Recorder())


def test_compare_control_and_slider_caption(upscaler):
    """The comparison choice appears only for a model with a twin; the slider's caption
    names what each half shows."""
    ctrl = app.compare_control(upscaler.catalogue, "edsr-baseline_x2_adder", app.TWIN)
    assert ctrl.visible and ctrl.value == "twin" and [c[1] for c in ctrl.choices] == ["bicubic", "twin"]
    ctrl = app.compare_control(upscaler.catalogue, "vdsr_x2_adder", app.TWIN)
    assert ctrl.visible is False and ctrl.value == "bicubic" and len(ctrl.choices) == 1
    label = app.slider_label(upscaler.catalogue, "edsr-baseline_x2_adder")
    assert label.startswith("Left: ordinary enlargement (bicubic) · Right: AdderSR network")
    assert app.slider_label(upscaler.catalogue, "edsr-baseline_x2_adder", "twin").startswith(
        "Left: its CNN twin · Right: AdderSR network")
    assert "Left: its AdderSR twin · Right: CNN network" in app.slider_label(
        upscaler.catalogue, "edsr-baseline_x2_conv", "twin")
    assert "bicubic" in app.slider_label(upscaler.catalogue, "vdsr_x2_adder", "twin")


def test_unreadable_image_message_shows_no_folders(tmp_path, handle):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, data cut
    with pytest.raises(gr.Error) as exc:
        handle(str(tmp_path / "cut.png"), "vdsr_x2_adder", 0, progress=Recorder())
    assert "cut.png could not be read" in exc.value.message
    assert str(tmp_path) not in exc.value.message and "/" not in exc.value.message


def test_service_imports_no_gradio():
    code = ("import sys, addersr.demo; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'gradio'], 'gradio'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_service_progress_refusal_and_cancellation(tmp_path, upscaler, monkeypatch):
    """The service called directly: ``progress(done, total, what)`` after each tile of both
    networks, figures as numbers, a plain Refused for a bad request, and Cancelled (no more
    tiles) once ``cancelled()`` says so."""
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (21, 30, 3), dtype=np.uint8)).save(
        tmp_path / "in.png")
    with pytest.raises(Refused, match="Unknown weights") as exc:
        upscaler.upscale(str(tmp_path / "in.png"), "nope")
    assert not isinstance(exc.value, gr.Error)
    monkeypatch.setattr(checks, "TILE", 12)  # 2 x 3 tiles
    calls = []
    result = upscaler.upscale(str(tmp_path / "in.png"), "edsr-baseline_x2_adder", 0, "twin",
                              progress=lambda *args: calls.append(args))
    assert calls == [(i, 6, "Upscaling tiles") for i in range(1, 7)] + [
        (i, 6, "CNN twin: upscaling tiles") for i in range(1, 7)]
    assert result.out_size == (60, 42) and result.in_size == (30, 21) and result.kind == "RGB"
    assert result.twin == "edsr-baseline_x2_conv" and result.twin_op == "conv"
    assert result.request.tile == 12 and result.other.name == "in_x2_edsr-baseline_x2_conv.png"
    assert 0 < result.ops["mults"] < result.twin_ops["mults"]
    asked, calls = [], []

    def cancelled():
        asked.append(True)
        return len(asked) > 2

    with pytest.raises(Cancelled):
        upscaler.upscale(str(tmp_path / "in.png"), "edsr-baseline_x2_adder", 0,
                         progress=lambda *args: calls.append(args), cancelled=cancelled)
    assert len(asked) == 3 and len(calls) == 2


def test_quality_note_and_preview_label(tmp_path):
    """A model scoring less than PREVIEW_MARGIN_DB above bicubic on Set5 (from its JSON) is
    labelled a preview; the sentence gives both scores."""
    bicubic = catalogue.bicubic_set5(2)
    assert bicubic == pytest.approx(33.66, abs=0.02)  # the published bicubic x2 Set5 PSNR
    for stem, gain in (("close", 0.08), ("good", 3.0)):
        model = models.build("vdsr", 2, op="adder", depth=3, n_feats=8)
        models.save(model, tmp_path / stem, {"metrics": {"Set5": {"psnr": bicubic + gain}}})
    models.save(models.build("vdsr", 2, op="conv", depth=3, n_feats=8), tmp_path / "none")
    up = Catalogue(tmp_path)
    labels = {name: label for label, name in up.choices()}
    assert labels["close"].endswith("· preview (close)") and "preview" not in labels["good"]
    assert "Preview model, at about bicubic quality" in app.quality_note(up, "close")
    assert f"{bicubic + 0.08:.2f} dB, +0.08 dB" in app.quality_note(up, "close")
    assert f"({bicubic:.2f} dB" in app.quality_note(up, "close")
    assert app.quality_note(up, "good").startswith("Quality:") and "+3.00 dB" in app.quality_note(up, "good")
    assert app.quality_note(up, "none") == "No quality score is recorded for this model."


def _component(config, elem_id):
    return next(c["props"] for c in config["components"] if c["props"].get("elem_id") == elem_id)


def test_page_offers_the_scales_of_the_weights(tmp_path, weights_dir):
    """One scale: no scale control, limits given for x2 only; two: both offered."""
    config = app.build_demo(weights_dir=weights_dir, device="cpu").get_config_file()
    assert _component(config, "scale")["visible"] is False
    text = str(config)
    assert "2048x2048 at x2" in text and "x4" not in text
    for name in ("edsr-baseline_x2_adder", "vdsr_x2_adder"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(weights_dir / (name + suffix), tmp_path / (name + suffix))
    models.save(models.build("vdsr", 3, op="adder", depth=3, n_feats=8), tmp_path / "vdsr_x3")
    config = app.build_demo(weights_dir=tmp_path, device="cpu").get_config_file()
    scale = _component(config, "scale")
    assert scale["visible"] is not False and [c[0] for c in scale["choices"]] == ["x2", "x3"]
    assert "2048x2048 at x2, 1365x1365 at x3" in str(config)


def test_without_weights_the_app_still_builds(tmp_path):
    demo = app.build_demo(weights_dir=tmp_path, device="cpu")
    up = demo.upscaler
    assert up.catalogue.weights == {} and up.catalogue.choices() == []
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    with pytest.raises(gr.Error, match="No model weights"):
        app.handler(up)(str(tmp_path / "x.png"), None, 0, progress=Recorder())
    config = str(demo.get_config_file())
    assert "No model weights found" in config


# ----------------------------------------------------------------------- 8-bit adder layers

SHIPPED_X2 = "edsr-small-x2-adder-cpu"  # shipped with its int8 calibration


@pytest.fixture(scope="module")
def shipped():
    return Upscaler(ROOT / "weights", device="cpu")


def _set5_crop(tmp_path):
    with Image.open(catalogue.ASSETS / "butterfly.png") as im:
        im.convert("RGB").crop((70, 90, 130, 138)).save(tmp_path / "crop.png")
    return tmp_path / "crop.png"


def _psnr_between(a, b):
    with Image.open(a) as x, Image.open(b) as y:
        return metrics.psnr(np.asarray(x), np.asarray(y))


def test_int8_request_gives_the_fp32_picture(tmp_path, shipped):
    """A calibrated adder model runs in int8 by default (service and page handler): the
    picture within 45 dB of fp32's, the energy with the adder layers' adds at INT8."""
    crop = _set5_crop(tmp_path)
    assert shipped.precisions(SHIPPED_X2) == ("int8", "fp32")
    r8, r32 = shipped.upscale(crop, SHIPPED_X2), shipped.upscale(crop, SHIPPED_X2, precision="fp32")
    assert (r8.precision, r32.precision) == ("int8", "fp32") and r8.output != r32.output
    assert _psnr_between(r8.output, r32.output) > 45
    meta = shipped.catalogue.weights[SHIPPED_X2]
    net = models.build(meta["model"], 2, "adder", **meta["config"])
    want = count_ops(net, (96, 120), adder_precision="int8")["energy_pj"]
    assert r8.ops["energy_pj"] == pytest.approx(want) and want < r32.ops["energy_pj"]
    assert r8.ops["adds"] == r32.ops["adds"] and r8.twin_ops == r32.twin_ops  # twin: fp32 CNN
    handle = app.handler(shipped)
    out8, _, stats8 = handle(str(crop), SHIPPED_X2, 0, "bicubic", None, "int8", progress=Recorder())
    out32, _, stats32 = handle(str(crop), SHIPPED_X2, progress=Recorder(), precision="fp32")
    assert _psnr_between(out8, out32) > 45
    assert "8-bit adder layers (int8)" in stats8 and "INT8 add 0.03 pJ" in stats8
    assert app._energy(want) in stats8 and app._energy(r32.ops["energy_pj"]) in stats32
    assert "32-bit float (fp32)" in stats32 and "INT8" not in stats32


def test_int8_is_refused_where_it_does_not_run(tmp_path, shipped, upscaler):
    """int8 for a CNN, for uncalibrated weights, at another scale than the calibrated one, or
    an unknown precision: a one-line Refused (gr.Error on the page) naming no folder."""
    crop = _set5_crop(tmp_path)
    with pytest.raises(Refused, match="edsr-small-x2-conv-cpu is a CNN.*choose fp32") as exc:
        shipped.upscale(crop, "edsr-small-x2-conv-cpu", precision="int8")
    assert "/" not in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(gr.Error, match="is a CNN"):
        app.handler(shipped)(str(crop), "edsr-small-x2-conv-cpu", precision="int8",
                             progress=Recorder())
    assert shipped.precisions("edsr-small-x2-conv-cpu") == ("fp32",)
    assert shipped.upscale(crop, "edsr-small-x2-conv-cpu").precision == "fp32"
    with pytest.raises(Refused, match="vdsr_x2_adder has no int8 calibration"):
        upscaler.upscale(crop, "vdsr_x2_adder", precision="int8")
    with pytest.raises(Refused, match="Precision 'fp16'"):
        shipped.check(crop, SHIPPED_X2, precision="fp16")
    # multi-scale weights calibrated at their recorded x2: int8 there only
    model = models.build("vdsr", 2, op="adder", depth=3, n_feats=8)
    models.save(model, tmp_path / "ms", {"scales": [2, 3]})
    rng = np.random.default_rng(8)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2)]
    quant.save_calibration(tmp_path / "ms", quant.calibrate(model, images), ["a", "b"])
    up = Upscaler(tmp_path, device="cpu")
    assert up.precisions("ms") == up.precisions("ms", 2) == ("int8", "fp32")
    assert up.precisions("ms", 3) == ("fp32",)
    with pytest.raises(Refused, match="int8.*serves ms at x2 only.*choose fp32"):
        up.upscale(crop, "ms", scale=3, precision="int8")
    assert up.upscale(crop, "ms", scale=2).precision == "int8"
    assert up.upscale(crop, "ms", scale=3).precision == "fp32"


def test_precision_control_shown_for_calibrated_models(weights_dir, shipped):
    """The page offers the precision (on int8, with its sentence) for a calibrated model and
    hides it for a CNN or uncalibrated weights."""
    config = app.build_demo(weights_dir=ROOT / "weights", device="cpu").get_config_file()
    control = _component(config, "precision")
    assert control["visible"] is not False and control["value"] == "int8"
    assert [c[1] for c in control["choices"]] == ["int8", "fp32"] and control["info"] == app.INT8_NOTE
    ctrl = app.precision_control(shipped, "edsr-small-x2-conv-cpu")
    assert ctrl.visible is False and ctrl.value == "fp32"
    ctrl = app.precision_control(shipped, SHIPPED_X2)
    assert ctrl.visible and ctrl.value == "int8"
    config = app.build_demo(weights_dir=weights_dir, device="cpu").get_config_file()
    assert _component(config, "precision")["visible"] is False


def test_examples_are_reduced_set5(tmp_path):
    paths = service.example_images(tmp_path)
    assert sorted(p.name for p in paths) == sorted(p.name for p in catalogue.ASSETS.glob("*.png"))
    assert len(paths) == 5
    reduction = service.EXAMPLE_REDUCTION
    with Image.open(tmp_path / "baby.png") as im, Image.open(catalogue.ASSETS / "baby.png") as hr:
        assert im.size == (hr.size[0] // reduction, hr.size[1] // reduction)


# ----------------------------------------------------------------------- served, end to end

@pytest.fixture(scope="module")
def served(weights_dir):
    demo = app.build_demo(weights_dir=weights_dir, device="cpu")
    port = free_port()
    app.launch(demo, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_api_endpoint(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False, download_files=str(tmp_path / "dl"))
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/upscale"]
    params = api["parameters"]
    assert params[0]["parameter_name"] == "image" and not params[0]["parameter_has_default"]
    assert all(p["parameter_has_default"] for p in params[1:])
    # the scale, then the precision, added last, default to the weights' recorded scale and
    # int8 where calibrated (else fp32): old calls keep working
    assert [p["parameter_name"] for p in params[-2:]] == ["scale", "precision"]
    assert params[-2]["parameter_default"] is None and params[-1]["parameter_default"] is None
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (9, 12, 3), dtype=np.uint8)).save(
        tmp_path / "in.png")
    result, pair, stats = client.predict(handle_file(str(tmp_path / "in.png")), api_name="/upscale")
    with Image.open(result) as im:
        assert im.size == (24, 18)
    assert "24x18" in stats
    (tmp_path / "bad.png").write_bytes(b"garbage bytes")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(tmp_path / "bad.png")), api_name="/upscale")
    with pytest.raises(AppError, match=f"at least {app.MIN_TILE} pixels"):
        client.predict(handle_file(str(tmp_path / "in.png")), tile=1, api_name="/upscale")
    result, (left, right), stats = client.predict(
        handle_file(str(tmp_path / "in.png")), weights="edsr-baseline_x2_adder", compare="twin",
        api_name="/upscale")
    assert "edsr-baseline_x2_conv" in Path(left).name and "CNN twin" in stats


def _png_gray(width, height):
    """A valid all-black 8-bit gray PNG of any size, compressed row by row (small file)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    packer, row = zlib.compressobj(9), b"\0" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_api_serves_every_scale(weights_dir, tmp_path):
    """The API may ask for weights of a scale the page does not show first."""
    from gradio_client import Client, handle_file

    folder = tmp_path / "w"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(weights_dir / ("vdsr_x2_adder" + suffix), folder / ("vdsr_x2_adder" + suffix))
    models.save(models.build("edsr-baseline", 3, op="adder", n_blocks=1, n_feats=8), folder / "e_x3")
    demo = app.build_demo(weights_dir=folder, device="cpu")
    port = free_port()
    app.launch(demo, port=port, block=False)
    try:
        Image.new("RGB", (10, 8), (9, 99, 199)).save(tmp_path / "in.png")
        result, _, stats = Client(f"http://127.0.0.1:{port}/", verbose=False,
                                  download_files=str(tmp_path / "dl")).predict(
            handle_file(str(tmp_path / "in.png")), weights="e_x3", api_name="/upscale")
    finally:
        demo.close()
    with Image.open(result) as im:
        assert im.size == (30, 24)
    assert "x3" in stats


def test_api_messages_name_the_problem(served, tmp_path):
    """A truncated upload: its name, not the server's folders; a valid 20000x20000 PNG: too
    large, not unreadable."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False, download_files=str(tmp_path / "dl"))
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(AppError) as exc:
        client.predict(handle_file(str(tmp_path / "cut.png")), api_name="/upscale")
    message = str(exc.value)
    assert "cut.png could not be read" in message and "/" not in message, message
    (tmp_path / "huge.png").write_bytes(_png_gray(20000, 20000))
    with pytest.raises(AppError) as exc:
        client.predict(handle_file(str(tmp_path / "huge.png")), api_name="/upscale")
    message = str(exc.value)
    assert "huge.png is too large" in message and "megapixels" in message, message


def test_concurrent_requests(served, tmp_path):
    """A smaller run of benchmarks/app_load.py: 20 concurrent requests all succeed."""
    load = _import("app_load", ROOT / "benchmarks" / "app_load.py")
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
        tmp_path / "small.png")
    report = load.fire(served, tmp_path / "small.png", requests=20)
    assert report["ok"] == 20 and report["failed"] == []
    assert all(size == (32, 32) for size in report["sizes"])
    report = load.fire(served, tmp_path / "small.png", requests=2, weights="nope", parallel=False)
    assert report["ok"] == 0 and all("Unknown weights" in f for f in report["failed"]), report
    assert load._scale(ROOT / "weights", "edsr-small-x4-adder-cpu") == 4
    assert load._scale(ROOT / "weights", "nope") is None


def test_disconnected_client_stops_the_work(weights_dir, tmp_path):
    """A client killed mid-request: the server stops at the next tile and serves the next
    request at once (a 64x64 image in tiles of 1 once held the app for minutes)."""
    from gradio_client import Client, handle_file

    demo = app.build_demo(weights_dir=weights_dir, device="cpu")
    port = free_port()
    app.launch(demo, port=port, block=False)
    url, name = f"http://127.0.0.1:{port}/", "edsr-baseline_x2_conv"
    try:
        model = demo.upscaler.model(name)
        calls, forward = [], model.forward

        def slow_forward(x):  # 0.25 s per tile: 30 tiles take 7.5 s
            calls.append(time.monotonic())
            time.sleep(0.25)
            return forward(x)

        model.forward = slow_forward
        Image.fromarray(np.random.default_rng(6).integers(0, 256, (320, 384, 3), np.uint8)).save(
            tmp_path / "big.png")
        client = subprocess.Popen([sys.executable, "-c", (
            "from gradio_client import Client, handle_file\n"
            f"Client({url!r}, verbose=False, download_files={str(tmp_path / 'dl')!r}).predict("
            f"handle_file({str(tmp_path / 'big.png')!r}), {name!r}, 64, api_name='/upscale')")])
        deadline = time.monotonic() + 120
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 4, "the request never started"
        client.kill()
        client.wait()
        killed = time.monotonic()
        time.sleep(4)
        assert len([t for t in calls if t > killed]) <= 1  # at most the tile under way
        model.forward = forward
        Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
        start = time.monotonic()
        Client(url, verbose=False, download_files=str(tmp_path / "dl")).predict(
            handle_file(str(tmp_path / "small.png")), name, 0, api_name="/upscale")
        assert time.monotonic() - start < 30
    finally:
        demo.close()


def test_sigterm_removes_the_temporary_folder(weights_dir, tmp_path):
    """``python app.py`` stopped with SIGTERM deletes its uploads and results."""
    from gradio_client import Client, handle_file

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(TMPDIR=str(temp), PYTHONWARNINGS="ignore")
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                               "--weights-dir", str(weights_dir), "--device", "cpu"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.5)
        Image.new("RGB", (12, 10), (9, 99, 199)).save(tmp_path / "in.png")
        Client(url, verbose=False, download_files=str(tmp_path / "dl")).predict(
            handle_file(str(tmp_path / "in.png")), api_name="/upscale")
        written = [p for p in temp.rglob("*") if p.is_file()]
        assert any(p.name == "in.png" for p in written)  # the upload
        assert any(p.name.startswith("in_x2") for p in written)  # the results
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert [p for p in temp.rglob("*") if p.is_file() or "addersr" in p.name] == []
    finally:
        if server.poll() is None:
            server.kill()


def test_default_is_the_best_adder_model(tmp_path):
    """The page opens on the adder model with the best recorded Set5 gain over bicubic;
    CNN twins (however good) and unscored models come after."""
    torch.manual_seed(0)
    small = {"n_blocks": 1, "n_feats": 8}
    for stem, op, psnr, scale in [("a_adder", "adder", 30.5, 2), ("b_cnn", "conv", 40.0, 2),
                                  ("c_adder", "adder", 31.5, 2), ("d_adder", "adder", None, 2),
                                  ("e_adder", "adder", 27.0, 3)]:
        meta = {"metrics": {"Set5": {"psnr": psnr, "ssim": 0.9}}} if psnr else {}
        models.save(models.build("edsr-baseline", scale, op=op, **small), tmp_path / stem, meta)
    up = Catalogue(tmp_path)
    # bicubic scores 33.67 at x2 and 30.40 at x3: gains c -2.2, a -3.2, e -3.4
    assert up.default() == "c_adder"
    assert up.default(scale=3) == "e_adder"
    (tmp_path / "c_adder.json").unlink()
    (tmp_path / "c_adder.safetensors").unlink()
    assert Catalogue(tmp_path).default() == "a_adder"


def test_multi_scale_weights_are_offered_at_each_of_their_scales(tmp_path):
    """Weights trained for x2, x3 and x4 at once (multi-scale VDSR): the scale control offers
    the three, the dropdown lists them under each with that scale's Set5 score, the note
    follows the scale, and the handler runs at the scale asked for (default: the recorded one)."""
    bicubic = {s: catalogue.bicubic_set5(s) for s in (2, 3, 4)}
    by_scale = {str(s): {"Set5": {"psnr": bicubic[s] + s}} for s in (2, 3, 4)}  # gains +2, +3, +4
    models.save(models.build("vdsr", 2, op="adder", depth=3, n_feats=8), tmp_path / "ms",
                {"scales": [2, 3, 4], "metrics": by_scale["2"], "metrics_by_scale": by_scale})
    demo = app.build_demo(weights_dir=tmp_path, device="cpu")
    scale = _component(demo.get_config_file(), "scale")
    assert scale["visible"] is not False and [c[0] for c in scale["choices"]] == ["x2", "x3", "x4"]
    cat = demo.upscaler.catalogue
    for s in (2, 3, 4):
        (label, name), = cat.choices(s)
        assert name == "ms" and label.startswith(f"vdsr x{s} ") and f"Set5 {bicubic[s] + s:.2f} dB" in label
        assert f"at x{s} it scores {bicubic[s] + s:.2f} dB, +{s}.00 dB" in app.quality_note(cat, "ms", s)
    Image.new("RGB", (6, 5), (10, 200, 30)).save(tmp_path / "in.png")
    handle = app.handler(demo.upscaler)
    for s, want in ((3, 3), (None, 2), (4.0, 4)):
        out, _, stats = handle(str(tmp_path / "in.png"), "ms", 0, "bicubic", s, progress=Recorder())
        with Image.open(out) as im:
            assert im.size == (6 * want, 5 * want)
        assert f"vdsr x{want} " in stats and f"Set5 {bicubic[want] + want:.2f} dB" in stats
    with pytest.raises(gr.Error, match="ms enlarges x2, x3, x4, not x5"):
        handle(str(tmp_path / "in.png"), "ms", 0, "bicubic", 5, progress=Recorder())
