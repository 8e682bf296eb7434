"""The registry, the architectures (shapes, published parameter counts, which layers are
adder layers), VDSR's colour handling, the receptive radius and weight files."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from addersr.data import imresize
from addersr.models import (MODELS, build, list_weights, load, receptive_radius, save,
                            weights_dir)
from addersr.models.common import rgb_to_ycbcr
from addersr.nn import Adder2d, AdderSRLayer, PowerActivation

PUBLISHED = {  # conv parameters (mean shift excluded), DESIGN.md section 2
    ("vdsr", 2): 665_921, ("vdsr", 3): 665_921, ("vdsr", 4): 665_921,
    ("edsr-baseline", 2): 1_369_859, ("edsr-baseline", 3): 1_554_499, ("edsr-baseline", 4): 1_517_571,
    ("edsr", 2): 40_729_603, ("edsr", 3): 43_680_003, ("edsr", 4): 43_089_923,
}
ADDER_LAYERS = {"vdsr": 18, "edsr-baseline": 33, "edsr": 65}
SMALL = {"vdsr": {"depth": 5, "n_feats": 8}, "edsr-baseline": {"n_blocks": 2, "n_feats": 8},
         "edsr": {"n_blocks": 2, "n_feats": 8}}


def _meta(name, scale, op):
    with torch.device("meta"):
        return build(name, scale, op)


@pytest.mark.parametrize("name,scale", sorted(PUBLISHED))
def test_conv_twins_have_published_parameter_counts(name, scale):
    model = _meta(name, scale, "conv")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name, scale]
    assert not any(isinstance(m, (Adder2d, nn.BatchNorm2d, PowerActivation)) for m in model.modules())


@pytest.mark.parametrize("name,scale", sorted(PUBLISHED))
def test_adder_models_have_no_multiplicative_body_layer(name, scale):
    model = _meta(name, scale, "adder")
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if name == "vdsr":
        assert convs == ["head.0", "tail"]
    else:
        ups = ["tail.0.0", "tail.0.2"] if scale == 4 else ["tail.0.0"]
        assert convs == ["head", *ups, "tail.1"]
    adders = [m for m in model.modules() if isinstance(m, Adder2d)]
    layers = [m for m in model.modules() if isinstance(m, AdderSRLayer)]
    assert len(adders) == len(layers) == ADDER_LAYERS[name]
    assert all(isinstance(layer.bn, nn.BatchNorm2d) and isinstance(layer.power, PowerActivation)
               for layer in layers)
    if name != "vdsr":  # residual blocks: ReLU only in the first layer; body end has none
        relus = [layer.relu for layer in layers]
        assert relus == [True, False] * (len(layers) // 2) + [False]
    # parameters beyond the CNN: per adder layer, BN (2C) + alpha (1) - conv bias (C)
    c = model.head.out_channels if name != "vdsr" else 64
    extra = ADDER_LAYERS[name] * (c + 1)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name, scale] + extra


@pytest.mark.parametrize("op", ["conv", "adder"])
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", ["vdsr", "edsr-baseline"])
def test_output_shapes(name, scale, op):
    model = build(name, scale, op).eval()
    assert (model.name, model.scale, model.op) == (name, scale, op)
    x = torch.rand(2, 3, 5, 4)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 5 * scale, 4 * scale) and torch.isfinite(y).all()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shapes_paper_edsr(scale):
    for op in ("conv", "adder"):
        model = build("edsr", scale, op).eval()
        with torch.no_grad():
            y = model(torch.rand(1, 3, 4, 3))
        assert y.shape == (1, 3, 4 * scale, 3 * scale) and torch.isfinite(y).all()


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model 'srcnn'"):
        build("srcnn", 2)
    for bad in (5, 1, True, 2.5):
        with pytest.raises(ValueError, match="unsupported scale"):
            build("vdsr", bad)
    with pytest.raises(ValueError, match="unknown op 'mult'"):
        build("vdsr", 2, "mult")
    with pytest.raises(ValueError, match="n_layers"):
        build("vdsr", 2, n_layers=3)


def test_config_records_overrides_and_backend_is_passed():
    model = build("edsr-baseline", 3, "adder", backend="reference", n_blocks=1, n_feats=4)
    assert model.config == {"name": "edsr-baseline", "scale": 3, "op": "adder", "n_blocks": 1, "n_feats": 4}
    assert all(m.backend == "reference" for m in model.modules() if isinstance(m, Adder2d))
    assert set(MODELS) == {"vdsr", "edsr-baseline", "edsr"}


def test_ycbcr_is_matlab_rgb2ycbcr():
    rgb = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = (16 + 65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = (128 - 37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = (128 + 112.0 * r - 93.786 * g - 18.214 * b) / 255
    torch.testing.assert_close(rgb_to_ycbcr(rgb), torch.stack([y, cb, cr], 1), rtol=0, atol=1e-12)


def test_vdsr_is_bicubic_plus_luma_residual():
    model = build("vdsr", 3, "conv").eval().double()
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        model.tail.weight.zero_()
        model.tail.bias.fill_(0.02)  # the network's output: +0.02 on Y, nothing on Cb/Cr
        y = model(x)
    bicubic = imresize(x, 3)
    # Y + d with Cb, Cr fixed moves R, G and B by d * 255 / 219 (Y weights sum to 219/255)
    torch.testing.assert_close(y, bicubic + 0.02 * 255 / 219, rtol=0, atol=1e-12)


def test_edsr_mean_shift_is_a_constant_buffer():
    model = build("edsr-baseline", 2, "conv")
    assert not any("mean" in n for n, _ in model.named_parameters())
    assert not any("mean" in k for k in model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        y = model(torch.rand(1, 3, 4, 4))
    expected = torch.tensor([0.4488, 0.4371, 0.4040]).reshape(1, 3, 1, 1).expand_as(y)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name,scale", [("edsr-baseline", 2), ("edsr-baseline", 3), ("vdsr", 2), ("vdsr", 3)])
def test_receptive_radius_bounds_the_dependence(name, scale):
    model = build(name, scale, "conv", **SMALL[name]).double().eval()
    r = receptive_radius(model)
    size, c = 2 * r + 11, r + 5
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    x2 = x.clone()
    x2[..., c, c] += 1.0
    with torch.no_grad():
        changed = (model(x2) - model(x)).abs().amax(1)[0] > 1e-12
    rows = changed.any(1).nonzero().flatten()
    # HR rows that depend on LR row c lie within r LR pixels of it ...
    assert rows.min() >= (c - r) * scale and rows.max() < (c + 1 + r) * scale
    # ... and the bound is not loose by more than two LR pixels of safety and rounding
    assert rows.min() <= (c - r + 2.5) * scale


def test_receptive_radius_values():
    # EDSR: head 1 + 2 per block + body 1 + upsampler 1 (+ 1/2 at x4) + tail 1/s; VDSR: 2 + depth/s
    assert receptive_radius(_meta("edsr-baseline", 2, "adder")) == 37
    assert receptive_radius(_meta("edsr-baseline", 4, "conv")) == 37
    assert receptive_radius(_meta("edsr", 3, "conv")) == 69
    assert receptive_radius(_meta("vdsr", 2, "conv")) == 13
    assert receptive_radius(_meta("vdsr", 4, "adder")) == 8


# ----------------------------------------------------------------------------- weight files

def _trained_small(op="adder", name="edsr-baseline", scale=2):
    model = build(name, scale, op, **SMALL[name])
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 6, 6))  # moves the BN running statistics
        for m in model.modules():
            if isinstance(m, PowerActivation):
                m.alpha.fill_(0.9)
    return model.eval()


@pytest.mark.parametrize("op", ["adder", "conv"])
def test_save_load_round_trip_is_bit_exact(tmp_path, op):
    model = _trained_small(op)
    st, js = save(model, tmp_path / "sub" / "mine.safetensors", {"iterations": 123, "data": "T91"})
    assert st.name == "mine.safetensors" and js.name == "mine.json" and st.is_file() and js.is_file()
    info = json.loads(js.read_text())
    assert info["model"] == "edsr-baseline" and info["scale"] == 2 and info["op"] == op
    assert info["iterations"] == 123 and info["config"] == SMALL["edsr-baseline"]

    loaded = load(tmp_path / "sub" / "mine")
    assert not loaded.training and loaded.meta["data"] == "T91" and loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, 7, 5)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_round_trip_full_size_vdsr(tmp_path):
    model = build("vdsr", 4, "conv")
    save(model, tmp_path / "vdsr_x4.json")
    loaded = load(str(tmp_path / "vdsr_x4.safetensors"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters()))


def test_bare_names_and_listing(tmp_path, monkeypatch):
    monkeypatch.setenv("ADDERSR_WEIGHTS", str(tmp_path))
    assert weights_dir() == tmp_path and list_weights() == []
    save(_trained_small("conv", "vdsr", 3), tmp_path / "b_vdsr", {"psnr": 33.1})
    save(_trained_small("adder"), tmp_path / "a_edsr")
    (tmp_path / "notes.json").write_text("{}")  # not a weights description: skipped
    with pytest.warns(UserWarning, match="notes.json"):
        found = list_weights()
    assert [p.name for p, _ in found] == ["a_edsr.safetensors", "b_vdsr.safetensors"]
    assert found[1][1]["psnr"] == 33.1
    model = load("b_vdsr")
    assert (model.name, model.scale, model.op) == ("vdsr", 3, "conv")
    with pytest.raises(FileNotFoundError, match=r"nothere.json not found.*a_edsr"):
        load("nothere")


def test_default_weights_dir_is_the_repository_folder(monkeypatch):
    monkeypatch.delenv("ADDERSR_WEIGHTS", raising=False)
    folder = weights_dir()
    assert folder.name == "weights" and (folder / "__init__.py").is_file()


def test_load_errors(tmp_path):
    model = _trained_small("adder")
    st, js = save(model, tmp_path / "m")
    good_json, good_st = js.read_text(), st.read_bytes()

    js.unlink()
    with pytest.raises(FileNotFoundError, match="m.json"):
        load(tmp_path / "m")
    js.write_text(good_json)
    st.unlink()
    with pytest.raises(FileNotFoundError, match="m.safetensors"):
        load(tmp_path / "m")

    st.write_bytes(good_st[: len(good_st) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(tmp_path / "m")
    st.write_bytes(good_st)

    js.write_text(good_json[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path / "m")
    info = json.loads(good_json)
    js.write_text(json.dumps({**info, "model": "srcnn"}))
    with pytest.raises(ValueError, match="srcnn"):
        load(tmp_path / "m")
    js.write_text(json.dumps({**info, "op": "conv"}))
    with pytest.raises(ValueError, match="do not belong together"):
        load(tmp_path / "m")
    js.write_text(json.dumps({**info, "config": {"n_blocks": 2, "n_feats": 16}}))
    with pytest.raises(ValueError, match="wrong shapes"):
        load(tmp_path / "m")
    js.write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load(tmp_path / "m")
    js.write_text(good_json)

    tensors = {k: v for k, v in model.state_dict().items() if "body.0" not in k}
    save_file(tensors, str(st))  # no header, some tensors missing
    with pytest.raises(ValueError, match="missing tensors"):
        load(tmp_path / "m")


def test_save_errors(tmp_path):
    model = _trained_small("conv")
    with pytest.raises(ValueError, match="reserved"):
        save(model, tmp_path / "m", {"scale": 3})
    with pytest.raises(ValueError, match="JSON"):
        save(model, tmp_path / "m", {"when": object()})
    with pytest.raises(ValueError, match="build"):
        save(nn.Conv2d(1, 1, 3), tmp_path / "m")


@pytest.mark.parametrize("name", ["vdsr", "edsr-baseline"])
def test_adder_models_keep_activations_bounded_at_initialisation(name):
    """Self-shortcuts inside a residual block must not double the signal block after block."""
    model = build(name, 2, op="adder").train()
    assert model.config == {"name": name, "scale": 2, "op": "adder"}
    with torch.no_grad():
        out = model(torch.rand(2, 3, 24, 24))
    assert torch.isfinite(out).all()
    assert out.std() < 10, f"output std {out.std():.3g} at initialisation"


def test_adder_edsr_baseline_defaults_to_small_res_scale():
    assert build("edsr-baseline", 2, op="adder").body[0].res_scale == 0.1
    assert build("edsr-baseline", 2, op="conv").body[0].res_scale == 1.0
    assert build("edsr-baseline", 2, op="adder", res_scale=1.0).body[0].res_scale == 1.0
