"""Recipes and the resolution of command-line options into a run's config.

Recipes (DESIGN.md 2, EDSR-PyTorch defaults): L1 loss, Adam (0.9, 0.999, 1e-8), learning
rate 1e-4 (VDSR's CNN: 1e-3, ``CNN_RECIPES``) halved every 200,000 iterations (EDSR's "200
epochs" of 1,000 batches), 300,000 iterations, flips and quarter turns. The loss is taken on
RGB for EDSR and on the Y channel (MATLAB rgb2ycbcr) for VDSR, which only predicts Y. ``edsr`` / ``edsr-baseline``: batch 16 of
48x48 LR patches. ``vdsr``: batch 64 of 41x41 HR patches; the model takes the LR image and
upsamples it internally, so its patches are ceil(41/scale) LR pixels (11 at x4: 44x44 HR).
``--scale 2 3 4`` (VDSR only, as its paper) trains one network on batches mixing the scales:
the config keeps ``scale`` (the first) and ``scales``; every scale's patches have one HR size,
the smallest multiple of all scales at least 41 (48: LR patches of 24, 16 and 12 pixels).

Adder models train with the adder recipe (``ADDER_RECIPE``; the evidence is in
docs/training.md): SGD with momentum 0.9 at lr 0.08 and AdderNet's adaptive rate, which
gives the adder weights the step size they need (Adam at the CNN's rate moves them ~100x
too slowly; larger rates fall behind early and end ahead). The whole recipe
(``RECIPE_KEYS``) is recorded in the exported JSON (``recipe``), and ``--init`` continues it.

Options are a dict of option name to value (None: not given); bad ones raise
:class:`ConfigError`, whose message the command line prints as a one-line error.
"""

import math
import os
from pathlib import Path

COMMON = dict(lr=1e-4, iters=300_000, lr_schedule="step", lr_step=200_000, lr_gamma=0.5, warmup=0,
              optimizer="adam", clip_grad=0.0, clip_adjustable=0.0, weight_decay=0.0,
              train_sets=["T91", "BSD200"], val_every=1000,
              ckpt_every=1000, seed=0, distill=1.0, distill_features=0.0)
# Training batches over which the batch-norm statistics are recomputed before validation and
# export (training/bnstats.py; 0: the running statistics as they are).
PRECISE_BN = 0
# Options of adder layers. CNN twins keep the published recipe (these do not apply to them).
ADDER_BASE = dict(eta=0.2, adder_lr=1.0, adder_init=1.0, bn_momentum=0.1, bn_init=1.0, power_init=1.0,
                  power_learn=True, precise_bn=PRECISE_BN)
# The adder recipe: ADDER_BASE changed by what benchmarks/recipe.py measured (docs/training.md).
ADDER_RECIPE = dict(ADDER_BASE, optimizer="sgd", lr=0.08)
# The adder recipe of each backbone. Deep stacks of self-shortcuts (VDSR's 18 layers, EDSR's
# 32 blocks) make activations, and so the gradients of the full-precision parameters (tail,
# upsampler, power exponents), grow with depth: plain SGD then steps them by lr x a large
# gradient and diverges within ten steps (benchmarks/diverge.py). There the adder weights keep
# SGD with the adaptive rate and every other parameter takes Adam's bounded step (sgd+adam).
# --optimizer sgd+adam: Adam's rate for the parameters that are not adder weights (the CNN
# twins' rate: 2e-4 for EDSR, VDSR's 1e-3 below).
OTHER_LR = 2e-4
ADDER_RECIPES = {
    "edsr-baseline": ADDER_RECIPE,
    # VDSR's plain stack: each layer starts near its self-shortcut (batch-norm gamma 0.1 after
    # the adder op): 36.20 against 34.75 dB on Set5 after 800 steps (docs/training.md)
    "vdsr": dict(ADDER_RECIPE, optimizer="sgd+adam", other_lr=1e-3, bn_init=0.1),
    "edsr": dict(ADDER_RECIPE, optimizer="sgd+adam"),
}
# The CNN twins: EDSR-PyTorch's Adam at 1e-4 (COMMON), but 1e-3 for VDSR, whose plain stack of
# convolutions learns slowly at 1e-4 (VDSR 10 x 32, x2, 800 steps: 36.37 dB on Set5 at 1e-3,
# 34.79 at 1e-4; VDSR's own SGD at 0.1 stays at bicubic under the mean L1 loss; docs/training.md).
CNN_RECIPES = {"edsr-baseline": {}, "edsr": {}, "vdsr": dict(lr=1e-3)}
RECIPES = {
    "edsr": dict(patch=48, batch=16),
    "edsr-baseline": dict(patch=48, batch=16),
    "vdsr": dict(patch=None, batch=64),  # patch: ceil(41 / scale)
}
# Options that may differ on --resume; every other option must match the checkpoint.
RUN_OPTIONS = ("iters", "out", "val_every", "val_data", "ckpt_every", "export", "workers",
               "device", "data_root", "time_limit", "precise_bn")
# What defines a training run: recorded in exports as "recipe", continued by --init.
RECIPE_KEYS = ("lr", "iters", "lr_schedule", "lr_step", "lr_gamma", "warmup", "optimizer", "clip_grad",
               "clip_adjustable", "weight_decay",
               "patch", "batch", "train_sets", "seed", "eta", "adder_lr", "other_lr", "adder_init", "bn_momentum", "bn_init",
               "precise_bn", "power_init", "power_learn", "teacher", "distill", "distill_features")


class ConfigError(ValueError):
    """An option, or a file an option names, that a run cannot use (a one-line message)."""


def resolve(options, init=None):
    """Fill the options left out with the recipe of the model and its op.

    ``init``: the JSON of the ``--init`` weights. Model, op, architecture and scale not given
    come from it; when the run then has its architecture and scale, options not given come
    from its recorded recipe too (the run continues it).
    """
    cfg = dict(options)
    if init is not None:
        cfg["model"] = cfg["model"] or init["model"]
        cfg["op"] = cfg["op"] or init["op"]
        if cfg["arch"] is None and cfg["model"] == init["model"]:
            cfg["arch"] = sorted(init["config"].items())
        if cfg["scale"] is None:
            cfg["scales"] = init.get("scales")
        cfg["scale"] = init["scale"] if cfg["scale"] is None else cfg["scale"]
    cfg["model"] = cfg["model"] or "edsr"
    from ..models import MODELS
    if cfg["model"] not in MODELS:
        raise ConfigError(f"unknown model {cfg['model']!r}; available: {', '.join(sorted(MODELS))}")
    cfg["scale"] = 4 if cfg["scale"] is None else cfg["scale"]
    scales = cfg.pop("scales", None)
    if scales:  # several (VDSR); a single-scale config has no "scales" key, as before
        cfg["scales"] = list(scales)
    cfg["op"] = cfg["op"] or "adder"
    cfg["arch"] = dict(cfg["arch"] or [])
    if init is not None and continues(cfg, init):
        for key, value in (init.get("recipe") or {}).items():
            if key in RECIPE_KEYS and cfg.get(key) is None:
                cfg[key] = value
    twin = ADDER_RECIPES if cfg["op"] == "adder" else CNN_RECIPES
    recipe = {**COMMON, **twin[cfg["model"]], **RECIPES[cfg["model"]]}
    for key, value in recipe.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg["patch"] is None:
        from ..data.patches import vdsr_patch
        cfg["patch"] = vdsr_patch(cfg.get("scales") or cfg["scale"])
    if cfg["optimizer"] != "sgd+adam":
        cfg["other_lr"] = None  # not used (not even when a continued run had it)
    elif cfg["other_lr"] is None:
        cfg["other_lr"] = OTHER_LR
    if cfg["op"] == "conv":  # adder-only options do not apply to a CNN
        cfg.update({k: None for k in ADDER_BASE})
        cfg["eta"] = 0.0
    cfg["amp"] = bool(cfg["amp"])
    cfg["out"] = cfg["out"] or f"runs/{cfg['model']}_x{scale_label(cfg)}_{cfg['op']}"
    return cfg


def scale_label(cfg):
    """The run's scale in words: ``2``, or ``2-3-4`` for a multi-scale run."""
    return "-".join(str(s) for s in cfg.get("scales") or [cfg["scale"]])


def continues(cfg, init):
    """Whether a run of ``cfg`` continues the training of the ``init`` weights."""
    return (cfg["model"], cfg["scale"], cfg.get("scales"), cfg["op"], cfg["arch"]) == \
        (init["model"], init["scale"], init.get("scales"), init["op"], init["config"])


def merge_resume(options, cfg, ckpt_cfg, iteration=None):
    """The checkpoint's configuration, with the run options given (``RUN_OPTIONS``) and a
    lowered ``--lr`` / ``--other-lr`` (recorded as ``lr_changes`` at ``iteration``); any other
    option given must agree with it. Options newer than the checkpoint get their defaults."""
    from .recovery import lowered, record_lowered
    merged = dict(ckpt_cfg)
    for key in (k for k, v in options.items() if v is not None):
        if key in RUN_OPTIONS:
            merged[key] = cfg[key]
        elif lowered(key, cfg[key], ckpt_cfg.get(key)):
            merged[key] = cfg[key]
            record_lowered(merged, ckpt_cfg, key, iteration)
        elif cfg[key] != ckpt_cfg.get(key):
            raise ConfigError(
                f"--{key.replace('_', '-')} {cfg[key]} differs from the checkpoint's "
                f"{ckpt_cfg.get(key)}; only {', '.join('--' + k.replace('_', '-') for k in RUN_OPTIONS)} "
                "may change on --resume, and --lr, --other-lr may be lowered")
    for key, value in {**COMMON, **(ADDER_BASE if merged["op"] == "adder" else {})}.items():
        merged.setdefault(key, value)  # checkpoints of older versions lack the newer options
    return merged


def check(cfg):
    """Raise ConfigError for the first option out of its range."""
    for key in ("patch", "batch", "iters", "lr_step"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    for key in ("val_every", "ckpt_every", "workers", "warmup", "precise_bn"):
        if cfg[key] is not None and cfg[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg["optimizer"] == "sgd+adam" and cfg["op"] != "adder":
        raise ConfigError("--optimizer sgd+adam is for adder models (it needs adder weights)")
    for key in ("lr", "other_lr", "adder_lr", "adder_init", "power_init", "time_limit"):
        value = cfg.get(key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive number, got {value}")
    for key in ("eta", "clip_grad", "clip_adjustable", "weight_decay", "distill", "distill_features", "bn_init"):
        if cfg.get(key) is not None and not (cfg[key] >= 0 and math.isfinite(cfg[key])):
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg["bn_momentum"] is not None and not 0 < cfg["bn_momentum"] <= 1:
        raise ConfigError(f"--bn-momentum must be in (0, 1], got {cfg['bn_momentum']}")
    if cfg["amp"] and cfg["op"] != "conv":
        raise ConfigError("--amp is only allowed with --op conv: float16 is not exact enough for "
                          "adder layers (their outputs are large sums of absolute differences)")
    check_scales(cfg)
    check_arch(cfg)


def check_arch(cfg):
    """Raise ConfigError for an ``--arch`` value of the wrong kind: the counts (blocks, layers,
    features) are whole numbers of at least 1, the others positive numbers."""
    from ..models import MODELS
    defaults = MODELS[cfg["model"]][1]
    for key, value in cfg["arch"].items():
        if key not in defaults:
            continue  # unknown keys: models.build names the allowed ones
        if isinstance(defaults[key], int) and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"--arch {key}={value}: {key} must be a whole number of at least 1")
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--arch {key}={value}: {key} must be a positive number")


def check_scales(cfg):
    """Raise ConfigError for a multi-scale run that cannot be made (``scales`` of ``cfg``)."""
    from ..models import MULTI_SCALE, SCALES
    scales = cfg.get("scales")
    if not scales:
        return
    if cfg["model"] not in MULTI_SCALE:
        raise ConfigError(f"--scale takes one scale for {cfg['model']}: its upsampler is scale-specific "
                          f"(several scales are for {', '.join(MULTI_SCALE)})")
    bad = [s for s in scales if s not in SCALES]
    if bad or len(set(scales)) != len(scales):
        raise ConfigError(f"--scale {' '.join(map(str, scales))}: give distinct scales among "
                          f"{', '.join(map(str, SCALES))}")
    hr = cfg["patch"] * scales[0]
    uneven = [s for s in scales if hr % s]
    if uneven:
        raise ConfigError(f"--patch {cfg['patch']}: the HR patch ({cfg['patch']} x {scales[0]} = {hr} pixels) "
                          f"must be a multiple of every scale, not of {', '.join(map(str, uneven))}")
    if cfg["batch"] < len(scales):
        raise ConfigError(f"--batch {cfg['batch']} cannot hold a patch of each of the {len(scales)} scales")
    if cfg.get("teacher"):
        raise ConfigError("--teacher distils at one scale: it cannot be used with several --scale values")


def data_root(cfg):
    """The folder of the training sets: ``--data-root``, else $ADDERSR_DATA/train."""
    if cfg["data_root"] is not None:
        return Path(cfg["data_root"])
    env = os.environ.get("ADDERSR_DATA")
    if not env:
        raise ConfigError("no training data: pass --data-root FOLDER (holding T91/, BSD200/, ...) "
                          "or set ADDERSR_DATA to a folder holding train/")
    return Path(env) / "train"


def val_folder(cfg):
    """The validation folder (``--val-data``, else Set5), None when validation is off."""
    if not cfg["val_every"]:
        return None
    if cfg["val_data"] is not None:
        folder = Path(cfg["val_data"])
    else:
        from ..data import dataset_root
        try:
            folder = dataset_root() / "Set5"
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    if not folder.is_dir():
        raise ConfigError(f"validation folder not found: {folder}")
    return folder
