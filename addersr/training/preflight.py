"""What a run checks before its first step, so that no fault waits for a later iteration:
the validation images (readable, large enough to score at every scale of the run) and the
output paths (``--out`` a writable folder, ``--export`` writable files)."""

from pathlib import Path

from ..files import OutputError, prepare_output_dir
from .config import ConfigError

_SUFFIXES = (".safetensors", ".json")


def check_val_images(folder, scales):
    """Raise ConfigError unless every image of ``folder`` can be read and scored at ``scales``."""
    from ..data import list_images, read_image
    from ..eval import unscorable
    from ..images import ImageError
    paths = list_images(folder)
    if not paths:
        raise ConfigError(f"--val-data: no images in {folder}")
    for path in paths:
        try:
            shape = read_image(path).shape
        except (OSError, ImageError) as err:
            raise ConfigError(f"--val-data: {err}") from None
        why = next(filter(None, (unscorable(shape, s) for s in scales)), None)
        if why:
            raise ConfigError(f"--val-data: {path}: {why}; remove it or choose another "
                              "validation folder")


def export_paths(export):
    """The two files ``--export PATH`` writes (``PATH.safetensors``, ``PATH.json``)."""
    stem = Path(export)
    if stem.suffix in _SUFFIXES:
        stem = stem.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in _SUFFIXES]


def check_outputs(cfg):
    """Raise ConfigError unless ``--out`` (and ``--export``'s folder) can be written."""
    try:
        prepare_output_dir(cfg["out"])
    except OutputError as err:
        raise ConfigError(f"--out: {err}") from None
    if not cfg.get("export"):
        return
    paths = export_paths(cfg["export"])
    try:
        prepare_output_dir(paths[0].parent)
    except OutputError as err:
        raise ConfigError(f"--export: {err}") from None
    for path in paths:
        if path.is_dir():
            raise ConfigError(f"--export: {path} is a folder; name the weights' file stem")


def check(cfg, val_folder):
    """All the checks, for the run of ``cfg`` validating on ``val_folder`` (None: none)."""
    if val_folder is not None:
        check_val_images(val_folder, cfg.get("scales") or [cfg["scale"]])
    check_outputs(cfg)
