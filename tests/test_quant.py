"""8-bit adder models (addersr.quant, addersr.nn.quantized) against their fp32 originals."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from addersr import models, quant
from addersr.energy import count_ops
from addersr.eval import make_pair, to_uint8
from addersr.inference import forward_tiled
from addersr.metrics import psnr
from addersr.models.trace import receptive_radius
from addersr.nn import AdderSRLayer
from addersr.nn.quantized import QuantAdderLayer, qparams
from addersr.ops import sad

SHIPPED = [p.with_suffix("").name for p, m in models.list_weights() if m["op"] == "adder"]


def test_qparams_represent_zero_and_cover_the_range():
    for lo, hi in ((-0.97, 2.7), (0.0, 2.1), (0.3, 1.0), (-2.0, -0.5)):
        s, z = qparams(lo, hi)
        assert isinstance(z, int) and 0 <= z <= 255
        assert s * (0 - z) <= min(lo, 0) + s / 2 and s * (255 - z) >= max(hi, 0) - s / 2


def test_range_clamp_is_lossless_on_grid_inputs():
    """Inputs on the quantisation grid, weights on the grid inside the range or anywhere
    outside it: int8 layer == fp32 layer (BN identity, alpha 1) up to float32 rounding."""
    torch.manual_seed(3)
    layer = AdderSRLayer(16, relu=False).eval()
    lo, hi = -1.0, 2.0
    s, z = qparams(lo, hi)
    grid = lambda shape: (torch.randint(0, 256, shape) - z).double() * s  # noqa: E731
    w = grid((16, 16, 3, 3))
    outside = torch.rand(w.shape) < 0.5
    w[outside] = torch.where(torch.rand(w.shape) < 0.5, -5 - 50 * torch.rand(w.shape),
                             4 + 50 * torch.rand(w.shape))[outside].double()
    layer.adder.weight.data = w.float()
    x = grid((1, 16, 7, 9)).float()
    q = QuantAdderLayer(layer, lo, hi)
    out = np.zeros((1, 7, 9, 16), np.float32)
    q(q.quantize_input(x.permute(0, 2, 3, 1).contiguous().numpy()), fout=out)
    with torch.no_grad():
        ref = (x.double() + torch.nn.functional.batch_norm(
            _adder64(x.double(), layer.adder.weight.double()), torch.zeros(16, dtype=torch.float64),
            torch.ones(16, dtype=torch.float64), eps=layer.bn.eps)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _adder64(x, w):
    cols = torch.nn.functional.unfold(x, 3, padding=1)  # (N, C*9, L)
    y = -(cols[:, None] - w.reshape(w.shape[0], -1, 1)[None]).abs().sum(2)
    return y.reshape(x.shape[0], w.shape[0], *x.shape[2:])


def _random_trained(name, scale, **arch):
    """A small adder model with BN statistics and power exponents away from the defaults."""
    torch.manual_seed(0)
    model = models.build(name, scale, "adder", **arch)
    for m in model.modules():
        if isinstance(m, AdderSRLayer):
            m.adder.weight.data = torch.randn_like(m.adder.weight) * 3
            m.bn.running_mean.uniform_(-300, -100)
            m.bn.running_var.uniform_(1e3, 1e4)
            m.power.alpha.data.fill_(float(torch.empty(1).uniform_(0.5, 1.5)))
    return model.eval()


@pytest.mark.parametrize("name, arch", [("edsr-baseline", {"n_blocks": 2, "n_feats": 16}),
                                        ("vdsr", {"depth": 5, "n_feats": 8})])
def test_quantized_model_follows_fp32(name, arch):
    model = _random_trained(name, 2, **arch)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 30, 3), dtype=np.uint8) for _ in range(2)]
    qmodel = quant.quantize(model, quant.calibrate(model, images))
    x = torch.from_numpy(images[0][None]).permute(0, 3, 1, 2).float()[:, :, :12, :15] / 255
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert out.shape == ref.shape and out.is_contiguous()
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.03
    assert receptive_radius(qmodel) == receptive_radius(model)
    with pytest.raises(ValueError, match="RGB batch"):
        qmodel(x[:, :1])


def test_energy_charges_int8_adder_ops():
    model = _random_trained("edsr-baseline", 2, n_blocks=1, n_feats=8)
    qmodel = quant.quantize(model, {n: [-1.0, 1.0] for n, m in model.named_modules()
                                    if isinstance(m, AdderSRLayer)})
    fp, q8 = count_ops(model, (64, 64)), count_ops(qmodel, (64, 64))
    assert fp["adder_ops"] == q8["adder_ops"] > 0
    assert fp["energy_pj"] - q8["energy_pj"] == pytest.approx(2 * fp["adder_ops"] * (0.9 - 0.03))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_in_int8_keep_their_psnr(name, one_thread):
    """Two Set5 images (the shipped assets): int8 within 0.05 dB of fp32 for each, at every
    scale the weights were trained for (multi-scale VDSR: x2, x3, x4)."""
    from addersr.data import dataset_root, list_images
    from addersr.data import read_image
    scales = models.trained_scales(models.read(name)[0])
    assert models.load(name, precision="int8").int8_scales == scales
    for scale in scales:
        m32, m8 = models.load(name, scale=scale), models.load(name, precision="int8", scale=scale)
        assert m8.calibration["set"] == "T91"
        for path in list_images(dataset_root() / "Set5")[:2]:
            lr, hr = make_pair(read_image(path), scale)
            x = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                scores = [psnr(to_uint8(m(x)), hr, scale) for m in (m32, m8)]
            assert abs(scores[0] - scores[1]) < 0.05, (path.name, scale, scores)


def test_tiled_int8_matches_whole_image():
    model = _random_trained("edsr-baseline", 2, n_blocks=1, n_feats=8)
    qmodel = quant.quantize(model, {n: [-3.0, 3.0] for n, m in model.named_modules()
                                    if isinstance(m, AdderSRLayer)})
    x = torch.rand(1, 3, 70, 66)
    with torch.no_grad():
        torch.testing.assert_close(forward_tiled(qmodel, x, 64), qmodel(x), rtol=0, atol=1e-5)


def _copy_weights(name, folder, calibration=True):
    src = models.weights_dir() / name
    for suffix in (".safetensors", ".json") + ((quant.SUFFIX,) if calibration else ()):
        shutil.copy(src.with_name(name + suffix), folder / (name + suffix))
    return folder / name


def test_load_refuses_cleanly(tmp_path):
    with pytest.raises(ValueError, match="CNN"):
        models.load("edsr-small-x2-conv-cpu", precision="int8")
    with pytest.raises(ValueError, match="precision"):
        models.load(SHIPPED[0], precision="fp16")
    with pytest.raises(ValueError, match="CPU only"):
        models.load(SHIPPED[0], precision="int8", device="meta")
    stem = _copy_weights(SHIPPED[0], tmp_path, calibration=False)
    with pytest.raises(ValueError, match="no int8 calibration") as err:
        models.load(stem, precision="int8")
    assert "\n" not in str(err.value)
    shutil.copy(models.weights_dir() / (SHIPPED[0] + quant.SUFFIX), tmp_path / (stem.name + quant.SUFFIX))
    info = json.loads(quant.calibration_path(stem).read_text())
    quant.calibration_path(stem).write_text(json.dumps({**info, "ranges_by_scale": []}))
    with pytest.raises(ValueError, match=r"int8\.json: \"ranges_by_scale\" must map scales to ranges") as err:
        models.load(stem, precision="int8")
    assert "\n" not in str(err.value)
    quant.calibration_path(stem).write_text(json.dumps(info))
    changed = models.load(stem)
    changed.body[0].body[0].adder.weight.data += 1e-3
    models.save(changed, stem)
    with pytest.raises(ValueError, match="other weights"):
        models.load(stem, precision="int8")
    quant.calibration_path(stem).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.load(stem, precision="int8")


def test_calibration_file_round_trip_and_listing(tmp_path, tiny_data, capsys):
    stem = _copy_weights(SHIPPED[0], tmp_path, calibration=False)
    assert quant.main([str(stem), "--data-root", str(tiny_data), "--images", "2"]) == 0
    info = json.loads(quant.calibration_path(stem).read_text())
    assert info["calibration"]["images"] == ["0.png", "2.png"] and len(info["ranges"]) == 9
    m8 = models.load(stem, precision="int8")
    assert [layer.scale for layer in m8.layers] == [qparams(*info["ranges"][n])[0] for n in info["ranges"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.name for p, _ in models.list_weights(tmp_path)] == [stem.name + ".safetensors"]
    assert quant.main([str(stem), "--data-root", str(tmp_path / "none")]) == 2
    assert "train/T91" in capsys.readouterr().err.replace("\\", "/")


def test_upscale_and_bench_clis_take_precision_int8(tmp_path, capsys):
    from PIL import Image

    from addersr import bench, upscale
    from addersr.data import read_image
    from addersr.data.datasets import ASSETS
    folder = tmp_path / "Tiny"
    folder.mkdir()
    Image.fromarray(read_image(ASSETS / "Set5" / "bird.png")[60:108, 50:90]).save(folder / "bird.png")
    out = tmp_path / "out"
    assert upscale.main([str(folder / "bird.png"), "-o", str(out), "--weights", SHIPPED[0],
                         "--precision", "int8", "--device", "cpu"]) == 0
    assert Image.open(out / f"bird_x{models.load(SHIPPED[0]).scale}.png").size[0] > 40
    assert upscale.main([str(folder / "bird.png"), "-o", str(out), "--weights", "edsr-small-x2-conv-cpu",
                         "--precision", "int8"]) == 2
    assert "CNN" in capsys.readouterr().err
    rows = []
    for precision in ("fp32", "int8"):
        res = tmp_path / f"{precision}.json"
        bench.main(["--weights", SHIPPED[0], "--data-root", str(tmp_path), "--datasets", "Tiny",
                    "--precision", precision, "--json", str(res), "--no-lpips"])
        (row,) = json.loads(res.read_text())["results"]
        rows.append(row)
    assert rows[1]["weights"] == SHIPPED[0] + "-int8"
    assert abs(rows[0]["psnr"] - rows[1]["psnr"]) < 0.1  # one flat 48x40 crop at 45 dB
    assert rows[1]["energy_mj"] < rows[0]["energy_mj"]
