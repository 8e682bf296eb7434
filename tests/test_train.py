"""Training: data pipeline, smoke runs of every model and op, exact resume, NaN stop,
checkpoints, export, DDP on two CPU processes (gloo) and bad arguments."""

import json
import os
import re
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from addersr import models, train
from addersr.training import config, distributed
from addersr.nn import Adder2d, AdderSRLayer, PowerActivation
from addersr.data import imresize
from addersr.data.patches import PatchBatches, augment, load_training_images, make_lr_images


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: thread wake-ups dominate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A training root with set A (three RGB images and a gray one) and a validation folder."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    (root / "train" / "A").mkdir(parents=True)
    (root / "train" / "Empty").mkdir()
    (root / "val").mkdir()
    for i, (h, w) in enumerate([(40, 36), (44, 52), (37, 41)]):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "train" / "A" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (30, 34), dtype=np.uint8)).save(root / "train" / "A" / "g.png")
    for i in range(2):
        smooth = np.kron(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
        Image.fromarray(smooth).save(root / "val" / f"{i}.png")
    return root


def _argv(data, out, *extra, model="edsr-baseline", op="adder", scale=2, patch=6, batch=2, iters=2):
    return ["--model", model, "--op", op, "--scale", str(scale), "--data-root", str(data / "train"),
            "--train-sets", "A", "--patch", str(patch), "--batch", str(batch), "--iters", str(iters),
            "--val-every", "0", "--out", str(out), "--workers", "0", "--device", "cpu", *extra]


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --- data pipeline -------------------------------------------------------------------------

def test_patches_aligned_with_bicubic_of_hr_patch(data):
    images, _ = load_training_images(data / "train", ["A"])
    assert len(images) == 4 and all(im.ndim == 3 and im.shape[2] == 3 for im in images)
    scale, patch = 3, 8
    ds = PatchBatches(images, scale, patch, batch=6, seed=5)
    for index in range(3):
        lr, hr = ds.numpy_batch(index)
        assert lr.shape == (6, 3, patch, patch) and hr.shape == (6, 3, scale * patch, scale * patch)
        assert lr.dtype == hr.dtype == np.uint8
        for a, b in zip(lr, hr):
            # away from the patch border (2 LR pixels of kernel support) the LR patch is the
            # MATLAB bicubic shrink of the HR patch (+-1 for the pass order after a transpose)
            down = imresize(np.ascontiguousarray(b.transpose(1, 2, 0)), 1 / scale).astype(int)
            diff = np.abs(down[2:-2, 2:-2] - a.transpose(1, 2, 0)[2:-2, 2:-2].astype(int))
            assert diff.max() <= 1
        # each HR patch is a crop of a training image under one of the 8 transforms
        for b in hr:
            dihedral = [f(np.rot90(b, k, axes=(1, 2))).transpose(1, 2, 0)
                        for k in range(4) for f in (lambda x: x, lambda x: x[:, :, ::-1])]
            assert any((np.lib.stride_tricks.sliding_window_view(im, c.shape) == c).all(axis=(-3, -2, -1)).any()
                       for c in dihedral for im in images)


def test_batches_deterministic_per_seed_rank_index_and_workers(data):
    images, _ = load_training_images(data / "train", ["A"])
    ds = PatchBatches(images, 2, 5, batch=4, seed=3, rank=0, length=6)
    other_rank = PatchBatches(images, 2, 5, batch=4, seed=3, rank=1, length=6)
    other_seed = PatchBatches(images, 2, 5, batch=4, seed=4, rank=0, length=6)
    first = [ds[i] for i in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, [ds[i] for i in range(6)]))
    assert not torch.equal(first[0][1], first[1][1])
    assert not torch.equal(first[0][1], other_rank[0][1])
    assert not torch.equal(first[0][1], other_seed[0][1])
    assert first[0][0].shape == (4, 3, 5, 5) and first[0][1].shape == (4, 3, 10, 10)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(2, 6), num_workers=2)
    for (lr, hr), (lr0, hr0) in zip(loader, first[2:]):
        assert torch.equal(lr, lr0) and torch.equal(hr, hr0)
    with pytest.raises(IndexError):
        ds[6]


def test_augment_gives_the_eight_dihedral_transforms():
    rng = np.random.default_rng(0)
    lr0 = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    hr0 = np.kron(lr0, np.ones((1, 2, 2), np.uint8))  # nearest x2 of lr0
    out_lr, out_hr = augment([lr0] * 8, [hr0] * 8, np.arange(8))
    assert out_lr.shape == (8, 3, 4, 4) and out_hr.shape == (8, 3, 8, 8)
    group = {np.ascontiguousarray(f(np.rot90(hr0, k, axes=(1, 2)))).tobytes()
             for k in range(4) for f in (lambda a: a, lambda a: a[:, ::-1])}
    assert len(group) == 8 and {o.tobytes() for o in out_hr} == group
    for a, b in zip(out_lr, out_hr):  # the same transform on both
        assert np.array_equal(np.kron(a, np.ones((1, 2, 2), np.uint8)), b)


def test_sampling_proportional_to_patch_positions():
    big = np.zeros((40, 40, 3), np.uint8)
    small = np.full((12, 12, 3), 255, np.uint8)
    ds = PatchBatches([big, small], 2, 4, batch=256, seed=0)
    # positions: big (20-4+1)^2 = 289, small (6-4+1)^2 = 9
    frac = np.mean([(ds.numpy_batch(i)[0][:, 0, 0, 0] == 255).mean() for i in range(8)])
    assert abs(frac - 9 / 298) < 0.015


def test_patches_errors(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_training_images(data / "train", ["Nope"])
    with pytest.raises(ValueError, match="holds no images"):
        load_training_images(data / "train", ["Empty"])
    with pytest.raises(FileNotFoundError):
        load_training_images(tmp_path / "missing", ["A"])
    with pytest.raises(ValueError, match="large enough"):
        PatchBatches([np.zeros((10, 10, 3), np.uint8)], 4, 3, batch=1)
    hrs, lrs = make_lr_images([np.zeros((11, 13, 3), np.uint8)], 3)
    assert hrs[0].shape == (9, 12, 3) and lrs[0].shape == (3, 4, 3)


# --- training runs -------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["adder", "conv"])
@pytest.mark.parametrize("model", ["vdsr", "edsr-baseline", "edsr"])
def test_smoke_every_model_and_op(data, tmp_path, model, op):
    heavy = model == "edsr"
    run = train.main(_argv(data, tmp_path, model=model, op=op, patch=4 if heavy else 6,
                           batch=1 if heavy else 2, iters=1 if heavy else 2))
    assert run.iteration == (1 if heavy else 2)
    torch.manual_seed(0)
    init = _params(models.build(model, 2, op=op))
    changed = [k for k, v in _params(run.model).items() if not torch.equal(v, init[k])]
    assert changed, "no parameter was updated"
    ckpt = train.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == run.iteration and ckpt["config"]["model"] == model
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    (tmp_path / "last.pt").unlink()  # edsr's holds 0.5 GB (weights and Adam moments)


def test_resume_continues_exactly(data, tmp_path):
    straight = train.main(_argv(data, tmp_path / "a", "--ckpt-every", "4", patch=4, iters=8))
    half = _params(train.main(_argv(data, tmp_path / "b", "--ckpt-every", "4", patch=4, iters=4)).model)
    assert train.load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 4
    resumed = train.main(_argv(data, tmp_path / "b", "--resume", "--ckpt-every", "4", patch=4, iters=8))
    assert resumed.iteration == 8
    a, b = _params(straight.model), _params(resumed.model)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((half[k] - b[k]).abs().max().item() for k in a) > 1e-4  # iterations 5..8 did train
    buffers = dict(resumed.model.named_buffers())
    for k, v in straight.model.named_buffers():  # BN running statistics too
        assert torch.allclose(v.float(), buffers[k].float(), atol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    real = torch.nn.functional.l1_loss
    calls = []

    def poisoned(a, b):
        calls.append(1)
        loss = real(a, b)
        return loss * float("nan") if len(calls) >= 5 else loss

    monkeypatch.setattr(torch.nn.functional, "l1_loss", poisoned)
    with pytest.raises(SystemExit, match="loss became nan between iterations 5 and 6"):
        train.main(_argv(data, tmp_path, "--ckpt-every", "2", op="conv", iters=8))
    ckpt = train.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_checkpoint_write_keeps_the_previous_one(data, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def failing_save(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint of iteration 2 dies half-written (disk full, kill)
            f.write(b"partial")
            raise OSError("No space left on device")
        return real_save(obj, f)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train.main(_argv(data, tmp_path, "--ckpt-every", "1", op="conv", iters=3))
    assert train.load_checkpoint(tmp_path / "last.pt")["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("events")) == ["last.pt"]


def test_validation_best_checkpoint_and_export(data, tmp_path, capsys):
    from addersr.eval import evaluate
    export = tmp_path / "exported" / "net"
    run = train.main(_argv(data, tmp_path / "run", "--val-every", "2", "--val-data", str(data / "val"),
                           "--export", str(export), op="conv", scale=4, patch=4, iters=4))
    out = capsys.readouterr().out
    printed = {int(m[0]): float(m[1]) for m in re.findall(r"iteration (\d+): val PSNR ([\d.]+) dB", out)}
    assert sorted(printed) == [2, 4]
    best = train.load_checkpoint(tmp_path / "run" / "best.pt")
    best_it = max(printed, key=printed.get)
    assert best["iteration"] == best_it and best["best_psnr"] == pytest.approx(printed[best_it], abs=1e-3)
    assert train.load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 4
    loaded = models.load(export)
    meta = loaded.meta
    assert (meta["model"], meta["scale"], meta["op"], meta["iterations"]) == ("edsr-baseline", 4, "conv", 4)
    assert meta["train_sets"] == ["A"] and meta["device"].startswith("cpu (") and meta["seconds"] >= 0
    for k, v in run.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu())
    # the recorded PSNR is that of the exported weights under the evaluation protocol
    result = evaluate(loaded, data / "val", 4, device="cpu", progress=False)
    recorded = meta["metrics"]["val"]
    assert recorded["psnr"] == pytest.approx(result["psnr"], abs=1e-9)
    assert recorded["ssim"] == pytest.approx(result["ssim"], abs=1e-9)
    assert recorded["iteration"] == 4


def test_the_end_of_a_run_is_always_validated(data, tmp_path):
    """A run whose length is not a multiple of --val-every is scored at its last iteration
    (the exported metrics are those of the exported weights); continuing weights whose last
    score is older, with nothing left to train, scores them."""
    val = ["--val-every", "3", "--val-data", str(data / "val")]
    run = train.main(_argv(data, tmp_path / "a", *val, "--export", str(tmp_path / "w"), op="conv", iters=4))
    assert [h["iteration"] for h in run.history] == [3, 4]
    assert models.load(tmp_path / "w").meta["metrics"]["val"]["iteration"] == 4
    meta = json.loads((tmp_path / "w.json").read_text())
    meta["validation"], meta["metrics"]["val"]["iteration"] = meta["validation"][:1], 3
    (tmp_path / "w.json").write_text(json.dumps(meta))  # as weights exported before this rule
    again = train.main(_argv(data, tmp_path / "b", "--init", str(tmp_path / "w"), *val,
                             "--export", str(tmp_path / "w2"), iters=4))
    assert again.iteration == 4 and [h["iteration"] for h in again.history] == [3, 4]
    assert models.load(tmp_path / "w2").meta["metrics"]["val"]["iteration"] == 4


def test_arch_overrides_reach_the_model_and_the_exported_weights(data, tmp_path):
    export = tmp_path / "small"
    run = train.main(_argv(data, tmp_path, "--arch", "n_blocks=2", "n_feats=8", "res_scale=0.5",
                           "--export", str(export), iters=1))
    assert len(run.model.body) == 3 and run.model.head.out_channels == 8
    loaded = models.load(export)
    assert loaded.config == {"name": "edsr-baseline", "scale": 2, "op": "adder",
                             "n_blocks": 2, "n_feats": 8, "res_scale": 0.5}
    assert loaded.body[0].res_scale == 0.5


@pytest.mark.parametrize("arch", ["n_blocks", "n_blocks=two"])
def test_arch_needs_numeric_key_value(data, tmp_path, capsys, arch):
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, tmp_path, "--arch", arch))
    assert exc.value.code == 2 and "--arch" in capsys.readouterr().err


def test_amp_runs_for_conv(data, tmp_path):
    run = train.main(_argv(data, tmp_path, "--amp", "--workers", "1", op="conv", iters=2))
    assert run.scaler.is_enabled()
    assert train.load_checkpoint(tmp_path / "last.pt")["scaler"]["scale"] > 0


# --- bad arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"model": "srcnn"}, "unknown model 'srcnn'"),
    ({"scale": 5}, "unsupported scale 5"),
    ({"sets": "Empty"}, "holds no images"),
    ({"sets": "Missing"}, "training set 'Missing' not found"),
    ({"extra": ["--amp"]}, "--amp is only allowed with --op conv"),
    ({"extra": ["--patch", "0"]}, "--patch must be positive"),
    ({"extra": ["--bn-init", "-0.1"]}, "--bn-init must be >= 0"),
    ({"extra": ["--resume"]}, "cannot resume"),
    ({"root": "nowhere"}, "does not exist"),
    ({"extra": ["--arch", "n_blocks=3"]}, "unknown argument(s) ['n_blocks']"),
])
def test_bad_arguments(data, tmp_path, capsys, change, message):
    argv = _argv(data, tmp_path, model=change.get("model", "vdsr"), scale=change.get("scale", 2))
    argv[argv.index("--train-sets") + 1] = change.get("sets", "A")
    if "root" in change:
        argv[argv.index("--data-root") + 1] = str(tmp_path / change["root"])
    argv += change.get("extra", [])
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_root(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ADDERSR_DATA", raising=False)
    with pytest.raises(SystemExit):
        train.main(["--model", "vdsr", "--out", str(tmp_path), "--device", "cpu"])
    assert "pass --data-root" in capsys.readouterr().err


def test_resume_refuses_changed_recipe(data, tmp_path, capsys):
    train.main(_argv(data, tmp_path, op="conv", iters=1))
    with pytest.raises(SystemExit):
        train.main(_argv(data, tmp_path, "--resume", op="conv", iters=2, batch=3))
    assert "--batch 3 differs from the checkpoint's 2" in capsys.readouterr().err


# --- distributed ---------------------------------------------------------------------------

def _ddp_worker(rank, port, argv, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run = train.main(argv)
    torch.save({k: v.detach() for k, v in run.model.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_cpu_processes_end_identical(data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned processes
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    argv = _argv(data, out, "--ckpt-every", "3", iters=3)
    mp.start_processes(_ddp_worker, args=(port, argv, str(tmp_path)), nprocs=2, start_method="spawn")
    p0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    torch.manual_seed(0)
    init = _params(models.build("edsr-baseline", 2, op="adder"))
    assert any(not torch.equal(p0[k], init[k]) for k in p0)
    ckpt = train.load_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 3 and ckpt["world_size"] == 2
    assert all(torch.equal(ckpt["model"][k], p0[k]) for k in p0)
    assert len([p for p in out.iterdir() if p.name.startswith("events.out")]) == 1


# --- recipe options, distillation, time limit, --init (issues 11, 12, 14) -------------------

def test_lr_factor_warmup_cosine_and_step():
    cfg = dict(warmup=4, lr_schedule="cosine", iters=20, lr_step=5, lr_gamma=0.5)
    assert [train.lr_factor(cfg, i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_factor(cfg, 10) == pytest.approx(0.5)
    assert train.lr_factor(cfg, 20) == pytest.approx(0.0, abs=1e-12)
    cfg.update(warmup=0, lr_schedule="step")
    assert [train.lr_factor(cfg, i) for i in (0, 4, 5, 12)] == [1.0, 1.0, 0.5, 0.25]


def test_adder_options_reach_model_and_optimizer(data, tmp_path):
    torch.manual_seed(0)
    fresh = models.build("edsr-baseline", 2, op="adder", n_blocks=1, n_feats=8)
    torch.manual_seed(0)
    run = train.main(_argv(data, tmp_path, "--arch", "n_blocks=1", "n_feats=8", "--adder-lr", "7",
                           "--adder-init", "0.1", "--bn-momentum", "0.3", "--power-init", "0.8",
                           "--power-learn", "no", "--lr", "1e-3", "--iters", "1"))
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert groups["adder"]["base_lr"] == pytest.approx(7e-3) and groups["other"]["base_lr"] == pytest.approx(1e-3)
    adder_ids = {id(w) for w in groups["adder"]["params"]}
    assert adder_ids == {id(m.weight) for m in run.model.modules() if isinstance(m, Adder2d)}
    alphas = [m.alpha for m in run.model.modules() if isinstance(m, PowerActivation)]
    assert alphas and all(a.item() == pytest.approx(0.8) and not a.requires_grad for a in alphas)
    assert all(m.momentum == 0.3 for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the adder weights started at 0.1 x AdderNet's N(0, 1) draw and moved by about one Adam step
    start = {k: v for k, v in fresh.state_dict().items() if k.endswith("adder.weight")}
    now = run.model.state_dict()
    for k, w0 in start.items():
        assert (now[k] - 0.1 * w0).abs().max().item() < 1.5 * 7e-3


def test_sgd_adam_moves_adder_weights_by_sgd_and_the_rest_by_adam(data, tmp_path, capsys):
    torch.manual_seed(0)
    start = models.build("edsr-baseline", 2, op="adder", n_blocks=1, n_feats=8).state_dict()
    torch.manual_seed(0)
    run = train.main(_argv(data, tmp_path / "a", "--arch", "n_blocks=1", "n_feats=8", "--optimizer", "sgd+adam",
                           "--lr", "1e-3", "--other-lr", "5e-3", "--eta", "0.2", "--power-learn", "no",
                           "--export", str(tmp_path / "a.w"), iters=1))
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert groups["adder"]["base_lr"] == pytest.approx(1e-3) and groups["other"]["base_lr"] == pytest.approx(5e-3)
    assert models.load(tmp_path / "a.w").meta["recipe"]["other_lr"] == 5e-3
    adder = {id(m.weight) for m in run.model.modules() if isinstance(m, Adder2d)}
    moved_adder, moved_other = 0, 0
    for name, p in run.model.named_parameters():
        step = (p.detach() - start[name]).abs()
        if id(p) in adder:  # one SGD step of the adaptive-rate gradient: rms lr * eta
            assert step.pow(2).mean().sqrt().item() == pytest.approx(1e-3 * 0.2, rel=1e-4)
            moved_adder += 1
        elif step.max() > 0:  # Adam's first step: lr per parameter with a gradient
            assert step.max().item() == pytest.approx(5e-3, rel=1e-3)
            moved_other += 1
    assert moved_adder == len(adder) and moved_other >= 4


@pytest.mark.parametrize("model, op, lr, optimizer, other_lr, bn_init", [
    ("vdsr", "conv", 1e-3, "adam", None, None),  # VDSR's CNN: Adam at 1e-3 (CNN_RECIPES)
    ("edsr", "conv", 1e-4, "adam", None, None), ("edsr-baseline", "conv", 1e-4, "adam", None, None),
    ("vdsr", "adder", 0.08, "sgd+adam", 1e-3, 0.1),  # the rest at its CNN twin's rate
    ("edsr", "adder", 0.08, "sgd+adam", train.OTHER_LR, 1.0), ("edsr-baseline", "adder", 0.08, "sgd", None, 1.0)])
def test_default_recipe_of_each_backbone_and_op(model, op, lr, optimizer, other_lr, bn_init):
    argv = ["--model", model, "--op", op, "--scale", "2"]
    arch = ["--arch", "depth=4", "n_feats=8"] if model == "vdsr" else ["--arch", "n_blocks=1", "n_feats=8"]
    cfg = config.resolve(train._options(train.parse_args(argv + arch)))
    assert (cfg["lr"], cfg["optimizer"], cfg["other_lr"], cfg["bn_init"]) == (lr, optimizer, other_lr, bn_init)
    net, _ = train._model(cfg, None, None)
    gammas = {round(float(g), 6) for m in net.modules() if isinstance(m, AdderSRLayer) for g in m.bn.weight.detach().tolist()}
    assert gammas == ({bn_init} if op == "adder" else set())  # a fresh model starts at --bn-init
    given = argv + ["--lr", "5e-4", "--other-lr", "3e-4", "--optimizer", "sgd+adam", "--bn-init", "0.5"]
    if op == "adder":  # options given win over the backbone's defaults
        cfg = config.resolve(train._options(train.parse_args(given)))
        assert (cfg["other_lr"], cfg["bn_init"]) == (3e-4, 0.5)
    else:
        assert config.resolve(train._options(train.parse_args(given[:8])))["lr"] == 5e-4


def test_sgd_adam_resumes_exactly_and_is_for_adder_models(data, tmp_path, capsys):
    args = ("--optimizer", "sgd+adam", "--ckpt-every", "2")
    straight = train.main(_argv(data, tmp_path / "a", *args, patch=4, iters=4))
    assert straight.cfg["other_lr"] == train.OTHER_LR  # the CNN twins' Adam rate by default
    train.main(_argv(data, tmp_path / "b", *args, patch=4, iters=2))
    resumed = train.main(_argv(data, tmp_path / "b", "--resume", *args, patch=4, iters=4))
    a, b = _params(straight.model), _params(resumed.model)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    with pytest.raises(SystemExit):
        train.main(_argv(data, tmp_path / "c", "--optimizer", "sgd+adam", op="conv", iters=1))
    assert "--optimizer sgd+adam is for adder models" in capsys.readouterr().err


def test_conv_runs_ignore_adder_options_and_record_the_recipe(data, tmp_path):
    run = train.main(_argv(data, tmp_path / "c", "--adder-lr", "9", "--export", str(tmp_path / "c.w"), op="conv", iters=1))
    assert len(run.optimizer.param_groups) == 1
    recipe = models.load(tmp_path / "c.w").meta["recipe"]
    assert "adder_lr" not in recipe and recipe["eta"] == 0 and recipe["batch"] == 2
    run = train.main(_argv(data, tmp_path / "a", "--export", str(tmp_path / "a.w"), iters=1))
    recipe = models.load(tmp_path / "a.w").meta["recipe"]
    assert {k: recipe[k] for k in train.ADDER_RECIPE} == train.ADDER_RECIPE
    assert "other_lr" not in recipe  # sgd: Adam's rate does not apply


def test_teacher_distillation_changes_training_and_checks_the_teacher(data, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    train.main(_argv(data, tmp_path / "t", "--arch", "n_blocks=1", "n_feats=8", "--export", str(teacher),
                     op="conv", iters=2))
    small = ["--arch", "n_blocks=1", "n_feats=8", "--iters", "2"]
    plain = _params(train.main(_argv(data, tmp_path / "p", *small)).model)
    out = _params(train.main(_argv(data, tmp_path / "d", *small, "--teacher", str(teacher), "--distill", "5")).model)
    both = train.main(_argv(data, tmp_path / "f", *small, "--teacher", str(teacher), "--distill-features", "2"))
    feat = _params(both.model)
    assert max((plain[k] - out[k]).abs().max().item() for k in plain) > 1e-6
    assert max((out[k] - feat[k]).abs().max().item() for k in out) > 1e-6
    with pytest.raises(SystemExit) as exc:  # 2 blocks of 16 against the teacher's 1 of 8
        train.main(_argv(data, tmp_path / "x", "--arch", "n_blocks=2", "n_feats=16", "--teacher", str(teacher),
                         "--distill-features", "1"))
    assert exc.value.code == 2 and "--distill-features" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, tmp_path / "y", *small, "--teacher", str(teacher), scale=3))
    assert exc.value.code == 2 and "is for x2, the model for x3" in capsys.readouterr().err


def test_time_limit_stops_checkpoints_exports_and_resumes(data, tmp_path, monkeypatch, capsys):
    clock = [1000.0]

    def fake_monotonic():
        clock[0] += 10.0  # ten seconds per call: the 0.5-minute limit passes during training
        return clock[0]

    monkeypatch.setattr(train.time, "monotonic", fake_monotonic)
    export = tmp_path / "w"
    run = train.main(_argv(data, tmp_path / "run", "--time-limit", "0.5", "--export", str(export),
                           "--val-every", "1000", "--val-data", str(data / "val"), op="conv", iters=50))
    assert run.stopped_early and 0 < run.iteration < 50 and run.iteration % train.LOG_EVERY == 0
    assert "time limit reached" in capsys.readouterr().err
    assert train.load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == run.iteration
    meta = models.load(export).meta
    assert meta["iterations"] == run.iteration and meta["metrics"]["val"]["iteration"] == run.iteration
    monkeypatch.undo()
    resumed = train.main(_argv(data, tmp_path / "run", "--resume", op="conv", iters=50))
    assert resumed.iteration == 50 and not resumed.stopped_early


def test_init_continues_step_count_recipe_and_architecture(data, tmp_path, capsys):
    first = tmp_path / "first"
    val = ["--val-every", "2", "--val-data", str(data / "val")]
    train.main(_argv(data, tmp_path / "a", "--arch", "n_blocks=1", "n_feats=8", "--lr", "3e-4",
                     "--lr-schedule", "cosine", "--export", str(first), *val, iters=4))
    run = train.main(_argv(data, tmp_path / "b", "--init", str(first), "--export", str(tmp_path / "second"),
                           "--optimizer", "sgd+adam", *val, iters=8))
    assert "continuing at iteration 4" in capsys.readouterr().err
    assert run.iteration == 8 and run.model.config["n_feats"] == 8  # architecture from the JSON
    assert run.cfg["lr"] == 3e-4 and run.cfg["lr_schedule"] == "cosine"  # the recorded recipe
    last = train.lr_factor(run.cfg, 7) * 3e-4
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(last)
    meta = models.load(tmp_path / "second").meta
    assert meta["iterations"] == 8 and meta["parent"]["iterations"] == 4 and meta["parent"]["continued"]
    # a continuation that changes the optimiser: the parent record keeps how the parent trained
    assert meta["recipe"]["optimizer"] == "sgd+adam" and meta["recipe"]["other_lr"] == train.OTHER_LR
    assert meta["parent"]["recipe"]["optimizer"] == "sgd" and "other_lr" not in meta["parent"]["recipe"]
    # the validation curve goes on from the parent's, which the parent record does not repeat
    assert [v["iteration"] for v in meta["validation"]] == [2, 4, 6, 8] and "validation" not in meta["parent"]


def test_init_at_another_scale_loads_the_body_and_starts_anew(data, tmp_path, capsys):
    x2 = tmp_path / "x2"
    parent = train.main(_argv(data, tmp_path / "a", "--arch", "n_blocks=1", "n_feats=8", "--export", str(x2),
                              iters=2)).model.state_dict()
    run = train.main(_argv(data, tmp_path / "b", "--init", str(x2), "--export", str(tmp_path / "x3"),
                           "--lr", "1e-12", scale=3, iters=1))
    err = capsys.readouterr().err
    assert "a new run" in err and "not loaded: tail.0.0" in err
    assert run.iteration == 1 and run.model.scale == 3 and run.model.config["n_blocks"] == 1
    meta = models.load(tmp_path / "x3").meta
    assert meta["parent"]["scale"] == 2 and not meta["parent"]["continued"]
    assert meta["parent"]["loaded"] < meta["parent"]["of"]
    own = run.model.state_dict()
    assert torch.allclose(own["head.weight"], parent["head.weight"], atol=1e-9)  # loaded, barely moved
    assert own["tail.0.0.weight"].shape != parent["tail.0.0.weight"].shape


def test_cuda_device_without_index_and_nccl_under_torchrun(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rank, world, device = distributed.setup_distributed(torch.device("cuda"))
    assert (rank, world, device) == (0, 1, torch.device("cuda", 0))
    assert calls == [("set_device", torch.device("cuda", 0))]
    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank, world, device = distributed.setup_distributed(torch.device("cuda"))
    assert (rank, world, device) == (1, 2, torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]


def test_cuda_default_device_when_available(data, tmp_path, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def fake_setup(device):
        seen.append(device)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed, "setup_distributed", fake_setup)
    argv = _argv(data, tmp_path)
    argv = argv[:argv.index("--device")]
    for given in ([], ["--device", "cuda"], ["--device", "cuda:0"]):
        with pytest.raises(Stop):
            train.main(argv + given)
    assert [d.type for d in seen] == ["cuda"] * 3


@pytest.mark.parametrize("content, word", [(b"PK\x03\x04 truncated zip", "truncated"),
                                           (os.urandom(4096), "truncated")])
def test_resume_from_corrupt_checkpoint_is_a_clear_error(data, tmp_path, capsys, content, word):
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, tmp_path, "--resume"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot resume" in err and word in err
    assert "weights_only" not in err and "Traceback" not in err


def test_truncated_real_checkpoint_is_a_clear_error(data, tmp_path, capsys):
    train.main(_argv(data, tmp_path, op="conv", iters=1))
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, tmp_path, "--resume", op="conv", iters=2))
    assert exc.value.code == 2 and "truncated or not an addersr training checkpoint" in capsys.readouterr().err


def test_unknown_model_without_recipe_options_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "resnet50", "--out", str(tmp_path), "--device", "cpu"])
    assert exc.value.code == 2 and "unknown model 'resnet50'" in capsys.readouterr().err


def test_init_and_resume_together_are_refused(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, tmp_path, "--resume", "--init", "x"))
    assert exc.value.code == 2 and "use one" in capsys.readouterr().err
