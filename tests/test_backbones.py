"""Every backbone trains with its default recipe: each model of the registry, adder and conv,
at scales 2, 3 and 4, at its real depth, for a few dozen steps of ``python -m addersr.train``
with nothing but the batch, patch, width and step count reduced: the loss stays finite and
the trained network fits its training batches better than the network it started from
(by at least 3%: the small CNN EDSRs at x4 gain 4-7% in 40 steps of Adam at 1e-4)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from addersr import models, train
from addersr.models.common import rgb_to_ycbcr
from addersr.training import optim

pytestmark = pytest.mark.usefixtures("one_thread")

ASSETS = Path(models.__file__).resolve().parent.parent / "assets"  # Set5, as a training set here
CASES = [(name, op, scale) for name in sorted(models.MODELS) for op in models.OPS for scale in models.SCALES]


def _train(tmp_path, name, op, scale, *extra, iters=40):
    argv = ["--model", name, "--op", op, "--scale", str(scale), "--data-root", str(ASSETS),
            "--train-sets", "Set5", "--iters", str(iters), "--val-every", "0", "--ckpt-every", "0",
            "--out", str(tmp_path), "--workers", "0", "--device", "cpu", *extra]
    return train.main(argv)


def _initial(trainer):
    """The network the run started from: built and prepared as the trainer's own (same seed)."""
    cfg = trainer.cfg
    torch.manual_seed(cfg["seed"])
    model = models.build(cfg["model"], cfg["scale"], op=cfg["op"], **cfg["arch"])
    optim.apply_adder_options(model, cfg, fresh=True)
    return model


@torch.no_grad()
def _fit(model, trainer, batches=4):
    """Mean L1 of ``model`` (batch statistics, as in training) on the run's first batches."""
    model.train()
    total = 0.0
    for i in range(batches):
        lr_u8, hr_u8 = trainer.data[i]
        sr, hr = model(lr_u8.float() / 255), hr_u8.float() / 255
        if trainer.cfg["model"] == "vdsr":
            sr, hr = rgb_to_ycbcr(sr)[:, :1], rgb_to_ycbcr(hr)[:, :1]
        total += float(F.l1_loss(sr, hr))
    return total / batches


def _check(trainer):
    before, after = _fit(_initial(trainer), trainer), _fit(trainer.model, trainer)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert after < 0.97 * before, f"loss {before:.4f} -> {after:.4f}: the default recipe did not learn"


@pytest.mark.parametrize("name, op, scale", CASES)
def test_default_recipe_trains_at_real_depth(tmp_path, name, op, scale):
    patch = ["--patch", "24"] if name != "vdsr" else []  # VDSR keeps its 41x41 HR patches
    trainer = _train(tmp_path, name, op, scale, "--arch", "n_feats=8", "--batch", "4", *patch)
    adder = {"vdsr": "sgd+adam", "edsr": "sgd+adam", "edsr-baseline": "sgd"}  # each backbone's own
    assert trainer.cfg["optimizer"] == (adder[name] if op == "adder" else "adam")
    _check(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("vdsr", ["--batch", "4"]),
                                         ("edsr", ["--batch", "2", "--patch", "8"])])
def test_default_recipe_trains_at_full_size(tmp_path, name, extra):
    """VDSR 20 x 64 and EDSR 32 x 256 as the paper's, adder, with their default recipes."""
    _check(_train(tmp_path, name, "adder", 2 if name == "vdsr" else 4, *extra, iters=20))


def test_adjustable_clipping_bounds_every_step_by_theta(tmp_path):
    """VDSR's clipping: each gradient value within +-theta / lr, so one SGD step moves no
    weight by more than theta (and without it some weight moves further)."""
    def moved(*extra):
        trainer = _train(tmp_path, "vdsr", "conv", 2, "--arch", "depth=3", "n_feats=8", "--batch", "2",
                         "--optimizer", "sgd", "--lr", "100", *extra, iters=1)
        start = _initial(trainer).state_dict()
        return max(float((p - start[k]).abs().max()) for k, p in trainer.model.state_dict().items())
    theta = 1e-3
    assert 0 < moved("--clip-adjustable", str(theta)) <= theta * (1 + 1e-5)
    assert moved() > 10 * theta
