"""The checkpoint format, RNG state and ``--init`` (starting from exported weights).

Checkpoints ``last.pt`` / ``best.pt`` (best validation PSNR) in ``--out`` are written
atomically and hold everything ``--resume`` needs to continue exactly (:func:`capture`):
model, optimiser and scaler states, the RNG states, the progress (iteration, training
seconds, validation history) and the config. Batch ``i`` of rank ``r`` is a function of
(seed, r, i) only (see :mod:`addersr.data.patches`), so data order survives a resume and does
not depend on ``--workers``.

``--init WEIGHTS`` loads every tensor of exported weights whose name and shape match, and,
when the architecture and scale are the same, continues their step count, data order and
learning-rate schedule; the run records them as its parent.
"""

import random
import sys
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .config import ConfigError, continues

CHECKPOINT_FORMAT = "addersr-train-checkpoint-v1"


def rng_state():
    """The Python, NumPy, torch (and CUDA, once used) generators' states, as tensors and lists."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": [version, list(state), gauss],
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng):
    """Restore what :func:`rng_state` returned."""
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"][:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def capture(run):
    """The checkpoint of a :class:`~addersr.training.trainer.Trainer` as it is now."""
    return {"format": CHECKPOINT_FORMAT, "iteration": run.iteration, "config": run.cfg,
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.cfg["amp"] else None,
            "rng": rng_state(), "data": {"seed": run.cfg["seed"], "next_batch": run.iteration},
            "seconds": run.seconds, "best_psnr": run.best_psnr, "last_val": run.last_val,
            "history": run.history, "init": run.init, "world_size": run.world}


def restore(state, model, optimizer, scaler):
    """Load a checkpoint into the parts and the RNGs; its progress (the Trainer's keywords)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return {"iteration": int(state["iteration"]), "seconds": float(state["seconds"]),
            "best_psnr": state["best_psnr"], "last_val": state["last_val"],
            "history": list(state.get("history") or []), "init": state.get("init")}


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


def read_init(name):
    """The JSON and tensors of the ``--init`` weights."""
    from ..models import read
    try:
        return read(name)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"cannot start from --init {name}: {err}") from None


def apply_init(model, cfg, info, tensors):
    """Load the matching tensors of the ``--init`` weights into ``model``; the parent record
    (with their validation curve, when the run continues theirs)."""
    own = model.state_dict()
    matched = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigError(f"no tensor of {info['path']} matches the {cfg['model']} x{cfg['scale']} model")
    model.load_state_dict(matched, strict=False)
    continued = continues(cfg, info)
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


def init_progress(record):
    """The progress a run starts with: the parent's step count, seconds and validation curve
    when it continues them (``record``: :func:`apply_init`'s, or None)."""
    if record is None or not record["continued"]:
        return {"init": record}
    return {"iteration": record["iterations"], "seconds": record["seconds"],
            "history": list(record.pop("validation", None) or []), "init": record}
