"""VDSR's multi-scale training (``--model vdsr --scale 2 3 4``): mixed batches, one forward
over several scales, per-scale validation and export, and the weights served at each of
their scales by ``load``, the bench, the upscale CLI and the demo service."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from addersr import bench, models, train, upscale
from addersr.data import imresize
from addersr.data.patches import PatchBatches, load_training_images, vdsr_patch
from addersr.demo import Refused, Upscaler
from addersr.energy import count_ops
from addersr.training import config
from addersr.eval import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: thread wake-ups dominate

SCALES = [2, 3, 4]
TINY = ["--arch", "depth=3", "n_feats=8"]


@pytest.fixture(scope="module")
def data(sr_data):
    return sr_data


def _argv(data, out, *extra, scales=SCALES, op="adder", patch=6, batch=3, iters=2, model="vdsr"):
    return ["--model", model, "--op", op, "--scale", *map(str, scales), *TINY, "--data-root",
            str(data / "train"), "--train-sets", "A", "--patch", str(patch), "--batch", str(batch),
            "--iters", str(iters), "--val-every", "0", "--out", str(out), "--workers", "0",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module", params=["adder", "conv"])
def trained(request, data, tmp_path_factory):
    """A two-step multi-scale run, validated at its end and exported to ``weights/ms``."""
    tmp = tmp_path_factory.mktemp(f"run_{request.param}")
    export = tmp / "weights" / "ms"
    run = train.main(_argv(data, tmp / "run", "--val-every", "2", "--val-data", str(data / "Set5"),
                           "--export", str(export), op=request.param))
    return run, export


# --- data and model ----------------------------------------------------------------------

def test_vdsr_patch_is_one_hr_size_for_every_scale():
    assert [vdsr_patch(s) for s in SCALES] == [21, 14, 11]  # the single-scale rule, ceil(41 / s)
    assert vdsr_patch(SCALES) == 24 and vdsr_patch([3, 2]) == 14 and vdsr_patch([4, 2]) == 11
    for scales in (SCALES, [3, 2], [4, 2], [3, 4]):
        hr = vdsr_patch(scales) * scales[0]
        assert hr >= 41 and all(hr % s == 0 for s in scales) and hr - np.lcm.reduce(scales) < 41


def test_mixed_batch_holds_each_scale(data):
    images, _ = load_training_images(data / "train", ["A"])
    mixed = PatchBatches(images, 2, 12, batch=8, seed=3, rank=1, scales=SCALES)
    for index in (0, 5):
        lrs, hr = mixed.numpy_batch(index)
        assert [lr.shape for lr in lrs] == [(3, 3, 12, 12), (3, 3, 8, 8), (2, 3, 6, 6)]
        assert hr.shape == (8, 3, 24, 24) and hr.dtype == np.uint8
        # the first part is the single-scale batch of its size
        lr2, hr2 = PatchBatches(images, 2, 12, batch=3, seed=3, rank=1).numpy_batch(index)
        assert np.array_equal(lrs[0], lr2) and np.array_equal(hr[:3], hr2)
        starts = np.cumsum([0] + [len(lr) for lr in lrs])
        for s, lr, part in zip(SCALES, lrs, np.split(hr, starts[1:-1])):
            for a, b in zip(lr, part):  # each LR patch is the x1/s bicubic shrink of its HR patch
                down = imresize(np.ascontiguousarray(b.transpose(1, 2, 0)), 1 / s).astype(int)
                diff = np.abs(down[2:-2, 2:-2] - a.transpose(1, 2, 0)[2:-2, 2:-2].astype(int))
                assert diff.max() <= 1, (s, diff.max())
            for b in part[:1] if index else part:  # ... a crop of an image, one of the 8 transforms
                dihedral = [f(np.rot90(b, k, axes=(1, 2))).transpose(1, 2, 0)
                            for k in range(4) for f in (lambda x: x, lambda x: x[:, :, ::-1])]
                assert any((np.lib.stride_tricks.sliding_window_view(im, c.shape) == c).all(axis=(-3, -2, -1)).any()
                           for c in dihedral for im in images)
    lrs, hr = mixed[5]  # tensors, and the same batch for the same (seed, rank, index)
    again = PatchBatches(images, 2, 12, batch=8, seed=3, rank=1, scales=SCALES)[5]
    assert all(torch.equal(a, b) for a, b in zip(lrs, again[0])) and torch.equal(hr, again[1])
    assert not torch.equal(hr, mixed[4][1])


@pytest.mark.parametrize("scales, patch, batch, message", [
    ([2, 3], 5, 4, "not a multiple of the scale"), ([2, 3, 4], 6, 2, "cannot hold"),
    ([3, 2], 6, 4, "begin with the scale 2")])
def test_mixed_batch_errors(data, scales, patch, batch, message):
    images, _ = load_training_images(data / "train", ["A"])
    with pytest.raises(ValueError, match=message):
        PatchBatches(images, 2, patch, batch, scales=scales)


@pytest.mark.parametrize("op", ["adder", "conv"])
def test_one_forward_over_several_scales(op):
    """The layers run once over the enlargements of every scale: the same as each scale's own
    network on its own part (eval mode: batch norm then does not depend on the batch)."""
    torch.manual_seed(0)
    model = models.build("vdsr", 2, op=op, depth=3, n_feats=8).eval()
    parts = [torch.rand(2, 3, 9, 9), torch.rand(1, 3, 6, 6), torch.rand(3, 3, 9, 9)]
    scales = [2, 3, 2]  # a scale may come back: each part is enlarged by its own
    with torch.no_grad():
        mixed = model(parts, scales)
        own = torch.cat([model.at_scale(s)(x) for x, s in zip(parts, scales)])
    assert mixed.shape == (6, 3, 18, 18)
    assert torch.allclose(mixed, own, atol=1e-5)
    copy = model.at_scale(3)
    assert (copy.scale, copy.config["scale"], model.scale) == (3, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="needs a list of as many scales"):
        model(parts, [2, 3])
    with pytest.raises(ValueError, match="different sizes"):
        model([parts[0], parts[1][..., :5]], [2, 3])
    with pytest.raises(ValueError, match="use at_scale"):
        model(parts[0], 3)
    with pytest.raises(ValueError, match="unsupported scale"):
        model.at_scale(5)


# --- training, export and serving ----------------------------------------------------------

def test_training_validates_and_exports_every_scale(trained, data):
    run, export = trained
    assert run.cfg["scales"] == SCALES and run.cfg["scale"] == 2 and run.model.scale == 2
    meta = json.loads(export.with_suffix(".json").read_text())
    assert (meta["scale"], meta["scales"]) == (2, SCALES)
    by_scale = meta["metrics_by_scale"]
    assert sorted(by_scale) == ["2", "3", "4"]
    assert meta["metrics"] == by_scale["2"]  # single-scale readers see the first scale
    psnrs = [by_scale[str(s)]["Set5"]["psnr"] for s in SCALES]
    assert run.last_val["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-12)  # "best" uses the mean
    assert train.load_checkpoint(run.out / "best.pt")["best_psnr"] == pytest.approx(np.mean(psnrs))
    trained_state = run.model.state_dict()
    for s in SCALES:
        net = models.load(export, scale=s)
        assert net.scale == s and net.config["scale"] == s and net.meta["scales"] == SCALES
        assert all(torch.equal(v, trained_state[k].cpu()) for k, v in net.state_dict().items())
        # the recorded score of each scale is the exported weights' under the bench protocol
        result = evaluate(net, data / "Set5", s, device="cpu", progress=False)
        assert by_scale[str(s)]["Set5"]["psnr"] == pytest.approx(result["psnr"], abs=1e-9)
        assert by_scale[str(s)]["Set5"]["iteration"] == 2
    assert models.load(export).scale == 2  # the recorded scale by default
    with pytest.raises(ValueError, match=r"ms serves x2, x3, x4, not x5"):
        models.load(export, scale=5)


def test_bench_scores_every_trained_scale(trained, data):
    run, export = trained
    meta = json.loads(export.with_suffix(".json").read_text())
    argv = ["--weights", str(export), "--data-root", str(data), "--datasets", "Set5", "--no-lpips",
            "--device", "cpu"]
    rows = bench.main(argv)
    assert [r["scale"] for r in rows] == SCALES
    for r in rows:
        assert r["psnr"] == pytest.approx(meta["metrics_by_scale"][str(r["scale"])]["Set5"]["psnr"], abs=1e-9)
    assert [r["scale"] for r in bench.main(argv + ["--scales", "4", "3"])] == [3, 4]


def test_upscale_cli_at_each_scale(trained, tmp_path, capsys):
    run, export = trained
    rgb = np.random.default_rng(4).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    for s in (3, None):
        extra = ["--scale", str(s)] if s else []
        code = upscale.main([str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--weights",
                             str(export), "--device", "cpu", *extra])
        s = s or 2
        out = np.asarray(Image.open(tmp_path / "out" / f"in_x{s}.png"))
        with torch.no_grad():
            want = models.load(export, scale=s)(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
        assert code == 0 and out.shape == (9 * s, 11 * s, 3)
        assert np.abs(out.astype(int) - np.rint(want * 255).astype(int)).max() <= 1
    capsys.readouterr()
    code = upscale.main([str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--weights", str(export),
                         "--device", "cpu", "--scale", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: cannot load weights: ms serves x2, x3, x4, not x5"]


def test_demo_service_at_each_scale(trained, tmp_path):
    run, export = trained
    up = Upscaler(export.parent, device="cpu")
    meta = up.catalogue.weights["ms"]
    assert up.catalogue.scales() == SCALES
    for s in SCALES:
        (label, name), = up.catalogue.choices(s)
        psnr = meta["metrics_by_scale"][str(s)]["Set5"]["psnr"]
        assert name == "ms" and label.startswith(f"vdsr x{s} ") and f"Set5 {psnr:.2f} dB" in label
        assert up.catalogue.default(s) == "ms"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (7, 10, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for s, want in ((3, 3), (None, 2), ("4", 4)):
        result = up.upscale(str(tmp_path / "a.png"), "ms", scale=s)
        assert result.request.scale == want and result.out_size == (10 * want, 7 * want)
        ops = count_ops(models.load(export, scale=want), out_size=(7 * want, 10 * want))
        assert {k: result.ops[k] for k in ("mults", "adds")} == {k: ops[k] for k in ("mults", "adds")}
    assert sorted(up._models) == [("ms", s, "fp32") for s in (2, 3, 4)]  # one per scale, cached
    with pytest.raises(Refused, match="ms enlarges x2, x3, x4, not x5"):
        up.check(str(tmp_path / "a.png"), "ms", scale=5)
    with pytest.raises(Refused, match="whole number"):
        up.check(str(tmp_path / "a.png"), "ms", scale="x3")


def test_resume_and_init_continue_a_multi_scale_run(data, tmp_path, capsys):
    straight = train.main(_argv(data, tmp_path / "a", op="conv", iters=4))
    train.main(_argv(data, tmp_path / "b", "--ckpt-every", "2", op="conv", iters=2))
    resumed = train.main(_argv(data, tmp_path / "b", "--resume", op="conv", iters=4))
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert train.load_checkpoint(tmp_path / "b" / "last.pt")["config"]["scales"] == SCALES
    export = tmp_path / "w"
    train.main(_argv(data, tmp_path / "c", "--export", str(export), op="conv", iters=1))
    capsys.readouterr()
    run = train.main(["--init", str(export), "--data-root", str(data / "train"), "--val-every", "0",
                      "--iters", "2", "--out", str(tmp_path / "d"), "--workers", "0", "--device", "cpu"])
    assert "continuing at iteration 1" in capsys.readouterr().err
    assert run.cfg["scales"] == SCALES and run.iteration == 2 and run.cfg["patch"] == 6


def test_single_scale_runs_stay_as_they_were(data, tmp_path):
    export = tmp_path / "one"
    run = train.main(_argv(data, tmp_path / "r", "--val-every", "1", "--val-data", str(data / "Set5"),
                           "--export", str(export), scales=[3], op="conv", iters=1))
    meta = json.loads(export.with_suffix(".json").read_text())
    assert "scales" not in run.cfg and "scales" not in meta and "metrics_by_scale" not in meta
    assert "by_scale" not in run.last_val
    for argv, out in ((["--scale", "3"], "runs/edsr_x3_adder"), (["--model", "vdsr", "--scale", "2", "3", "4"],
                                                                 "runs/vdsr_x2-3-4_adder")):
        args = train.parse_args(argv)
        assert config.resolve(train._options(args))["out"] == out
    assert models.trained_scales(meta) == [3]
    with pytest.raises(ValueError, match="serves x3, not x2"):
        models.load(export, scale=2)
    bad = dict(meta, scales=[2, 3])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "bad.safetensors").write_bytes(export.with_suffix(".safetensors").read_bytes())
    with pytest.raises(ValueError, match=r'bad.json: "scales" must be a list of distinct scales beginning'):
        models.load(tmp_path / "bad")


@pytest.mark.parametrize("extra, message", [
    (dict(model="edsr-baseline"), "--scale takes one scale for edsr-baseline: its upsampler is scale-specific"),
    (dict(scales=[2, 2]), "give distinct scales among 2, 3, 4"),
    (dict(scales=[2, 5]), "give distinct scales among 2, 3, 4"),
    (dict(patch=5), "must be a multiple of every scale, not of 3, 4"),
    (dict(batch=2), "--batch 2 cannot hold a patch of each of the 3 scales"),
])
def test_bad_multi_scale_runs_are_one_line_errors(data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, tmp_path, **extra))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "last.pt").exists()


def test_teacher_is_refused_with_several_scales(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, tmp_path, "--teacher", "whatever"))
    assert exc.value.code == 2 and "--teacher distils at one scale" in capsys.readouterr().err


def test_int8_serves_the_calibrated_scale_only(tmp_path):
    """A calibration file without ``scales`` (written before multi-scale calibration) covers
    the weights' recorded scale alone; another trained scale is a one-line error."""
    from addersr import quant
    models.save(models.build("vdsr", 2, op="adder", depth=3, n_feats=8), tmp_path / "q", {"scales": SCALES})
    images = [np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)]
    quant.save_calibration(tmp_path / "q", quant.calibrate(models.load(tmp_path / "q"), images), ["a.png"])
    assert models.load(tmp_path / "q", precision="int8", scale=2).scale == 2
    assert models.load(tmp_path / "q", scale=3).scale == 3  # fp32 serves every trained scale
    with pytest.raises(ValueError, match=r"^q: int8 serves x2 only \(its calibration\), not x3; "
                       r"recalibrate \(python -m addersr.quant q\) or use fp32 for it$"):
        models.load(tmp_path / "q", precision="int8", scale=3)


def _calibrated_ms(tmp_path, seed=0):
    """Multi-scale adder VDSR weights ``ms`` calibrated by ``python -m addersr.quant`` on a
    T91 folder of random images (every trained scale)."""
    from addersr import quant
    torch.manual_seed(seed)
    model = models.build("vdsr", 2, op="adder", depth=4, n_feats=8)
    with torch.no_grad():  # BN statistics of a trained model: not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-3, -1), m.running_var.uniform_(0.5, 2)
    models.save(model, tmp_path / "ms", {"scales": SCALES})
    folder = tmp_path / "data" / "train" / "T91"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(3):
        smooth = np.kron(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8), np.ones((6, 6, 1), np.uint8))
        Image.fromarray(smooth).save(folder / f"{i}.png")
    assert quant.main([str(tmp_path / "ms"), "--data-root", str(tmp_path / "data")]) == 0
    return quant


def _flat(ranges):
    """{(layer, 0): lo, (layer, 1): hi}: calibration ranges in a form pytest.approx compares."""
    return {(name, i): v for name, lohi in ranges.items() for i, v in enumerate(lohi)}


def test_int8_calibration_covers_every_trained_scale(tmp_path, capsys):
    """``python -m addersr.quant`` on multi-scale weights measures each layer's range at every
    trained scale, records those ranges, their union and the scales: int8 then serves each
    scale with its own ranges, close to fp32, in load, the bench and the demo service."""
    from addersr.nn.quantized import qparams
    quant = _calibrated_ms(tmp_path)
    assert "at x2, x3, x4" in capsys.readouterr().out
    info = json.loads((tmp_path / "ms.int8.json").read_text())
    assert info["scales"] == SCALES and sorted(info["ranges_by_scale"]) == [str(s) for s in SCALES]
    fp32 = models.load(tmp_path / "ms")
    fp32.meta = None  # served_scales: the model's own scale, so at_scale(s) calibrates s alone
    images, _ = quant.calibration_images(tmp_path / "data")
    for s in SCALES:  # each scale's own ranges, and the union holds them
        alone = quant.calibrate(fp32.at_scale(s), images)
        assert _flat(alone) == pytest.approx(_flat(info["ranges_by_scale"][str(s)]))
        for name, (lo, hi) in alone.items():
            assert info["ranges"][name][0] <= lo + 1e-6 and hi <= info["ranges"][name][1] + 1e-6
    assert _flat(info["ranges"]) == pytest.approx(_flat(quant._union(info["ranges_by_scale"].values())))
    x = torch.from_numpy(images[0][:20, :22].copy()).permute(2, 0, 1)[None].float() / 255
    for s in SCALES:
        q = models.load(tmp_path / "ms", precision="int8", scale=s)
        assert q.scale == s and q.int8_scales == SCALES
        own = info["ranges_by_scale"][str(s)]
        assert [layer.scale for layer in q.layers] == [qparams(*own[n])[0] for n in own]
        want = models.load(tmp_path / "ms", scale=s)(x)
        got = q(x)
        assert got.shape == want.shape == (1, 3, 20 * s, 22 * s)
        assert (got - want).abs().max() < 0.02
    up = Upscaler(tmp_path, device="cpu")
    assert [up.precisions("ms", s) for s in SCALES] == [("int8", "fp32")] * 3
    Image.fromarray(images[0][:10, :12]).save(tmp_path / "a.png")
    assert up.upscale(str(tmp_path / "a.png"), "ms", scale=4).precision == "int8"
    bench_dir = tmp_path / "bench" / "Set5"
    bench_dir.mkdir(parents=True)
    Image.fromarray(images[1][:24, :24]).save(bench_dir / "b.png")
    rows = bench.main(["--weights", str(tmp_path / "ms"), "--data-root", str(tmp_path / "bench"),
                       "--datasets", "Set5", "--no-lpips", "--device", "cpu", "--precision", "int8"])
    assert [r["scale"] for r in rows] == SCALES
