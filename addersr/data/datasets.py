"""Benchmark image folders: finding the data (images are read by :mod:`addersr.images`).

A dataset root is a folder whose sub-folders are datasets of HR images in any format
Pillow reads (``<root>/Set5/*.png``, ``<root>/MySet/*.jpg``, ...). The root comes from an
explicit option, else ``$ADDERSR_DATA/benchmark``, else the copy of Set5 shipped in the
package, so the tools run out of the box.
"""

import os
from pathlib import Path

from PIL import Image

from ..images import read_image

__all__ = ["BENCHMARK_SETS", "dataset_root", "find_datasets", "list_images", "read_image"]

BENCHMARK_SETS = ("Set5", "Set14", "B100", "Urban100")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def list_images(folder):
    """Image files directly inside ``folder`` (any extension Pillow knows), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    known = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in known)


def dataset_root(data_root=None):
    """The folder whose sub-folders are the datasets.

    ``data_root`` if given, else ``$ADDERSR_DATA/benchmark``, else the shipped assets
    folder (which holds ``Set5/``).
    """
    if data_root is not None:
        root = Path(data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"data root not found: {root}")
        return root
    env = os.environ.get("ADDERSR_DATA")
    if env:
        root = Path(env) / "benchmark"
        if not root.is_dir():
            raise FileNotFoundError(f"ADDERSR_DATA={env} holds no benchmark/ folder ({root})")
        return root
    return ASSETS


def find_datasets(root):
    """``{name: folder}`` of the sub-folders of ``root`` that hold images.

    The four benchmark sets come first in table order, then the others by name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    folders = [p for p in root.iterdir()
               if p.is_dir() and not p.name.startswith(".") and list_images(p)]
    rank = {name: i for i, name in enumerate(BENCHMARK_SETS)}
    folders.sort(key=lambda p: (rank.get(p.name, len(rank)), p.name))
    return {p.name: p for p in folders}
