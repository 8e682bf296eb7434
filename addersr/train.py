"""Train a super-resolution model: ``python -m addersr.train --model edsr --scale 4``.

Recipes (DESIGN.md 2, EDSR-PyTorch defaults): L1 loss, Adam (0.9, 0.999, 1e-8), learning
rate 1e-4 halved every 200,000 iterations (EDSR's "200 epochs" of 1,000 batches), 300,000
iterations, flips and quarter turns. The loss is taken on RGB for EDSR and on the Y channel
(MATLAB rgb2ycbcr) for VDSR, which only predicts Y. ``edsr`` / ``edsr-baseline``: batch 16 of 48x48 LR
patches. ``vdsr``: batch 64 of 41x41 HR patches; the model takes the LR image and upsamples
it internally, so its patches are ceil(41/scale) LR pixels (11 at x4: 44x44 HR). One model
per scale (VDSR's mixed-scale training is not done: a model has a fixed scale). Adder
models rescale their adder-layer gradients with AdderNet's adaptive rate (``--eta``).

Checkpoints ``last.pt`` / ``best.pt`` (best Set5 PSNR) in ``--out`` are written atomically
and hold everything ``--resume`` needs to continue exactly. Batch ``i`` of rank ``r`` is a
function of (seed, r, i) only (see :mod:`addersr.data.patches`), so data order survives a
resume and does not depend on ``--workers``.

Several GPUs: ``torchrun --nproc_per_node=N -m addersr.train ...`` (DistributedDataParallel;
``--batch`` is per process). Batch normalisation uses each process's own batch (plain BN,
as with one GPU and the same per-GPU batch); DDP broadcasts rank 0's running statistics.
Gradients are all-reduced before the adaptive-rate rescaling, so all ranks apply the same
update. Rank 0 alone logs, validates and writes checkpoints.
"""

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .models.common import rgb_to_ycbcr
from .nn import rescale_adder_grads

__all__ = ["main", "parse_args", "TrainingDiverged"]

CHECKPOINT_FORMAT = "addersr-train-checkpoint-v1"
LOG_EVERY = 10  # iterations between loss synchronisations (progress bar, TensorBoard, NaN check)

COMMON = dict(lr=1e-4, iters=300_000, lr_schedule="step", lr_step=200_000, lr_gamma=0.5,
              train_sets=["T91", "BSD200"], val_every=1000, ckpt_every=1000, seed=0)
RECIPES = {
    "edsr": dict(patch=48, batch=16),
    "edsr-baseline": dict(patch=48, batch=16),
    "vdsr": dict(patch=None, batch=64),  # patch: ceil(41 / scale)
}
# Options that may differ on --resume; every other option must match the checkpoint.
RUN_OPTIONS = ("iters", "out", "val_every", "val_data", "ckpt_every", "export", "workers",
               "device", "data_root")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def parse_args(argv=None):
    """Parse the command line; options left out are None (filled by the recipe later)."""
    p = argparse.ArgumentParser(prog="python -m addersr.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="vdsr, edsr-baseline or edsr (default edsr)")
    p.add_argument("--scale", type=int, default=None, help="2, 3 or 4 (default 4)")
    p.add_argument("--op", choices=["adder", "conv"], default=None, help="default adder")
    p.add_argument("--arch", nargs="+", default=None, metavar="KEY=VALUE", type=_arch_item,
                   help="architecture overrides passed to addersr.models.build, e.g. "
                        "n_blocks=4 n_feats=32 (recorded in the exported weights)")
    p.add_argument("--data-root", default=None,
                   help="folder whose sub-folders are the training sets (default $ADDERSR_DATA/train)")
    p.add_argument("--train-sets", nargs="+", default=None, help="default T91 BSD200")
    p.add_argument("--patch", type=int, default=None, help="LR patch size (edsr 48, vdsr ceil(41/scale))")
    p.add_argument("--batch", type=int, default=None, help="patches per batch and process (edsr 16, vdsr 64)")
    p.add_argument("--iters", type=int, default=None, help="total iterations (default 300000)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default 1e-4)")
    p.add_argument("--lr-schedule", choices=["step", "cosine"], default=None,
                   help="step: x0.5 every --lr-step iterations; cosine: to 0 over --iters (default "
                        "step; on --resume the schedule of the checkpoint continues)")
    p.add_argument("--lr-step", type=int, default=None, help="iterations between halvings (default 200000)")
    p.add_argument("--eta", type=float, default=None,
                   help="AdderNet adaptive learning rate of adder layers (default 0.2 for adder; 0 disables)")
    p.add_argument("--val-every", type=int, default=None,
                   help="iterations between Set5 validations (default 1000; 0 disables)")
    p.add_argument("--val-data", default=None,
                   help="validation image folder (default Set5 of $ADDERSR_DATA/benchmark or the shipped copy)")
    p.add_argument("--ckpt-every", type=int, default=None, help="iterations between checkpoints (default 1000)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL_xSCALE_OP)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue from OUT/last.pt (OUT: --out, or the default for --model/--scale/--op), "
                        "or from the checkpoint CKPT; --iters, --out, --val-every, --val-data, "
                        "--ckpt-every, --export, --workers, --device and --data-root may change")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="at the end, save the weights with addersr.models.save (PATH.safetensors + PATH.json)")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (default: 4, at most the CPU cores per process)")
    p.add_argument("--amp", action="store_true", default=None,
                   help="float16 autocast with a gradient scaler (op=conv only)")
    args = p.parse_args(argv)
    args.parser = p
    return args


def _arch_item(text):
    """``KEY=VALUE`` with an int or float value."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, (int(value) if value.lstrip("-").isdigit() else float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be a number") from None


def _config(args):
    """Fill the options left out with the recipe of ``args.model``."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("parser", "resume")}
    cfg["model"] = cfg["model"] or "edsr"
    cfg["scale"] = 4 if cfg["scale"] is None else cfg["scale"]
    cfg["op"] = cfg["op"] or "adder"
    cfg["arch"] = dict(cfg["arch"] or [])
    recipe = {**COMMON, **RECIPES.get(cfg["model"], {})}
    for key, value in recipe.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg["patch"] is None:
        from .data.patches import vdsr_patch
        cfg["patch"] = vdsr_patch(cfg["scale"])
    if cfg["eta"] is None:
        cfg["eta"] = 0.2 if cfg["op"] == "adder" else 0.0
    cfg["amp"] = bool(cfg["amp"])
    cfg["out"] = cfg["out"] or f"runs/{cfg['model']}_x{cfg['scale']}_{cfg['op']}"
    return cfg


def _check_config(cfg, error):
    for key in ("patch", "batch", "iters", "lr_step"):
        if cfg[key] < 1:
            error(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    for key in ("val_every", "ckpt_every", "workers"):
        if cfg[key] is not None and cfg[key] < 0:
            error(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if not cfg["lr"] > 0 or not math.isfinite(cfg["lr"]):
        error(f"--lr must be a positive number, got {cfg['lr']}")
    if cfg["eta"] < 0:
        error(f"--eta must be >= 0, got {cfg['eta']}")
    if cfg["amp"] and cfg["op"] != "conv":
        error("--amp is only allowed with --op conv: float16 is not exact enough for adder layers "
              "(their outputs are large sums of absolute differences)")


def _data_root(cfg, error):
    if cfg["data_root"] is not None:
        return Path(cfg["data_root"])
    env = os.environ.get("ADDERSR_DATA")
    if not env:
        error("no training data: pass --data-root FOLDER (holding T91/, BSD200/, ...) "
              "or set ADDERSR_DATA to a folder holding train/")
    return Path(env) / "train"


def _val_folder(cfg):
    if cfg["val_data"] is not None:
        return Path(cfg["val_data"])
    from .data import dataset_root
    return dataset_root() / "Set5"


# --- distributed -------------------------------------------------------------------------

def _setup_distributed(device):
    """(rank, world_size, device) from torchrun's environment; starts the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed patch size
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _reduce_mean(value, world):
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value


# --- checkpoints -------------------------------------------------------------------------

def _rng_state():
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": [version, list(state), gauss],
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng):
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def save_checkpoint(path, state):
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash leaves either the old or the new checkpoint, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path):
    """Load a training checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an addersr training checkpoint")
    return state


def _merge_resume(args, cfg, ckpt_cfg, error):
    """The checkpoint's configuration, with the run options given on the command line."""
    given = {k for k, v in vars(args).items() if v is not None and k not in ("parser", "resume")}
    merged = dict(ckpt_cfg)
    for key in given:
        if key in RUN_OPTIONS:
            merged[key] = cfg[key]
        elif cfg[key] != ckpt_cfg.get(key):
            error(f"--{key.replace('_', '-')} {cfg[key]} differs from the checkpoint's "
                  f"{ckpt_cfg.get(key)}; only {', '.join('--' + k.replace('_', '-') for k in RUN_OPTIONS)} "
                  "may change on --resume")
    return merged


# --- training ----------------------------------------------------------------------------

def _scheduler(optimizer, cfg):
    if cfg["lr_schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["iters"])
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["lr_step"], gamma=cfg["lr_gamma"])


def _loader(dataset, start, stop, workers, device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, stop), num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers else None)


def _validate(model, folder, scale, device):
    from .eval import evaluate
    model.eval()
    try:
        result = evaluate(model, folder, scale, device=device, progress=False)
    finally:
        model.train()
    return float(result["psnr"]), float(result["ssim"])


class _Run:
    """State of one training process."""

    def __init__(self, cfg, model, rank, world, device, start_state, val_folder):
        from .data.patches import PatchBatches, load_training_images

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.main, self.val_folder = rank == 0, val_folder
        self.model = model.to(device)
        self.y_loss = cfg["model"] == "vdsr"
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = _scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"])
        self.iteration, self.seconds = 0, 0.0
        self.best_psnr, self.last_val = None, None
        if start_state is not None:
            self.model.load_state_dict(start_state["model"])
            self.optimizer.load_state_dict(start_state["optimizer"])
            self.scheduler.load_state_dict(start_state["scheduler"])
            if start_state.get("scaler"):
                self.scaler.load_state_dict(start_state["scaler"])
            self.iteration = int(start_state["iteration"])
            self.seconds = float(start_state["seconds"])
            self.best_psnr = start_state["best_psnr"]
            self.last_val = start_state["last_val"]
            _set_rng_state(start_state["rng"])
        self.net = self.model
        if world > 1:
            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.main:
            print(f"loading training images from {cfg['data_root']} ({' '.join(cfg['train_sets'])}) "
                  f"and making x{cfg['scale']} LR images ...", file=sys.stderr)
        images, _ = load_training_images(cfg["data_root"], cfg["train_sets"])
        self.data = PatchBatches(images, cfg["scale"], cfg["patch"], cfg["batch"], seed=cfg["seed"],
                                 rank=rank, length=cfg["iters"])
        if self.main and self.data.skipped:
            print(f"skipped {self.data.skipped} images smaller than one patch", file=sys.stderr)
        self.out = Path(cfg["out"])
        self.writer = None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out), purge_step=self.iteration or None)

    def state(self):
        return {"format": CHECKPOINT_FORMAT, "iteration": self.iteration, "config": self.cfg,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.cfg["amp"] else None,
                "rng": _rng_state(), "data": {"seed": self.cfg["seed"], "next_batch": self.iteration},
                "seconds": self.seconds, "best_psnr": self.best_psnr, "last_val": self.last_val,
                "world_size": self.world}

    def step(self, lr_u8, hr_u8):
        lr = lr_u8.to(self.device, non_blocking=True).float().div_(255)
        hr = hr_u8.to(self.device, non_blocking=True).float().div_(255)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cfg["amp"]):
            sr = self.net(lr)
        sr = sr.float()
        if self.y_loss:  # VDSR learns the Y channel; its Cb/Cr are bicubic
            sr, hr = rgb_to_ycbcr(sr)[:, :1], rgb_to_ycbcr(hr)[:, :1]
        loss = F.l1_loss(sr, hr)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP all-reduces the gradients here
        self.scaler.unscale_(self.optimizer)
        if self.cfg["eta"] > 0:
            rescale_adder_grads(self.model, self.cfg["eta"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def train(self):
        cfg = self.cfg
        iters = cfg["iters"]
        bar = tqdm(total=iters, initial=self.iteration, disable=not self.main, dynamic_ncols=True,
                   desc=f"{cfg['model']} x{cfg['scale']} {cfg['op']}", unit="it")
        loss_sum, count = torch.zeros((), device=self.device), 0
        good = self.iteration  # iteration of the last state known to be finite
        self.model.train()
        clock = time.perf_counter()
        workers = cfg["workers"]
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            workers = min(4, max(1, (cores or 1) // self.world))
        for lr_u8, hr_u8 in _loader(self.data, self.iteration, iters, workers, self.device):
            loss_sum += self.step(lr_u8, hr_u8)
            count += 1
            self.iteration += 1
            bar.update(1)
            it = self.iteration
            # the same decisions on every rank: the loss reduction is a collective call
            validate = bool(cfg["val_every"]) and it % cfg["val_every"] == 0
            checkpoint = bool(cfg["ckpt_every"]) and it % cfg["ckpt_every"] == 0
            saving = validate or checkpoint or it == iters
            if it % LOG_EVERY == 0 or saving:
                loss = float(_reduce_mean(loss_sum / count, self.world))
                problem = None if math.isfinite(loss) else f"loss became {loss}"
                if problem is None and saving and not _finite(self.model):
                    problem = "the weights became NaN or infinite"
                if problem:
                    bar.close()
                    raise TrainingDiverged(
                        f"{problem} between iterations {good + 1} and {it}; stopping. "
                        f"The last good checkpoint is kept in {self.out} "
                        f"(resume with --resume, perhaps with a lower --lr)")
                good = it
                loss_sum.zero_()
                count = 0
                lr_now = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}")
                if self.writer:
                    self.writer.add_scalar("train/loss", loss, it)
                    self.writer.add_scalar("train/lr", lr_now, it)
            now = time.perf_counter()
            self.seconds += now - clock
            clock = now
            improved = False
            if validate and self.main:
                psnr, ssim = _validate(self.model, self.val_folder, cfg["scale"], self.device)
                self.last_val = {"iteration": it, "psnr": psnr, "ssim": ssim}
                improved = self.best_psnr is None or psnr > self.best_psnr
                if improved:
                    self.best_psnr = psnr
                self.writer.add_scalar("val/psnr", psnr, it)
                self.writer.add_scalar("val/ssim", ssim, it)
                bar.write(f"iteration {it}: {self.val_folder.name} PSNR {psnr:.3f} dB, SSIM {ssim:.4f}"
                          + (" (best)" if improved else f" (best {self.best_psnr:.3f} dB)"))
                clock = time.perf_counter()
            if self.main and (checkpoint or improved or it == iters):
                state = self.state()
                save_checkpoint(self.out / "last.pt", state)
                if improved:
                    save_checkpoint(self.out / "best.pt", state)
                clock = time.perf_counter()
        bar.close()

    def export(self, path):
        from . import models
        # save() records model, scale and op from the model itself
        meta = {"iterations": self.iteration, "train_sets": list(self.cfg["train_sets"]),
                "patch": self.cfg["patch"], "batch": self.cfg["batch"], "processes": self.world,
                "lr": self.cfg["lr"], "eta": self.cfg["eta"], "seed": self.cfg["seed"],
                "seconds": round(self.seconds, 1), "device": _device_name(self.device)}
        if self.last_val:  # the last validation, keyed by the validation set's folder name
            meta["metrics"] = {self.val_folder.name: {k: self.last_val[k] for k in ("psnr", "ssim", "iteration")}}
        self.model.eval()
        written = models.save(self.model, path, meta)
        print(f"exported weights to {' and '.join(map(str, written))}", file=sys.stderr)


def _finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def main(argv=None):
    """Command-line entry point; returns the process's ``_Run`` (its ``model`` is trained)."""
    args = parse_args(argv)
    error = args.parser.error
    cfg = _config(args)
    start_state, path = None, None
    if args.resume is not None:
        path = Path(cfg["out"]) / "last.pt" if args.resume == "last" else Path(args.resume)
        try:
            start_state = load_checkpoint(path)
        except (FileNotFoundError, ValueError) as err:
            error(f"cannot resume: {err}")
        cfg = _merge_resume(args, cfg, start_state["config"], error)
    _check_config(cfg, error)
    from . import models
    torch.manual_seed(cfg["seed"])
    try:
        model = models.build(cfg["model"], cfg["scale"], op=cfg["op"], **cfg["arch"])
    except (ValueError, KeyError) as err:
        error(str(err))
    cfg["data_root"] = str(_data_root(cfg, error))
    try:
        val_folder = _val_folder(cfg) if cfg["val_every"] else None
    except FileNotFoundError as err:
        error(str(err))
    if val_folder is not None and not val_folder.is_dir():
        error(f"validation folder not found: {val_folder}")
    try:
        device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        error(f"bad --device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        error("--device cuda: no CUDA device is available")
    rank, world, device = _setup_distributed(device)
    try:
        try:
            run = _Run(cfg, model, rank, world, device, start_state, val_folder)
        except (ValueError, FileNotFoundError) as err:
            error(str(err))
        if start_state is not None and run.main:
            print(f"resuming {path} at iteration {run.iteration}", file=sys.stderr)
        try:
            run.train()
        except TrainingDiverged as err:
            raise SystemExit(f"error: {err}") from None
        except KeyboardInterrupt:
            raise SystemExit(f"interrupted at iteration {run.iteration}; the last checkpoint in "
                             f"{run.out} is intact (continue with --resume)") from None
        finally:
            if run.writer:
                run.writer.close()
        if run.main:
            val = run.last_val
            print(f"done: {run.iteration} iterations, {run.seconds:.0f} s of training"
                  + (f"; validation PSNR {val['psnr']:.3f} dB at iteration {val['iteration']}"
                     if val else ""), file=sys.stderr)
        if cfg["export"] and run.main:
            run.export(cfg["export"])
        return run
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
