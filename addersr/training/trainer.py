"""The training loop of one process and the export of its weights.

A :class:`Trainer` receives the parts it runs (built by :func:`addersr.train.main`); its
:meth:`~Trainer.train` makes the steps and, each behind its own test of the iteration,
logs the loss, checks it is finite, validates, writes checkpoints and stops at the time
limit (``--time-limit``: validation, checkpoint and export included). The decisions that
need all ranks (the loss reduction, the out-of-time check) are taken alike on every rank.
A multi-scale run (``cfg["scales"]``, VDSR) steps on batches holding each scale in one
forward call, validates at each scale (their mean PSNR is its score) and exports them all.
"""

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..device import hardware
from ..models.common import rgb_to_ycbcr
from ..nn import rescale_adder_grads
from ..signals import ignore_in_worker
from . import bnstats, checkpoint, distributed, recovery
from .config import RECIPE_KEYS, scale_label
from .schedule import set_lr

LOG_EVERY = 10  # iterations between loss synchronisations (progress bar, TensorBoard, NaN check)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Trainer:
    """State of one training process: its parts, progress and the loop over them.

    ``net`` is ``model`` as the step calls it (wrapped in DDP under several processes);
    ``distiller``: an :class:`addersr.training.distill.Distiller` or None; ``writer``: a
    TensorBoard writer on rank 0, None elsewhere. The keywords after ``deadline`` are the
    progress a run starts from (:func:`addersr.training.checkpoint.restore` gives them).
    """

    def __init__(self, cfg, *, model, net, optimizer, scaler, data, distiller, writer, val_folder,
                 rank, world, device, deadline=None, iteration=0, seconds=0.0, best_psnr=None,
                 last_val=None, history=(), init=None):
        self.cfg, self.model, self.net, self.optimizer, self.scaler = cfg, model, net, optimizer, scaler
        self.data, self.distiller, self.writer, self.val_folder = data, distiller, writer, val_folder
        self.rank, self.world, self.device, self.deadline = rank, world, device, deadline
        self.main = rank == 0
        self.iteration, self.seconds, self.best_psnr = iteration, seconds, best_psnr
        self.last_val, self.history, self.init = last_val, list(history), init
        self.stopped_early = False
        # stop: an addersr.signals.StopRequest (a SIGINT/SIGTERM ends the run after the step);
        # saved: the iteration of the last checkpoint in out/last.pt, None before the first
        self.stop, self.saved = None, None
        self._bn_at = None  # the iteration whose weights the batch-norm statistics were recomputed for
        self.out = Path(cfg["out"])
        self.y_loss = cfg["model"] == "vdsr"
        self.scales = cfg.get("scales")  # several: VDSR's multi-scale run (batches of each scale)
        # the loss since the last log, and the last iteration known to be finite
        self._loss_sum, self._count, self._good = torch.zeros((), device=device), 0, iteration

    def _target(self, x):
        """What the loss compares: the Y channel for VDSR (its Cb/Cr are bicubic), else RGB."""
        return rgb_to_ycbcr(x)[:, :1] if self.y_loss else x

    def _loss(self, lr, sr, hr):
        sr = self._target(sr)
        loss = F.l1_loss(sr, self._target(hr))
        if self.distiller is not None:
            loss = self.distiller.add_loss(loss, lr, sr, self._target)
        return loss

    def step(self, lr_u8, hr_u8):
        """One optimiser step on a batch of uint8 patches; the loss (a tensor, not synchronised)."""
        cfg = self.cfg
        lr = _unit(lr_u8, self.device)
        hr = hr_u8.to(self.device, non_blocking=True).float().div_(255)
        set_lr(self.optimizer, cfg, self.iteration)
        if self.distiller is not None:
            self.distiller.drop_features()  # what validation forwards left
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=cfg["amp"]):
            sr = self.net(lr) if self.scales is None else self.net(lr, self.scales)
        loss = self._loss(lr, sr.float(), hr)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP all-reduces the gradients here
        self.scaler.unscale_(self.optimizer)
        if cfg["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad"])
        if cfg["clip_adjustable"]:  # VDSR's: each gradient within +-theta / the current rate
            rate = self.optimizer.param_groups[0]["lr"]
            torch.nn.utils.clip_grad_value_(self.model.parameters(), cfg["clip_adjustable"] / rate)
        if cfg["eta"]:
            rescale_adder_grads(self.model, cfg["eta"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def train(self):
        """The loop: a step, then what this iteration is due for (the same on every rank)."""
        cfg = self.cfg
        bar = tqdm(total=cfg["iters"], initial=min(self.iteration, cfg["iters"]), disable=not self.main,
                   dynamic_ncols=True, desc=f"{cfg['model']} x{scale_label(cfg)} {cfg['op']}", unit="it")
        self.model.train()
        clock = time.perf_counter()
        try:
            for lr_u8, hr_u8 in self._batches():
                self._loss_sum += self.step(lr_u8, hr_u8)
                self._count += 1
                self.iteration += 1
                bar.update(1)
                due = self._due()
                if due["log"]:
                    self._log(bar, self._mean_loss(check_weights=due["save"]))
                self.seconds += time.perf_counter() - clock  # validation and checkpoints not counted
                improved = due["validate"] and self.main and self._validate()
                if self.main and (due["checkpoint"] or improved):
                    self._checkpoint(best=improved)
                clock = time.perf_counter()
                if due["late"]:
                    self.stopped_early = self.iteration < cfg["iters"]
                    break
        finally:
            bar.close()
        scored = self.history[-1]["iteration"] if self.history else None
        if self.main and cfg["val_every"] and scored != self.iteration and not self.signalled:
            self._validate()

    def _batches(self):
        """The batches from the current iteration on: a DataLoader (none once trained)."""
        workers = self.cfg["workers"]
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            workers = min(4, max(1, (cores or 1) // self.world))
        if self.iteration >= self.cfg["iters"]:
            return ()
        return torch.utils.data.DataLoader(
            self.data, batch_size=None, sampler=range(self.iteration, self.cfg["iters"]),
            num_workers=workers, pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers else None, worker_init_fn=ignore_in_worker)

    def _due(self):
        """What the iteration just made is due for. Every rank answers alike: the out-of-time
        check here and the loss reduction of ``log`` are collective calls."""
        it, cfg = self.iteration, self.cfg
        last = it == cfg["iters"]
        # a signal is seen after this step alone, or with others at their next log
        late = (it % LOG_EVERY == 0 or self.world == 1 and self.signalled) and self._out_of_time()
        validate = bool(cfg["val_every"]) and (it % cfg["val_every"] == 0 or last
                                               or late and not self.signalled)
        ckpt = bool(cfg["ckpt_every"]) and it % cfg["ckpt_every"] == 0 or late or last
        save = validate or ckpt
        return {"late": late, "validate": validate, "checkpoint": ckpt, "save": save,
                "log": it % LOG_EVERY == 0 or save}

    @property
    def signalled(self):
        """Whether a SIGINT or SIGTERM asked this process to stop."""
        return self.stop is not None and self.stop.signum is not None

    def _out_of_time(self):
        """Whether the deadline has passed, or a signal came, on any rank (a collective call
        under DDP)."""
        late = self.signalled or self.deadline is not None and time.monotonic() >= self.deadline
        return distributed.any_rank(late, self.world, self.device)

    def _mean_loss(self, check_weights):
        """The mean loss over ranks since the last call, checked finite (and the weights too)."""
        loss = float(distributed.reduce_mean(self._loss_sum / self._count, self.world))
        self._check_finite(loss, check_weights)
        self._good = self.iteration
        self._loss_sum.zero_()
        self._count = 0
        return loss

    def _check_finite(self, loss, weights):
        """Raise TrainingDiverged when ``loss`` (or, with ``weights``, a parameter) is not finite."""
        problem = None if math.isfinite(loss) else f"loss became {loss}"
        if problem is None and weights and not _finite(self.model):
            problem = "the weights became NaN or infinite"
        if problem:
            raise TrainingDiverged(recovery.diverged_advice(self, problem, self._good))

    def _log(self, bar, loss):
        lr_now = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}")
        if self.writer:
            self.writer.add_scalar("train/loss", loss, self.iteration)
            self.writer.add_scalar("train/lr", lr_now, self.iteration)

    def _validate(self):
        """Score the model on the validation folder (at each scale of a multi-scale run: their
        mean is its score); record it; return whether it is the best."""
        it = self.iteration
        self._precise_bn()
        self.model.eval()
        try:
            scores = self._scores()
        finally:
            self.model.train()
        psnr = sum(v["psnr"] for v in scores.values()) / len(scores)
        ssim = sum(v["ssim"] for v in scores.values()) / len(scores)
        self.last_val = {"iteration": it, "psnr": psnr, "ssim": ssim, "set": self.val_folder.name}
        if self.scales:
            self.last_val["by_scale"] = scores
        self.history.append(dict(self.last_val, seconds=round(self.seconds, 1)))
        improved = self.best_psnr is None or psnr > self.best_psnr
        if improved:
            self.best_psnr = psnr
        self.writer.add_scalar("val/psnr", psnr, it)
        self.writer.add_scalar("val/ssim", ssim, it)
        for s, v in (scores.items() if self.scales else ()):
            self.writer.add_scalar(f"val/psnr_x{s}", v["psnr"], it)
        each = (" (mean of " + ", ".join(f"x{s} {v['psnr']:.3f}" for s, v in scores.items()) + ")"
                if self.scales else "")
        tqdm.write(f"iteration {it}: {self.val_folder.name} PSNR {psnr:.3f} dB, SSIM {ssim:.4f}{each}"
                   + (" (best)" if improved else f" (best {self.best_psnr:.3f} dB)"))
        return improved

    def _precise_bn(self):
        """With ``--precise-bn N``: the batch-norm statistics of the current weights, from N
        batches of a stream of their own (the training batches and RNG are not touched)."""
        count = self.cfg.get("precise_bn") or 0
        if not count or self._bn_at == self.iteration:
            return
        scales = self.scales

        def forward(index):
            lr = _unit(self.data.tensors(index % len(self.data), stream=1)[0], self.device)
            self.model(lr) if scales is None else self.model(lr, scales)

        bnstats.recompute(self.model, forward, range(count))
        self._bn_at = self.iteration

    def _scores(self):
        """``{"2": {"psnr", "ssim"}, ...}``: the validation folder at each scale of the run."""
        from ..eval import evaluate
        scores = {}
        for s in self.scales or [self.cfg["scale"]]:
            net = self.model if s == self.model.scale else self.model.at_scale(s)
            result = evaluate(net, self.val_folder, s, device=self.device, progress=False)
            scores[str(s)] = {"psnr": float(result["psnr"]), "ssim": float(result["ssim"])}
        return scores

    def _checkpoint(self, best):
        """Write ``last.pt`` (and ``best.pt`` when the validation just improved)."""
        state = checkpoint.capture(self)
        checkpoint.save_checkpoint(self.out / "last.pt", state)
        self.saved = self.iteration
        if best:
            checkpoint.save_checkpoint(self.out / "best.pt", state)

    def export(self, path):
        """Save the weights with :func:`addersr.models.save`, the run recorded in their JSON."""
        from .. import models
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
        if cfg.get("lr_changes"):  # rates lowered on --resume (after a divergence)
            meta["lr_changes"] = cfg["lr_changes"]
        if self.last_val:  # the last validation, keyed by the validation set's folder name
            name = self.last_val.get("set") or (self.val_folder.name if self.val_folder else "val")
            meta["metrics"] = {name: {k: self.last_val[k] for k in ("psnr", "ssim", "iteration")}}
        if self.scales:
            meta.update(_multi_scale_record(self.scales, self.last_val, meta))
        if self.history:
            meta["validation"] = self.history
        self._precise_bn()  # done already when the last validation was at this iteration
        self.model.eval()
        written = models.save(self.model, path, meta)
        print(f"exported weights to {' and '.join(map(str, written))}", file=sys.stderr)


def _unit(x, device):
    """uint8 patches (a tensor, or a multi-scale batch's list of them) as floats in [0, 1]."""
    if isinstance(x, (list, tuple)):
        return [_unit(t, device) for t in x]
    return x.to(device, non_blocking=True).float().div_(255)


def _multi_scale_record(scales, last_val, meta):
    """What a multi-scale export records: ``scales`` and, validated, ``metrics_by_scale``
    (``{"2": {SET: {psnr, ssim, iteration}}, ...}``); ``metrics`` keeps the first scale's."""
    record = {"scales": list(scales)}
    if last_val and "by_scale" in last_val:
        (name,) = meta["metrics"]
        record["metrics_by_scale"] = {s: {name: dict(v, iteration=last_val["iteration"])}
                                      for s, v in last_val["by_scale"].items()}
        record["metrics"] = record["metrics_by_scale"][str(scales[0])]
    return record


def _finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())
