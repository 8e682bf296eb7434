"""Weights on disk: ``NAME.safetensors`` (tensors) beside ``NAME.json`` (what they are).

The JSON records ``format`` ("addersr"), ``format_version``, ``model``, ``scale``, ``op``,
``config`` (architecture overrides, usually empty) and any training facts passed as
``meta`` (iterations, data, metrics, ...). Files are only ever read with safetensors and
json: nothing is unpickled. Weights trained at several scales (multi-scale VDSR) record
them as ``scales`` (``scale`` is the first) and load at any of them (``load(..., scale=S)``).
"""

import importlib.util
import json
import os
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..files import atomic_write

__all__ = ["FORMAT_VERSION", "list_weights", "load", "read", "save", "trained_scales", "twin_key",
           "weights_dir"]

FORMAT = "addersr"
FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "model", "scale", "op", "config")
_SUFFIXES = (".safetensors", ".json")


def weights_dir():
    """The folder of shipped weights.

    $ADDERSR_WEIGHTS if set; else the top-level ``weights/`` of a source or editable
    checkout; else the installed ``addersr.weights`` package folder.
    """
    env = os.environ.get("ADDERSR_WEIGHTS")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "weights").is_dir():
        return root / "weights"
    spec = importlib.util.find_spec("addersr.weights")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return root / "weights"


def _stem(path):
    path = Path(path)
    return path.with_suffix("") if path.suffix in _SUFFIXES else path


def save(model, path, meta=None):
    """Write ``model``'s weights to ``PATH.safetensors`` and its description to ``PATH.json``.

    ``path`` may end in ``.safetensors`` or ``.json`` or have no suffix. ``model`` must
    come from :func:`addersr.models.build` (it needs ``config``). ``meta``: a
    JSON-serialisable dict of extra facts; it may not use the keys
    ``format, format_version, model, scale, op, config``. Returns the two paths.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("save() needs a model built by addersr.models.build (it has no .config)")
    meta = dict(meta or {})
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise ValueError(f"meta may not set the reserved key(s) {clash}")
    overrides = {k: v for k, v in config.items() if k not in ("name", "scale", "op")}
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config["name"],
            "scale": config["scale"], "op": config["op"], "config": overrides, **meta}
    try:
        text = json.dumps(info, indent=2) + "\n"
    except TypeError as e:
        raise ValueError(f"meta is not JSON-serialisable: {e}") from None
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    st_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "model": info["model"], "scale": str(info["scale"]), "op": info["op"],
              "config": json.dumps(overrides, sort_keys=True)}
    data = safetensors_bytes(tensors, metadata=header)
    atomic_write(st_path, lambda f: f.write(data))
    atomic_write(json_path, lambda f: f.write(text), mode="w")
    return st_path, json_path


def _read_info(json_path):
    try:
        info = json.loads(Path(json_path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not an AdderSR weights description (no \"format\": \"{FORMAT}\")")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{json_path} has format_version {version!r}; this addersr reads up to "
                         f"{FORMAT_VERSION}")
    missing = [k for k in ("model", "scale", "op") if k not in info]
    if missing:
        raise ValueError(f"{json_path} lacks the key(s) {missing}")
    try:
        trained_scales(info)
    except ValueError as e:
        raise ValueError(f"{json_path}: {e}") from None
    return info


def _resolve(path_or_name):
    """(stem, is_bare_name): a bare name (no folder, no suffix) lives in :func:`weights_dir`."""
    if isinstance(path_or_name, str) and not any(s in path_or_name for s in ("/", os.sep)) \
            and Path(path_or_name).suffix not in _SUFFIXES:
        return weights_dir() / path_or_name, True
    return _stem(path_or_name), False


def read(path_or_name):
    """``(info, tensors)`` of weights on disk without building a model: the JSON as a dict
    and the safetensors file as a dict of CPU tensors, checked to belong together.

    Raises FileNotFoundError for a missing file and ValueError for a truncated or
    unreadable one, naming the file and the problem.
    """
    stem, bare = _resolve(path_or_name)
    st_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    for p in (json_path, st_path):
        if not p.is_file():
            hint = ""
            if bare:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    names = [w.with_suffix("").name for w, _ in list_weights()]
                hint = f" (weights folder {weights_dir()}; available: {names or 'none'})"
            raise FileNotFoundError(f"weights file {p} not found{hint}")
    info = _read_info(json_path)
    config = info.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{json_path}: \"config\" must be an object, got {config!r}")
    info["config"] = config
    try:
        with safe_open(str(st_path), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(st_path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{st_path} is truncated or not a safetensors file: {e}") from None
    for key in ("model", "op", "scale"):
        if key in header and header[key] != str(info[key]):
            raise ValueError(f"{st_path} holds {key}={header[key]!r} but {json_path} says "
                             f"{info[key]!r}: the two files do not belong together")
    _check_finite(tensors, st_path)
    info["path"] = str(stem)
    return info, tensors


def _check_finite(tensors, where):
    """Raise ValueError when a floating-point tensor holds NaN or infinity (weights of a
    diverged run: every output would be black or garbage)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ValueError(f"{where} holds NaN or infinite values in {_few(sorted(bad))}: the "
                         "training that wrote it diverged; these weights cannot be used")


def load(path_or_name, device="cpu", backend=None, precision="fp32", scale=None):
    """Rebuild a model from ``NAME.json`` and load ``NAME.safetensors``; eval mode, on ``device``.

    ``path_or_name``: a path (with or without suffix) or a bare name of shipped weights
    (see :func:`weights_dir`). The JSON is attached as ``model.meta``. ``backend`` picks
    the adder kernel. Raises FileNotFoundError for a missing file and ValueError for a
    truncated, unreadable or mismatched one, naming the file and the problem.
    ``precision="int8"``: the 8-bit CPU form of adder weights, calibrated by
    ``NAME.int8.json`` (:func:`addersr.quant.load_int8`; ValueError for a CNN or without
    calibration). ``scale``: one of the scales the weights were trained for
    (:func:`trained_scales`; default the recorded ``scale``; int8: those its calibration
    covers); ValueError for another.
    """
    if precision == "int8":
        from ..quant import load_int8
        return load_int8(path_or_name, device=device, backend=backend, scale=scale)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; expected 'fp32' or 'int8'")
    info, tensors = read(path_or_name)
    stem = Path(info.pop("path"))
    st_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    scale = _served_scale(info, scale, json_path)
    try:
        model = _build(info["model"], scale, info["op"], backend, info["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{json_path} describes a model that cannot be built: {e}") from None
    _check_tensors(model, tensors, st_path)
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    model.meta = info
    return model


def trained_scales(meta):
    """The scales weights serve: ``scales`` of their JSON (multi-scale VDSR), else ``[scale]``.
    ValueError when ``scales`` is not a list of distinct integers beginning with ``scale``."""
    scale, scales = meta["scale"], meta.get("scales")
    if scales is None:
        return [int(scale)]
    if (not isinstance(scales, list) or not scales or scales[0] != scale or len(set(scales)) != len(scales)
            or any(isinstance(s, bool) or not isinstance(s, int) for s in scales)):
        raise ValueError(f"\"scales\" must be a list of distinct scales beginning with \"scale\" "
                         f"({scale!r}), got {scales!r}")
    return list(scales)


def _served_scale(info, scale, json_path):
    """``scale`` (None: the recorded one), checked to be one the weights were trained for."""
    served = trained_scales(info)
    if scale is None:
        return served[0]
    if scale not in served or isinstance(scale, bool):
        raise ValueError(f"{json_path.with_suffix('').name} serves "
                         f"{', '.join(f'x{s}' for s in served)}, not x{scale}")
    return int(scale)


def _build(name, scale, op, backend, config):
    from . import build
    return build(name, scale, op, backend=backend, **config)


def _check_tensors(model, tensors, where):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if problems:
        raise ValueError(f"{where} does not match {model.config}: " + "; ".join(problems))
    for k, v in expected.items():
        if tensors[k].dtype.is_floating_point != v.dtype.is_floating_point:
            raise ValueError(f"{where}: tensor {k} has dtype {tensors[k].dtype}, expected {v.dtype}")


def _few(items, n=5):
    head = ", ".join(items[:n])
    return f"[{head}{', ...' if len(items) > n else ''}] ({len(items)})"


def list_weights(folder=None):
    """Sorted ``(safetensors_path, meta)`` pairs of the weights in ``folder`` (default
    :func:`weights_dir`). Files without a valid partner or description are skipped with a
    warning."""
    folder = Path(folder) if folder is not None else weights_dir()
    if not folder.is_dir():
        return []
    found = []
    for json_path in sorted(folder.glob("*.json")):
        if json_path.name.endswith(".int8.json"):  # int8 calibration (addersr.quant), not weights
            continue
        st_path = json_path.with_suffix(".safetensors")
        try:
            info = _read_info(json_path)
        except ValueError as e:
            warnings.warn(f"skipping {json_path}: {e}", stacklevel=2)
            continue
        except OSError as e:  # a dangling link, a folder, no permission
            broken = json_path.is_symlink() and not json_path.exists()
            warnings.warn(f"skipping {json_path}: " + ("a broken link" if broken else
                          e.strerror or str(e)), stacklevel=2)
            continue
        if not st_path.is_file():
            warnings.warn(f"skipping {json_path}: {st_path.name} is missing", stacklevel=2)
            continue
        found.append((st_path, info))
    return found


def twin_key(meta):
    """What twins share (model, scales, architecture); they differ in ``op`` (adder vs conv)."""
    return (meta["model"], tuple(int(s) for s in trained_scales(meta)),
            tuple(sorted((meta.get("config") or {}).items())))
