"""The networks, built by name: ``build("edsr-baseline", 2, op="adder")``.

Names: ``vdsr`` (20 layers x 64), ``edsr-baseline`` (16 blocks x 64, res_scale 1) and
``edsr`` (32 blocks x 256, res_scale 0.1); scales 2, 3, 4; ``op="conv"`` gives the
published CNN, ``op="adder"`` its AdderSR twin.

The adder ``edsr-baseline`` defaults to res_scale 0.1 (as full EDSR): every AdderSR layer
carries its own identity shortcut, so a block's residual branch already passes ``x``
through and, with res_scale 1, each block doubles the signal (activations reach ~1e4
after 16 blocks at initialisation; with 0.1 they stay ~1). Every model maps an RGB LR batch in
[0, 1], (N, 3, h, w), to RGB (N, 3, s*h, s*w), unclamped, and carries ``name``,
``scale``, ``op`` and ``config`` (the arguments that rebuild it).

``MULTI_SCALE`` names the models whose weights serve several scales (VDSR: only its inner
bicubic enlargement depends on the scale; EDSR's upsampler is scale-specific).
"""

from .common import OPS, SCALES
from .edsr import EDSR
from .store import list_weights, load, read, save, trained_scales, twin_key, weights_dir
from .trace import receptive_radius
from .vdsr import VDSR

__all__ = ["MODELS", "MULTI_SCALE", "OPS", "SCALES", "build", "list_weights", "load", "read",
           "receptive_radius", "save", "trained_scales", "weights_dir"]

# name -> (class, default architecture arguments)
MODELS = {
    "vdsr": (VDSR, {"depth": 20, "n_feats": 64}),
    "edsr-baseline": (EDSR, {"n_blocks": 16, "n_feats": 64, "res_scale": 1.0}),
    "edsr": (EDSR, {"n_blocks": 32, "n_feats": 256, "res_scale": 0.1}),
}
# models trained for several scales at once (their layers do not depend on the scale)
MULTI_SCALE = ("vdsr",)
# name -> architecture arguments that differ for the adder twin (see the module docstring)
ADDER_DEFAULTS = {"edsr-baseline": {"res_scale": 0.1}}


def build(name, scale, op="adder", backend=None, **overrides):
    """Build model ``name`` for ``scale`` with layers of kind ``op`` ("adder" or "conv").

    ``overrides`` change architecture arguments (e.g. ``n_blocks=4, n_feats=16`` for a
    small EDSR; VDSR: ``depth``, ``n_feats``); they are recorded in ``model.config`` and
    in saved weights. ``backend`` picks the adder kernel (see :mod:`addersr.ops`) and is
    not recorded. Raises ValueError for an unknown name, scale, op or argument.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    if isinstance(scale, bool) or scale not in SCALES:
        raise ValueError(f"unsupported scale {scale!r} for {name}; available: {list(SCALES)}")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OPS)}")
    cls, defaults = MODELS[name]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {name}; allowed: {sorted(defaults)}")
    if op == "adder":
        defaults = {**defaults, **ADDER_DEFAULTS.get(name, {})}
    model = cls(int(scale), op=op, backend=backend, **{**defaults, **overrides})
    model.name, model.scale, model.op = name, int(scale), op
    model.config = {"name": name, "scale": int(scale), "op": op, **overrides}
    return model
