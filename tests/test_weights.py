"""The shipped weights: complete metadata, small files, a CNN twin for every adder model
that the adder model keeps up with, and recorded Set5 scores that the evaluation protocol
reproduces."""

from pathlib import Path

import pytest

from addersr import models
from addersr.eval import evaluate

SHIPPED = models.list_weights()
SET5 = Path(models.__file__).resolve().parent.parent / "assets" / "Set5"
pytestmark = pytest.mark.skipif(not SHIPPED, reason="no shipped weights")


def _names():
    return [path.stem for path, _ in SHIPPED]


@pytest.mark.parametrize("path, meta", SHIPPED, ids=_names())
def test_metadata_and_size(path, meta):
    for key in ("model", "scale", "op", "config", "iterations", "seconds", "device", "train_sets",
                "recipe"):
        assert meta.get(key) not in (None, ""), key
    assert meta["metrics"]["Set5"]["iteration"] == meta["iterations"]  # scored as shipped
    for suffix in (".safetensors", ".json"):
        assert path.with_suffix(suffix).stat().st_size < 20e6
    if int(meta["scale"]) != 2:  # x3 and x4 start from the x2 body
        assert meta["parent"]["scale"] == 2 and meta["parent"]["weights"] in _names()


def test_every_adder_model_has_its_cnn_twin():
    cnn = [models.twin_key(m) for _, m in SHIPPED if m["op"] == "conv"]
    assert all(models.twin_key(m) in cnn for _, m in SHIPPED if m["op"] == "adder")


def _set5(meta, scale):
    """The recorded Set5 score of ``meta`` at ``scale`` (multi-scale weights: ``metrics_by_scale``)."""
    metrics = meta["metrics"] if scale == meta["scale"] else meta["metrics_by_scale"][str(scale)]
    return metrics["Set5"]


def test_adder_models_are_within_0_3_db_of_their_twins():
    """Issue 13's bar: no shipped adder model is more than 0.3 dB below its CNN twin on Set5
    at any scale it serves (the recorded scores, which the test below reproduces)."""
    psnr = {(m["op"], models.twin_key(m), s): _set5(m, s)["psnr"] for _, m in SHIPPED
            for s in models.trained_scales(m)}
    gaps = {tuple(key): psnr[("conv", *key)] - p for (op, *key), p in psnr.items()
            if op == "adder" and ("conv", *key) in psnr}
    assert gaps and all(gap <= 0.3 for gap in gaps.values()), gaps


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path, meta", SHIPPED, ids=_names())
def test_recorded_set5_score_is_reproduced(path, meta):
    """The bench protocol on the copy of Set5 in the package gives the JSON's score, at every
    scale the weights serve."""
    if not SET5.is_dir():
        pytest.skip("the package's copy of Set5 is not here")
    for scale in models.trained_scales(meta):
        result = evaluate(models.load(path.with_suffix(""), scale=scale), SET5, scale, device="cpu",
                          progress=False)
        want = _set5(meta, scale)
        assert result["psnr"] == pytest.approx(want["psnr"], abs=2e-3), scale
        assert result["ssim"] == pytest.approx(want["ssim"], abs=2e-4), scale
