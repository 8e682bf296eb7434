"""Operation counts against the published figures and closed-form layer counts."""

import pytest
import torch

from addersr.energy import ENERGY_PJ, count_ops, main
from addersr.models import build

HD = (720, 1280)


def _meta(name, scale, op, **kw):
    with torch.device("meta"):
        return build(name, scale, op, **kw)


def test_vdsr_conv_macs_match_published():
    c = count_ops(_meta("vdsr", 2, "conv"), HD)
    assert c["macs"] / 1e9 == pytest.approx(612.6, abs=0.05)
    assert c["adder_ops"] == 0 and c["pows"] == 0


@pytest.mark.parametrize("scale,gmacs", [(2, 316.2), (3, 160.3), (4, 114.2)])
def test_edsr_baseline_conv_macs_match_published(scale, gmacs):
    assert count_ops(_meta("edsr-baseline", scale, "conv"), HD)["macs"] / 1e9 == pytest.approx(gmacs, abs=0.05)


def test_adder_vdsr_counts_in_closed_form():
    h, w = 96, 80
    c = count_ops(_meta("vdsr", 4, "adder"), (h, w))
    px = h * w
    assert c["adder_ops"] == 18 * 64 * 64 * 9 * px
    assert c["macs"] == 2 * 64 * 9 * px  # first and last conv only
    assert c["pows"] == 18 * 64 * px
    bn = [layer for layer in c["layers"] if layer["type"] == "BatchNorm2d"]
    assert len(bn) == 18 and all(layer["mults"] == layer["adds"] == 64 * px for layer in bn)


def test_paper_edsr_counts_in_closed_form_and_fast():
    c = count_ops(_meta("edsr", 2, "adder"), HD)
    lr, hr = 640 * 360, 1280 * 720
    assert c["adder_ops"] == 65 * 256 * 256 * 9 * lr
    assert c["macs"] == (3 * 256 * 9 + 256 * 1024 * 9) * lr + 256 * 3 * 9 * hr
    conv = count_ops(_meta("edsr", 2, "conv"), HD)
    assert conv["macs"] == c["macs"] + c["adder_ops"]


def test_adder_layer_energy_ratio_is_2_56():
    counts = {op: count_ops(_meta("edsr-baseline", 2, op), (64, 64))["layers"] for op in ("conv", "adder")}
    conv = next(x for x in counts["conv"] if x["name"] == "body.0.body.0.0")
    adder = next(x for x in counts["adder"] if x["name"] == "body.0.body.0.adder")
    assert conv["macs"] == adder["adder_ops"] > 0
    assert adder["mults"] == 0 and adder["adds"] == 2 * adder["adder_ops"]
    assert conv["energy_pj"] / adder["energy_pj"] == pytest.approx((3.7 + 0.9) / (2 * 0.9))


def test_totals_energy_and_breakdown_are_consistent():
    c = count_ops(_meta("edsr-baseline", 3, "adder"), (90, 60), precision="int8")
    for key in ("mults", "adds", "adder_ops", "macs", "pows"):
        assert c[key] == sum(layer[key] for layer in c["layers"])
    e_mult, e_add = ENERGY_PJ["int8"]
    assert c["energy_pj"] == pytest.approx(c["mults"] * e_mult + c["adds"] * e_add)
    names = {layer["name"] for layer in c["layers"]}
    assert {"sub_mean", "head", "body.15.body.1.adder", "body.16.bn", "(model)"} <= names
    # residual adds: 16 blocks + long skip + 33 self-shortcuts, on 64 x 30 x 20 values each
    lr_values = 64 * 30 * 20
    own = sum(x["adds"] for x in c["layers"] if x["type"] in ("ResBlock", "EDSR", "AdderSRLayer"))
    assert own == (16 + 1 + 33) * lr_values


def test_counts_follow_a_real_run_of_a_small_model():
    """Conv MACs from hooks on a real (not meta) forward agree with count_ops."""
    model = build("edsr-baseline", 2, "conv", n_blocks=1, n_feats=4)
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.weight[0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.rand(1, 3, 7, 9))
    for h in hooks:
        h.remove()
    assert count_ops(model, (14, 18))["macs"] == sum(macs)


def test_errors():
    model = _meta("vdsr", 2, "conv")
    with pytest.raises(ValueError, match="precision"):
        count_ops(model, HD, precision="fp16")
    with pytest.raises(ValueError, match="out_size"):
        count_ops(model, (0, 10))
    with pytest.raises(ValueError, match="scale"):
        count_ops(torch.nn.Conv2d(3, 3, 3), HD)


def test_command_line(capsys):
    main(["--model", "edsr-baseline", "--scale", "4", "--size", "1280x720"])
    out = capsys.readouterr().out
    cnn = next(line for line in out.splitlines() if line.startswith("CNN"))
    adder = next(line for line in out.splitlines() if line.startswith("AdderSR"))
    assert "114.23" in cnn and "70.07" in adder  # conv MACs; adder ops of the 33 body layers
    ratio = float(adder.split()[-1].rstrip("x"))
    assert 1.3 < ratio < 2.56
