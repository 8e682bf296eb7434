"""Precise batch-norm statistics (``--precise-bn N``): the running statistics recomputed for
the current weights before validation and export, without touching the training."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from addersr import models, train
from addersr.data.patches import PatchBatches, load_training_images
from addersr.training import bnstats

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recompute_is_the_mean_over_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.BatchNorm2d(3))
    model.eval()
    batches = [torch.randn(2 + i, 2, 7, 6) * (1 + i) + i for i in range(4)]
    assert bnstats.recompute(model, model, batches) == 2
    feats = [model[0](b) for b in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats])
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats])
    torch.testing.assert_close(model[1].running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, var.mean(0), rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.3 and model[3].momentum == 0.1 and not model.training
    assert bnstats.recompute(nn.Conv2d(1, 1, 1), lambda b: None, batches) == 0


def test_other_stream_is_independent_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (30, 34, 3), dtype=np.uint8) for _ in range(3)]
    data = PatchBatches(images, 2, 6, 4, seed=3, length=10)
    assert np.array_equal(data.numpy_batch(5)[0], data[5][0].numpy())  # stream 0: the training batches
    assert not np.array_equal(data.numpy_batch(5, stream=1)[0], data.numpy_batch(5)[0])
    assert np.array_equal(data.tensors(5, stream=1)[0].numpy(), data.numpy_batch(5, stream=1)[0])


@pytest.fixture(scope="module")
def data(sr_data):
    return sr_data


def _run(data, out, *extra, model="vdsr", scales=("2", "3")):
    arch = ["depth=4", "n_feats=8"] if model == "vdsr" else ["n_blocks=1", "n_feats=8"]
    return train.main(["--model", model, "--scale", *scales, "--arch", *arch, "--data-root", str(data / "train"),
                       "--train-sets", "A", "--patch", "6", "--batch", "4", "--iters", "6",
                       "--lr-schedule", "cosine", "--val-every", "3", "--val-data", str(data / "Set5"),
                       "--out", str(out), "--workers", "0", "--device", "cpu", "--export",
                       str(out / "w"), *extra])


@pytest.mark.parametrize("model, scales", [("vdsr", ("2", "3")), ("edsr-baseline", ("2",))])
def test_training_recomputes_before_validation_and_export(data, tmp_path, model, scales):
    """The same run with and without --precise-bn: identical weights and losses (the training
    is not touched), and the exported statistics are those of 5 batches of stream 1 of the
    final weights; the recipe records it."""
    _run(data, tmp_path / "plain", model=model, scales=scales)
    precise = _run(data, tmp_path / "precise", "--precise-bn", "5", model=model, scales=scales)
    a, b = models.load(tmp_path / "plain" / "w"), models.load(tmp_path / "precise" / "w")
    sa, sb = a.state_dict(), b.state_dict()
    stats = [k for k in sa if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(sa[k], sb[k]) for k in sa if k not in stats and "num_batches" not in k)
    assert not all(torch.equal(sa[k], sb[k]) for k in stats)
    # recompute from the plain run's weights: the precise run's exported statistics
    images, _ = load_training_images(data / "train", ["A"])
    cfg = precise.cfg
    stream = PatchBatches(images, cfg["scale"], cfg["patch"], cfg["batch"], seed=0, length=6,
                          scales=cfg.get("scales"))
    unit = lambda x: [t.float() / 255 for t in x] if isinstance(x, list) else x.float() / 255  # noqa: E731
    sc = cfg.get("scales")
    bnstats.recompute(a, lambda i: a(unit(stream.tensors(i, 1)[0]), sc) if sc else a(unit(stream.tensors(i, 1)[0])),
                      range(5))
    for k in stats:
        torch.testing.assert_close(a.state_dict()[k], sb[k], rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "precise" / "w.json").read_text())
    assert meta["recipe"]["precise_bn"] == 5
    assert json.loads((tmp_path / "plain" / "w.json").read_text())["recipe"]["precise_bn"] == 0
    assert [h["iteration"] for h in meta["validation"]] == [3, 6]


def test_bad_precise_bn_is_a_one_line_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(data, tmp_path / "bad", "--precise-bn", "-1")
    assert exc.value.code == 2 and "--precise-bn must be >= 0, got -1" in capsys.readouterr().err
