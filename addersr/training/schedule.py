"""The learning-rate schedule: a pure function of the iteration (nanoGPT's ``get_lr``)."""

import math


def lr_factor(cfg, iteration):
    """Multiplier of the initial learning rates for the step that makes iteration ``iteration + 1``:
    linear warm-up over ``warmup`` steps, then ``cosine`` (to 0 at ``iters``) or ``step``
    (x ``lr_gamma`` every ``lr_step`` iterations)."""
    if iteration < cfg["warmup"]:
        return (iteration + 1) / cfg["warmup"]
    if cfg["lr_schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(iteration, cfg["iters"]) / cfg["iters"]))
    return cfg["lr_gamma"] ** (iteration // cfg["lr_step"])


def set_lr(optimizer, cfg, iteration):
    """Set every group's rate to its ``base_lr`` times :func:`lr_factor`."""
    factor = lr_factor(cfg, iteration)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
