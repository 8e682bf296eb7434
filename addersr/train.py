"""Train a super-resolution model: ``python -m addersr.train --model edsr --scale 4``.

Recipes (DESIGN.md 2, EDSR-PyTorch defaults; :mod:`addersr.training.config`): L1 loss on RGB
(EDSR) or the Y channel (VDSR), Adam at 1e-4 halved every 200,000 of 300,000 iterations;
adder models train with the adder recipe (SGD at 0.08 and AdderNet's adaptive rate,
``--eta``; docs/training.md). One model per scale, but for VDSR's multi-scale training:
``--scale 2 3 4`` trains one network on batches mixing the scales, validates it at each (their
mean PSNR picks the best) and exports it once. ``--teacher WEIGHTS`` adds distillation
from a trained model of the same scale (``--distill``, ``--distill-features``). The whole
recipe is recorded in the exported JSON (``recipe``).

Checkpoints ``last.pt`` / ``best.pt`` (best Set5 PSNR) in ``--out`` hold everything
``--resume`` needs to continue exactly, data order included (and a lower ``--lr`` after a
divergence). SIGTERM or Ctrl-C ends the current step, writes the checkpoint and the
``--export`` weights, and exits naming the command that continues. A lease-sized run:
``--time-limit MINUTES`` stops cleanly at the deadline (checkpoint and export included);
``--init WEIGHTS`` starts from exported weights, loading every tensor whose name and shape
match, and, when the architecture and scale are the same, continues their step count, data
order and learning-rate schedule (the recipe recorded in their JSON is the default for every
option not given).

Several GPUs: ``torchrun --nproc_per_node=N -m addersr.train ...`` (DistributedDataParallel;
``--batch`` is per process; rank 0 alone logs, validates and writes checkpoints).

This module is the command line: it builds the parts of a run and hands them to
:class:`addersr.training.trainer.Trainer`; the parts live in :mod:`addersr.training`.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from .device import DeviceError, resolve
from .files import reason
from .signals import StopRequest, exit_status, name, received
from .training import checkpoint, config, distributed, lock, optim, preflight, recovery
from .training.checkpoint import load_checkpoint
from .training.config import ADDER_RECIPE, OTHER_LR, ConfigError
from .training.distill import Distiller
from .training.schedule import lr_factor
from .training.trainer import LOG_EVERY, Trainer, TrainingDiverged

__all__ = ["main", "parse_args", "TrainingDiverged", "load_checkpoint", "lr_factor", "ADDER_RECIPE",
           "OTHER_LR", "LOG_EVERY"]


def parse_args(argv=None):
    """Parse the command line; options left out are None (filled by the recipe later)."""
    p = argparse.ArgumentParser(prog="python -m addersr.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="vdsr, edsr-baseline or edsr (default edsr)")
    p.add_argument("--scale", type=int, nargs="+", default=None,
                   help="2, 3 or 4 (default 4); vdsr: several (e.g. 2 3 4) train one network for all")
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
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default 1e-4, VDSR's CNN 1e-3; adder models 0.08, see ADDER_RECIPE)")
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
                        "weights (default: the CNN twin's, 2e-4 for EDSR, 1e-3 for VDSR)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm of all parameters to this value (default 0: off)")
    p.add_argument("--clip-adjustable", type=float, default=None, metavar="THETA",
                   help="VDSR's adjustable gradient clipping: each gradient value to +-THETA / the "
                        "current learning rate (default 0: off; VDSR's paper: 0.01 with SGD from 0.1)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="SGD's weight decay (default 0; VDSR's paper: 1e-4)")
    adder = p.add_argument_group("adder layers (ignored for --op conv; defaults: ADDER_RECIPE, docs/training.md)")
    adder.add_argument("--eta", type=float, default=None,
                       help="AdderNet adaptive learning rate of adder layers (default 0.2; 0 disables)")
    adder.add_argument("--adder-lr", type=float, default=None, metavar="MULT",
                       help="learning rate of the adder weights, as a multiple of --lr (default 1)")
    adder.add_argument("--adder-init", type=float, default=None, metavar="STD",
                       help="standard deviation of the N(0, STD) initial adder weights (default 1, AdderNet's)")
    adder.add_argument("--bn-momentum", type=float, default=None,
                       help="momentum of the batch-norm running statistics (default 0.1)")
    adder.add_argument("--bn-init", type=float, default=None, metavar="GAMMA",
                       help="initial scale (gamma) of the batch norm after each adder op (default 1; "
                            "VDSR 0.1: each layer starts near its self-shortcut)")
    adder.add_argument("--precise-bn", type=int, default=None, metavar="N",
                       help="before each validation and the export, recompute the batch-norm "
                            "statistics over N training batches of the current weights (default 0: "
                            "keep the running averages, which lag behind fast-moving weights)")
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
                        "--ckpt-every, --export, --workers, --device, --data-root and --precise-bn may change")
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
    # one scale: "scale" as always; several: "scale" is the first and "scales" all of them
    args.scales = args.scale if args.scale and len(args.scale) > 1 else None
    args.scale = args.scale[0] if args.scale else None
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


def main(argv=None):
    """Command-line entry point; returns the process's :class:`Trainer` (its ``model`` is trained)."""
    started = time.monotonic()
    args = parse_args(argv)
    with _one_line_errors(args.parser):
        cfg, start, path, init = _config(args)
        model, parent = _model(cfg, start, init)
        cfg["data_root"] = str(config.data_root(cfg))
        val_folder = config.val_folder(cfg)
        preflight.check(cfg, val_folder)
        device = _device(cfg)
    rank, world, device = distributed.setup_distributed(device)
    deadline = started + 60 * cfg["time_limit"] if cfg["time_limit"] else None
    # SIGINT/SIGTERM from here on: a first one stops after the next step (with its checkpoint)
    stop = StopRequest("stopping after this step, then writing the checkpoint"
                       + (" and the weights" if cfg["export"] else ""))
    try:
        with _one_line_errors(args.parser), lock.run_lock(cfg["out"], main=rank == 0), stop:
            trainer = _trainer(cfg, model, rank, world, device, start, val_folder, parent, deadline)
            trainer.stop = stop
            if start is not None and path.resolve() == (trainer.out / "last.pt").resolve():
                trainer.saved = trainer.iteration  # the checkpoint it continues is there
            if start is not None and trainer.main:
                print(f"resuming {path} at iteration {trainer.iteration}", file=sys.stderr)
            _train(trainer)
            return trainer
    except KeyboardInterrupt:  # a second signal while the run was being built
        last = Path(cfg["out"]) / "last.pt"
        print("interrupted before training: " + (
            f"{last} is kept; continue with `{recovery.resume_command(cfg['out'])}`" if last.is_file()
            else f"no checkpoint was written to {cfg['out']}"), file=sys.stderr)
        raise SystemExit(exit_status(received())) from None
    finally:
        distributed.teardown(world)


@contextlib.contextmanager
def _one_line_errors(parser):
    """A ConfigError becomes argparse's one-line error (usage, message, exit status 2)."""
    try:
        yield
    except ConfigError as err:
        parser.error(str(err))


def _options(args):
    return {k: v for k, v in vars(args).items() if k not in ("parser", "resume")}


def _config(args):
    """The run's config; the checkpoint it resumes and its path (or None, None); the JSON and
    tensors of the ``--init`` weights (or None)."""
    if args.resume is not None and args.init is not None:
        raise ConfigError("--init starts a run from exported weights, --resume continues a checkpoint: use one")
    init = checkpoint.read_init(args.init) if args.init else None
    cfg = config.resolve(_options(args), init[0] if init else None)
    start = path = None
    if args.resume is not None:
        path = Path(cfg["out"]) / "last.pt" if args.resume == "last" else Path(args.resume)
        try:
            start = load_checkpoint(path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"cannot resume: {err}") from None
        cfg = config.merge_resume(_options(args), cfg, start["config"], int(start["iteration"]))
    config.check(cfg)
    return cfg, start, path, init


def _model(cfg, start, init):
    """The model of ``cfg``, its adder options applied, and the ``--init`` parent record."""
    from . import models
    torch.manual_seed(cfg["seed"])
    try:
        model = models.build(cfg["model"], cfg["scale"], op=cfg["op"], **cfg["arch"])
    except (ValueError, KeyError) as err:
        raise ConfigError(str(err)) from None
    optim.apply_adder_options(model, cfg, fresh=start is None)
    return model, checkpoint.apply_init(model, cfg, *init) if init else None


def _device(cfg):
    try:
        return resolve(cfg["device"])
    except DeviceError as err:
        raise ConfigError(str(err)) from None


def _trainer(cfg, model, rank, world, device, start, val_folder, parent, deadline):
    """Build this process's parts (optimiser, restored state, DDP, teacher, data, TensorBoard)."""
    from .data.patches import PatchBatches, load_training_images
    main = rank == 0
    try:
        model = model.to(device)
        optimizer = optim.build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"])
        progress = (checkpoint.restore(start, model, optimizer, scaler) if start is not None
                    else checkpoint.init_progress(parent))
        if start is not None:  # the config's base rates (a lowered --lr), not the checkpoint's
            recovery.apply_base_rates(optimizer, optim.build_optimizer(model, cfg))
        iteration = progress.get("iteration", 0)
        net = distributed.wrap(model, world, device)
        distiller = Distiller(cfg, model, device) if cfg["teacher"] else None
        if main:
            print(f"loading training images from {cfg['data_root']} ({' '.join(cfg['train_sets'])}) "
                  f"and making x{config.scale_label(cfg)} LR images ...", file=sys.stderr)
        images, _ = load_training_images(cfg["data_root"], cfg["train_sets"])
        data = PatchBatches(images, cfg["scale"], cfg["patch"], cfg["batch"], seed=cfg["seed"],
                            rank=rank, length=max(cfg["iters"], iteration), scales=cfg.get("scales"))
        if main and data.skipped:
            print(f"skipped {data.skipped} images smaller than one patch", file=sys.stderr)
        writer = None
        if main:
            Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(Path(cfg["out"])), purge_step=iteration or None)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if distiller is not None:
        distiller.check_features(model, device)
    return Trainer(cfg, model=model, net=net, optimizer=optimizer, scaler=scaler, data=data,
                   distiller=distiller, writer=writer, val_folder=val_folder, rank=rank, world=world,
                   device=device, deadline=deadline, **progress)


def _train(trainer):
    """Run the loop and the export; the summary. A diverged run, a failed export or a stop by
    a signal (SIGINT, SIGTERM: after the step, its checkpoint and export) ends with a
    one-line message naming what was written and how to continue."""
    try:
        trainer.train()
        exported = _export(trainer)
        trainer.stop.hold()  # all is written: later signals change nothing
    except TrainingDiverged as err:
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        print(f"interrupted at iteration {trainer.iteration}: {recovery.checkpoint_note(trainer)}",
              file=sys.stderr)
        raise SystemExit(exit_status(received())) from None
    finally:
        if trainer.writer:
            trainer.writer.close()
    if trainer.signalled:
        if trainer.main:
            print(recovery.stop_message(trainer, name(trainer.stop.signum), exported), file=sys.stderr)
        raise SystemExit(exit_status(trainer.stop.signum))
    if trainer.main:
        val = trainer.last_val
        print(("time limit reached: " if trainer.stopped_early else "done: ")
              + f"{trainer.iteration} iterations, {trainer.seconds:.0f} s of training"
              + (f"; validation PSNR {val['psnr']:.3f} dB" + (" (mean of the scales)" if "by_scale" in val else "")
                 + f" at iteration {val['iteration']}" if val else "")
              + (f"; continue with `{recovery.resume_command(trainer.out)}`" if trainer.stopped_early else ""),
              file=sys.stderr)


def _export(trainer):
    """Export the weights to ``--export`` (rank 0); their path, or None when not asked for."""
    path = trainer.cfg["export"]
    if not (path and trainer.main):
        return None
    try:
        trainer.export(path)
    except (OSError, ValueError) as err:
        raise SystemExit("error: " + recovery.export_failed(trainer, path, reason(err))) from None
    return path


if __name__ == "__main__":
    main()
