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

Adder models train with the adder recipe (``ADDER_RECIPE``; the evidence is in
docs/training.md): SGD with momentum 0.9 at lr 0.08 and AdderNet's adaptive rate, which
gives the adder weights the step size they need (Adam at the CNN's rate moves them ~100x
too slowly; larger rates fall behind early and end ahead). Options of adder layers alone:
the adder weights' own learning rate (``--adder-lr``, a multiple of ``--lr``) and initial
scale (``--adder-init``), BN momentum and the power activations' start and learning.
``--teacher WEIGHTS`` adds distillation from a trained model of the same scale (an
output-level L1 loss, ``--distill``, and optionally one on the outputs of the body's blocks,
``--distill-features``). The whole recipe is recorded in the exported JSON (``recipe``).

A lease-sized run: ``--time-limit MINUTES`` stops cleanly at the deadline (checkpoint and
export included); ``--init WEIGHTS`` starts from exported weights, loading every tensor whose
name and shape match, and, when the architecture and scale are the same, continues their
step count, data order and learning-rate schedule (the recipe recorded in their JSON is the
default for every option not given).

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

from .device import DeviceError, hardware, resolve
from .files import atomic_write
from .models.common import rgb_to_ycbcr
from .nn import rescale_adder_grads

__all__ = ["main", "parse_args", "TrainingDiverged"]

CHECKPOINT_FORMAT = "addersr-train-checkpoint-v1"
LOG_EVERY = 10  # iterations between loss synchronisations (progress bar, TensorBoard, NaN check)

COMMON = dict(lr=1e-4, iters=300_000, lr_schedule="step", lr_step=200_000, lr_gamma=0.5, warmup=0,
              optimizer="adam", clip_grad=0.0, train_sets=["T91", "BSD200"], val_every=1000,
              ckpt_every=1000, seed=0, distill=1.0, distill_features=0.0)
# Options of adder layers. CNN twins keep the published recipe (these do not apply to them).
ADDER_BASE = dict(eta=0.2, adder_lr=1.0, adder_init=1.0, bn_momentum=0.1, power_init=1.0, power_learn=True)
# The adder recipe: ADDER_BASE changed by what benchmarks/recipe.py measured (docs/training.md).
ADDER_RECIPE = dict(ADDER_BASE, optimizer="sgd", lr=0.08)
# --optimizer sgd+adam: Adam's rate for the parameters that are not adder weights (the CNN twins').
OTHER_LR = 2e-4
RECIPES = {
    "edsr": dict(patch=48, batch=16),
    "edsr-baseline": dict(patch=48, batch=16),
    "vdsr": dict(patch=None, batch=64),  # patch: ceil(41 / scale)
}
# Options that may differ on --resume; every other option must match the checkpoint.
RUN_OPTIONS = ("iters", "out", "val_every", "val_data", "ckpt_every", "export", "workers",
               "device", "data_root", "time_limit")
# What defines a training run: recorded in exports as "recipe", continued by --init.
RECIPE_KEYS = ("lr", "iters", "lr_schedule", "lr_step", "lr_gamma", "warmup", "optimizer", "clip_grad",
               "patch", "batch", "train_sets", "seed", "eta", "adder_lr", "other_lr", "adder_init", "bn_momentum",
               "power_init", "power_learn", "teacher", "distill", "distill_features")


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
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default 1e-4; adder models 0.08, see ADDER_RECIPE)")
    p.add_argument("--lr-schedule", choices=["step", "cosine"], default=None,
                   help="step: x0.5 every --lr-step iterations; cosine: to 0 over --iters (default "
                        "step; on --resume the schedule of the checkpoint continues)")
    p.add_argument("--lr-step", type=int, default=None, help="iterations between halvings (default 200000)")
    p.add_argument("--warmup", type=int, default=None,
                   help="iterations of linear learning-rate warm-up (default 0)")
    p.add_argument("--optimizer", choices=["adam", "sgd", "sgd+adam"], default=None,
                   help="adam (0.9, 0.999, eps 1e-8; default for CNNs), sgd (momentum 0.9, AdderNet's own) "
                        "or sgd+adam (adder models: SGD for the adder weights, Adam at --other-lr for "
                        "every other parameter)")
    p.add_argument("--other-lr", type=float, default=None,
                   help="with sgd+adam: Adam's learning rate for the parameters that are not adder "
                        "weights (default 2e-4, the CNN twins')")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm of all parameters to this value (default 0: off)")
    adder = p.add_argument_group("adder layers (ignored for --op conv; defaults: ADDER_RECIPE, docs/training.md)")
    adder.add_argument("--eta", type=float, default=None,
                       help="AdderNet adaptive learning rate of adder layers (default 0.2; 0 disables)")
    adder.add_argument("--adder-lr", type=float, default=None, metavar="MULT",
                       help="learning rate of the adder weights, as a multiple of --lr (default 1)")
    adder.add_argument("--adder-init", type=float, default=None, metavar="STD",
                       help="standard deviation of the N(0, STD) initial adder weights (default 1, AdderNet's)")
    adder.add_argument("--bn-momentum", type=float, default=None,
                       help="momentum of the batch-norm running statistics (default 0.1)")
    adder.add_argument("--power-init", type=float, default=None,
                       help="initial exponent of the power activations (default 1, AdderSR's)")
    adder.add_argument("--power-learn", type=_bool, default=None, metavar="yes|no",
                       help="learn the power activations' exponents (default yes)")
    distil = p.add_argument_group("distillation")
    distil.add_argument("--teacher", default=None, metavar="WEIGHTS",
                        help="distil from these trained weights (same scale; e.g. the CNN twin)")
    distil.add_argument("--distill", type=float, default=None,
                        help="weight of the L1 loss against the teacher's output (default 1)")
    distil.add_argument("--distill-features", type=float, default=None,
                        help="weight of the L1 loss between the outputs of the body's blocks of "
                             "student and teacher (default 0; needs the same block count and width)")
    p.add_argument("--val-every", type=int, default=None,
                   help="iterations between Set5 validations, and one at the end (default 1000; "
                        "0 disables)")
    p.add_argument("--val-data", default=None,
                   help="validation image folder (default Set5 of $ADDERSR_DATA/benchmark or the shipped copy)")
    p.add_argument("--ckpt-every", type=int, default=None, help="iterations between checkpoints (default 1000)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL_xSCALE_OP)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                   help="continue from OUT/last.pt (OUT: --out, or the default for --model/--scale/--op), "
                        "or from the checkpoint CKPT; --iters, --out, --val-every, --val-data, "
                        "--ckpt-every, --export, --workers, --device and --data-root may change")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from exported weights (a name in weights/ or a path): load every tensor "
                        "whose name and shape match; with the same architecture and scale, continue "
                        "their step count and recipe (options not given come from their JSON)")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="at the end, save the weights with addersr.models.save (PATH.safetensors + PATH.json)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop cleanly after this many minutes (from start-up): validate, checkpoint "
                        "and export, then exit; continue later with --resume or --init")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (default: 4, at most the CPU cores per process)")
    p.add_argument("--amp", action="store_true", default=None,
                   help="float16 autocast with a gradient scaler (op=conv only)")
    args = p.parse_args(argv)
    args.parser = p
    return args


def _bool(text):
    """yes/no, true/false, 1/0."""
    value = text.strip().lower()
    if value in ("yes", "true", "1", "on"):
        return True
    if value in ("no", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def _arch_item(text):
    """``KEY=VALUE`` with an int or float value."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, (int(value) if value.lstrip("-").isdigit() else float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be a number") from None


def _config(args, error, init=None):
    """Fill the options left out with the recipe of ``args.model`` and its op.

    ``init``: the JSON of the ``--init`` weights. Model, op, architecture and scale not given
    come from it; when the run then has its architecture and scale, options not given come
    from its recorded recipe too (the run continues it).
    """
    cfg = {k: v for k, v in vars(args).items() if k not in ("parser", "resume")}
    if init is not None:
        cfg["model"] = cfg["model"] or init["model"]
        cfg["op"] = cfg["op"] or init["op"]
        if cfg["arch"] is None and cfg["model"] == init["model"]:
            cfg["arch"] = sorted(init["config"].items())
        cfg["scale"] = init["scale"] if cfg["scale"] is None else cfg["scale"]
    cfg["model"] = cfg["model"] or "edsr"
    from .models import MODELS
    if cfg["model"] not in MODELS:
        error(f"unknown model {cfg['model']!r}; available: {', '.join(sorted(MODELS))}")
    cfg["scale"] = 4 if cfg["scale"] is None else cfg["scale"]
    cfg["op"] = cfg["op"] or "adder"
    cfg["arch"] = dict(cfg["arch"] or [])
    continues = init is not None and _continues(cfg, init)
    if continues:
        for key, value in (init.get("recipe") or {}).items():
            if key in RECIPE_KEYS and cfg.get(key) is None:
                cfg[key] = value
    recipe = {**COMMON, **(ADDER_RECIPE if cfg["op"] == "adder" else {}), **RECIPES[cfg["model"]]}
    for key, value in recipe.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg["patch"] is None:
        from .data.patches import vdsr_patch
        cfg["patch"] = vdsr_patch(cfg["scale"])
    if cfg["optimizer"] != "sgd+adam":
        cfg["other_lr"] = None  # not used (not even when a continued run had it)
    elif cfg["other_lr"] is None:
        cfg["other_lr"] = OTHER_LR
    if cfg["op"] == "conv":  # adder-only options do not apply to a CNN
        cfg.update({k: None for k in ADDER_BASE})
        cfg["eta"] = 0.0
    cfg["amp"] = bool(cfg["amp"])
    cfg["out"] = cfg["out"] or f"runs/{cfg['model']}_x{cfg['scale']}_{cfg['op']}"
    return cfg


def _continues(cfg, init):
    """Whether a run of ``cfg`` continues the training of the ``init`` weights."""
    return (cfg["model"], cfg["scale"], cfg["op"], cfg["arch"]) == \
        (init["model"], init["scale"], init["op"], init["config"])


def _check_config(cfg, error):
    for key in ("patch", "batch", "iters", "lr_step"):
        if cfg[key] < 1:
            error(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    for key in ("val_every", "ckpt_every", "workers", "warmup"):
        if cfg[key] is not None and cfg[key] < 0:
            error(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg["optimizer"] == "sgd+adam" and cfg["op"] != "adder":
        error("--optimizer sgd+adam is for adder models (it needs adder weights)")
    for key in ("lr", "other_lr", "adder_lr", "adder_init", "power_init", "time_limit"):
        value = cfg.get(key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            error(f"--{key.replace('_', '-')} must be a positive number, got {value}")
    for key in ("eta", "clip_grad", "distill", "distill_features"):
        if cfg.get(key) is not None and not (cfg[key] >= 0 and math.isfinite(cfg[key])):
            error(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg["bn_momentum"] is not None and not 0 < cfg["bn_momentum"] <= 1:
        error(f"--bn-momentum must be in (0, 1], got {cfg['bn_momentum']}")
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
    """(rank, world_size, device) from torchrun's environment; starts the process group.

    A CUDA device without an index (``cuda``, the default) becomes ``cuda:LOCAL_RANK``; with
    several processes each takes its own GPU, ``cuda:LOCAL_RANK``, whatever index was given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and (world > 1 or device.index is None):
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
    """``torch.save`` through :func:`addersr.files.atomic_write`: a crash leaves either the
    old or the new checkpoint, never a partial one."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path):
    """Load a training checkpoint with ``weights_only=True`` (no arbitrary unpickling).

    Raises FileNotFoundError, or ValueError for a truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, unpickling and EOF errors alike: the file is not usable
        raise ValueError(f"{path} is truncated or not an addersr training checkpoint "
                         f"({type(err).__name__})") from None
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

def lr_factor(cfg, iteration):
    """Multiplier of the initial learning rates for the step that makes iteration ``iteration + 1``:
    linear warm-up over ``warmup`` steps, then ``cosine`` (to 0 at ``iters``) or ``step``
    (x ``lr_gamma`` every ``lr_step`` iterations)."""
    if iteration < cfg["warmup"]:
        return (iteration + 1) / cfg["warmup"]
    if cfg["lr_schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(iteration, cfg["iters"]) / cfg["iters"]))
    return cfg["lr_gamma"] ** (iteration // cfg["lr_step"])


class _Optimizers:
    """Several optimizers stepped as one: their groups, steps and states together."""

    def __init__(self, **parts):
        self.parts = parts

    @property
    def param_groups(self):
        return [group for opt in self.parts.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.parts.values():
            opt.step()

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state):
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


def _optimizer(model, cfg):
    """Adam, SGD or both (sgd+adam: SGD for the adder weights, Adam at ``other_lr`` for the
    rest); the adder weights in their own group at ``adder_lr`` times the rate. Each group
    keeps its initial rate as ``base_lr`` (the schedule multiplies it)."""
    from .nn import adder_weights
    adder = adder_weights(model) if cfg["op"] == "adder" else []
    ids = {id(p) for p in adder}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    other = {"params": rest, "base_lr": cfg["lr"], "name": "other"}
    groups = [{"params": adder, "base_lr": cfg["lr"] * cfg["adder_lr"], "name": "adder"}] if adder else []

    def sgd(groups):
        return torch.optim.SGD(groups, lr=groups[0]["base_lr"], momentum=0.9)

    def adam(groups):
        return torch.optim.Adam(groups, lr=groups[0]["base_lr"], betas=(0.9, 0.999), eps=1e-8)

    if cfg["optimizer"] == "sgd+adam":
        return _Optimizers(sgd=sgd(groups), adam=adam([dict(other, base_lr=cfg["other_lr"])]))
    groups = [other] + groups
    return sgd(groups) if cfg["optimizer"] == "sgd" else adam(groups)


@torch.no_grad()
def _prepare(model, cfg, fresh):
    """Apply the adder options: BN momentum and whether the exponents learn always; the
    initial scale of adder weights and the power exponents only to a ``fresh`` model."""
    if cfg["op"] != "adder":
        return
    from .nn import PowerActivation, adder_weights
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = cfg["bn_momentum"]
        elif isinstance(m, PowerActivation):
            if fresh:
                m.alpha.fill_(cfg["power_init"])
            m.alpha.requires_grad_(cfg["power_learn"])
    if fresh:
        for w in adder_weights(model):
            w.mul_(cfg["adder_init"])


class _BodyFeatures:
    """Outputs of each block of ``model.body``, collected by forward hooks."""

    def __init__(self, model):
        body = getattr(model, "body", None)
        if not isinstance(body, torch.nn.Sequential):
            raise ValueError(f"{type(model).__name__} has no body of blocks for feature distillation")
        self.outputs = []
        self.handles = [m.register_forward_hook(self._hook) for m in body]

    def _hook(self, module, inputs, output):
        self.outputs.append(output)

    def take(self):
        out, self.outputs = self.outputs, []
        return out


def _load_teacher(cfg, device):
    from . import models
    teacher = models.load(cfg["teacher"], device=device)
    if teacher.scale != cfg["scale"]:
        raise ValueError(f"the teacher {cfg['teacher']} is for x{teacher.scale}, the model for x{cfg['scale']}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


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

    def __init__(self, cfg, model, rank, world, device, start_state, val_folder, init=None,
                 deadline=None):
        from .data.patches import PatchBatches, load_training_images

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.main, self.val_folder, self.deadline = rank == 0, val_folder, deadline
        self.model = model.to(device)
        self.y_loss = cfg["model"] == "vdsr"
        self.optimizer = _optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"])
        self.iteration, self.seconds = 0, 0.0
        self.best_psnr, self.last_val, self.history = None, None, []
        self.init, self.stopped_early = init, False
        if start_state is not None:
            self.model.load_state_dict(start_state["model"])
            self.optimizer.load_state_dict(start_state["optimizer"])
            if start_state.get("scaler"):
                self.scaler.load_state_dict(start_state["scaler"])
            self.iteration = int(start_state["iteration"])
            self.seconds = float(start_state["seconds"])
            self.best_psnr = start_state["best_psnr"]
            self.last_val = start_state["last_val"]
            self.history = list(start_state.get("history") or [])
            self.init = start_state.get("init")
            _set_rng_state(start_state["rng"])
        elif init is not None and init["continued"]:
            self.iteration, self.seconds = init["iterations"], init["seconds"]
            self.history = list(init.pop("validation", None) or [])  # the curve goes on
        self.net = self.model
        if world > 1:
            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.teacher = _load_teacher(cfg, device) if cfg["teacher"] else None
        self.features = None
        if self.teacher is not None and cfg["distill_features"] > 0:
            self.features = (_BodyFeatures(self.model), _BodyFeatures(self.teacher))
        if self.main:
            print(f"loading training images from {cfg['data_root']} ({' '.join(cfg['train_sets'])}) "
                  f"and making x{cfg['scale']} LR images ...", file=sys.stderr)
        images, _ = load_training_images(cfg["data_root"], cfg["train_sets"])
        self.data = PatchBatches(images, cfg["scale"], cfg["patch"], cfg["batch"], seed=cfg["seed"],
                                 rank=rank, length=max(cfg["iters"], self.iteration))
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
                "scaler": self.scaler.state_dict() if self.cfg["amp"] else None,
                "rng": _rng_state(), "data": {"seed": self.cfg["seed"], "next_batch": self.iteration},
                "seconds": self.seconds, "best_psnr": self.best_psnr, "last_val": self.last_val,
                "history": self.history, "init": self.init, "world_size": self.world}

    def _set_lr(self):
        factor = lr_factor(self.cfg, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def _loss(self, lr, sr, hr):
        cfg = self.cfg
        if self.y_loss:  # VDSR learns the Y channel; its Cb/Cr are bicubic
            sr, hr = rgb_to_ycbcr(sr)[:, :1], rgb_to_ycbcr(hr)[:, :1]
        loss = F.l1_loss(sr, hr)
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(lr).float()
            if self.y_loss:
                target = rgb_to_ycbcr(target)[:, :1]
            loss = loss + cfg["distill"] * F.l1_loss(sr, target)
            if self.features is not None:
                student, teacher = self.features[0].take(), self.features[1].take()
                feat = sum(F.l1_loss(a.float(), b.float()) for a, b in zip(student, teacher)) / len(student)
                loss = loss + cfg["distill_features"] * feat
        return loss

    def step(self, lr_u8, hr_u8):
        cfg = self.cfg
        lr = lr_u8.to(self.device, non_blocking=True).float().div_(255)
        hr = hr_u8.to(self.device, non_blocking=True).float().div_(255)
        self._set_lr()
        for features in self.features or ():
            features.take()  # drop what validation forwards left
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=cfg["amp"]):
            sr = self.net(lr)
        loss = self._loss(lr, sr.float(), hr)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP all-reduces the gradients here
        self.scaler.unscale_(self.optimizer)
        if cfg["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad"])
        if cfg["eta"]:
            rescale_adder_grads(self.model, cfg["eta"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _out_of_time(self):
        """Whether the deadline has passed on any rank (a collective call under DDP)."""
        late = self.deadline is not None and time.monotonic() >= self.deadline
        if self.world > 1:
            flag = torch.tensor(float(late), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late

    def validate(self):
        """Score the model on the validation folder; record it; return whether it is the best."""
        it = self.iteration
        psnr, ssim = _validate(self.model, self.val_folder, self.cfg["scale"], self.device)
        self.last_val = {"iteration": it, "psnr": psnr, "ssim": ssim, "set": self.val_folder.name}
        self.history.append(dict(self.last_val, seconds=round(self.seconds, 1)))
        improved = self.best_psnr is None or psnr > self.best_psnr
        if improved:
            self.best_psnr = psnr
        self.writer.add_scalar("val/psnr", psnr, it)
        self.writer.add_scalar("val/ssim", ssim, it)
        tqdm.write(f"iteration {it}: {self.val_folder.name} PSNR {psnr:.3f} dB, SSIM {ssim:.4f}"
                   + (" (best)" if improved else f" (best {self.best_psnr:.3f} dB)"))
        return improved

    def train(self):
        cfg = self.cfg
        iters = cfg["iters"]
        bar = tqdm(total=iters, initial=min(self.iteration, iters), disable=not self.main,
                   dynamic_ncols=True, desc=f"{cfg['model']} x{cfg['scale']} {cfg['op']}", unit="it")
        loss_sum, count = torch.zeros((), device=self.device), 0
        good = self.iteration  # iteration of the last state known to be finite
        self.model.train()
        clock = time.perf_counter()
        workers = cfg["workers"]
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            workers = min(4, max(1, (cores or 1) // self.world))
        batches = _loader(self.data, self.iteration, iters, workers, self.device) if self.iteration < iters else ()
        for lr_u8, hr_u8 in batches:
            loss_sum += self.step(lr_u8, hr_u8)
            count += 1
            self.iteration += 1
            bar.update(1)
            it = self.iteration
            # the same decisions on every rank: the loss reduction is a collective call
            late = it % LOG_EVERY == 0 and self._out_of_time()
            validate = bool(cfg["val_every"]) and (it % cfg["val_every"] == 0 or late or it == iters)
            checkpoint = bool(cfg["ckpt_every"]) and it % cfg["ckpt_every"] == 0
            saving = validate or checkpoint or late or it == iters
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
            improved = validate and self.main and self.validate()
            if self.main and (checkpoint or improved or late or it == iters):
                state = self.state()
                save_checkpoint(self.out / "last.pt", state)
                if improved:
                    save_checkpoint(self.out / "best.pt", state)
            clock = time.perf_counter()
            if late:
                self.stopped_early = it < iters
                break
        bar.close()
        scored = self.history[-1]["iteration"] if self.history else None
        if self.main and cfg["val_every"] and scored != self.iteration:  # nothing left to train
            self.validate()

    def export(self, path):
        from . import models
        # save() records model, scale and op from the model itself
        cfg = self.cfg
        meta = {"iterations": self.iteration, "train_sets": list(cfg["train_sets"]),
                "patch": cfg["patch"], "batch": cfg["batch"], "processes": self.world,
                "lr": cfg["lr"], "eta": cfg["eta"], "seed": cfg["seed"],
                "seconds": round(self.seconds, 1), "device": hardware(self.device),
                "recipe": {k: cfg[k] for k in RECIPE_KEYS if cfg.get(k) is not None
                           and (cfg["teacher"] or k not in ("distill", "distill_features"))}}
        if self.init:
            meta["parent"] = self.init
        if self.last_val:  # the last validation, keyed by the validation set's folder name
            name = self.last_val.get("set") or (self.val_folder.name if self.val_folder else "val")
            meta["metrics"] = {name: {k: self.last_val[k] for k in ("psnr", "ssim", "iteration")}}
        if self.history:
            meta["validation"] = self.history
        self.model.eval()
        written = models.save(self.model, path, meta)
        print(f"exported weights to {' and '.join(map(str, written))}", file=sys.stderr)


def _finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _read_init(name, error):
    """The JSON and tensors of the ``--init`` weights."""
    from .models import read
    try:
        return read(name)
    except (FileNotFoundError, ValueError) as err:
        error(f"cannot start from --init {name}: {err}")


def _apply_init(model, cfg, info, tensors, error):
    """Load the matching tensors of the ``--init`` weights into ``model``; the parent record
    (with their validation curve, when the run continues theirs)."""
    own = model.state_dict()
    matched = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    if not matched:
        error(f"no tensor of {info['path']} matches the {cfg['model']} x{cfg['scale']} model")
    model.load_state_dict(matched, strict=False)
    continued = _continues(cfg, info)
    skipped = sorted(set(own) - set(matched))
    print(f"--init {info['path']}: loaded {len(matched)} of {len(own)} tensors"
          + (f" (not loaded: {', '.join(skipped[:4])}{', ...' if len(skipped) > 4 else ''})" if skipped else "")
          + (f"; continuing at iteration {info.get('iterations', 0)}" if continued else
             "; a new run (other architecture or scale): iteration 0"), file=sys.stderr)
    record = {"weights": Path(info["path"]).name, "model": info["model"], "scale": info["scale"],
              "op": info["op"], "config": info["config"], "iterations": int(info.get("iterations") or 0),
              "seconds": float(info.get("seconds") or 0.0), "continued": continued,
              "loaded": len(matched), "of": len(own)}
    if info.get("recipe"):  # how the parent was trained, when the run changes it
        record["recipe"] = info["recipe"]
    if continued and isinstance(info.get("validation"), list):
        record["validation"] = info["validation"]  # taken over by the run, not kept in the record
    return record


def _check_teacher_features(run, error):
    """Feature distillation needs body blocks of the same number and shape in both networks."""
    x = torch.zeros(1, 3, 8, 8, device=run.device)
    with torch.no_grad():
        run.model.eval()
        run.model(x)
        run.teacher(x)
        run.model.train()
    student, teacher = run.features[0].take(), run.features[1].take()
    if len(student) != len(teacher) or any(a.shape != b.shape for a, b in zip(student, teacher)):
        error(f"--distill-features: the teacher's body has {len(teacher)} blocks of "
              f"{teacher[0].shape[1] if teacher else 0} channels, the model's {len(student)} of "
              f"{student[0].shape[1] if student else 0}; they must match")


def main(argv=None):
    """Command-line entry point; returns the process's ``_Run`` (its ``model`` is trained)."""
    started = time.monotonic()
    args = parse_args(argv)
    error = args.parser.error
    if args.resume is not None and args.init is not None:
        error("--init starts a run from exported weights, --resume continues a checkpoint: use one")
    init_info, init_tensors = _read_init(args.init, error) if args.init else (None, None)
    cfg = _config(args, error, init_info)
    start_state, path = None, None
    if args.resume is not None:
        path = Path(cfg["out"]) / "last.pt" if args.resume == "last" else Path(args.resume)
        try:
            start_state = load_checkpoint(path)
        except (FileNotFoundError, ValueError) as err:
            error(f"cannot resume: {err}")
        cfg = _merge_resume(args, cfg, start_state["config"], error)
        for key, value in {**COMMON, **(ADDER_BASE if cfg["op"] == "adder" else {})}.items():
            cfg.setdefault(key, value)  # checkpoints of older versions lack the newer options
    _check_config(cfg, error)
    from . import models
    torch.manual_seed(cfg["seed"])
    try:
        model = models.build(cfg["model"], cfg["scale"], op=cfg["op"], **cfg["arch"])
    except (ValueError, KeyError) as err:
        error(str(err))
    _prepare(model, cfg, fresh=start_state is None)
    init = _apply_init(model, cfg, init_info, init_tensors, error) if init_info else None
    cfg["data_root"] = str(_data_root(cfg, error))
    try:
        val_folder = _val_folder(cfg) if cfg["val_every"] else None
    except FileNotFoundError as err:
        error(str(err))
    if val_folder is not None and not val_folder.is_dir():
        error(f"validation folder not found: {val_folder}")
    try:
        device = resolve(cfg["device"])
    except DeviceError as err:
        error(str(err))
    rank, world, device = _setup_distributed(device)
    deadline = started + 60 * cfg["time_limit"] if cfg["time_limit"] else None
    try:
        try:
            run = _Run(cfg, model, rank, world, device, start_state, val_folder, init, deadline)
        except (ValueError, FileNotFoundError) as err:
            error(str(err))
        if run.features is not None:
            _check_teacher_features(run, error)
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
            print(("time limit reached: " if run.stopped_early else "done: ")
                  + f"{run.iteration} iterations, {run.seconds:.0f} s of training"
                  + (f"; validation PSNR {val['psnr']:.3f} dB at iteration {val['iteration']}"
                     if val else "")
                  + (f"; continue with --resume (checkpoint in {run.out})" if run.stopped_early else ""),
                  file=sys.stderr)
        if cfg["export"] and run.main:
            run.export(cfg["export"])
        return run
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
