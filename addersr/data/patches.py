"""Training patches: aligned LR/HR crops with the 8 flips/rotations, a batch per index.

HR images are decoded once into memory (uint8). For each image the LR image is made once
with :func:`addersr.data.imresize` (the MATLAB bicubic kernel of the benchmark) from the
HR image cropped to a multiple of the scale, and kept in memory. A training pair is an
LR crop of ``patch`` pixels and the HR crop of ``scale * patch`` pixels covering the same
area (LR pixel ``i`` is the bicubic average centred on HR pixels ``[s*i, s*i + s)``).

:class:`PatchBatches` is a map-style dataset whose item ``i`` is a whole batch, drawn with
a generator seeded by ``(seed, rank, i)``: batch ``i`` is the same whatever the number of
DataLoader workers, which worker makes it, or whether the run was resumed in between.
With ``scales`` (VDSR's multi-scale training) every batch mixes the scales: its patches are
split evenly between them, all of one HR size, each with the LR patch of its own scale.
"""

import math
from pathlib import Path

import numpy as np
import torch

from . import imresize, list_images, read_image

__all__ = ["PatchBatches", "augment", "load_training_images", "make_lr_images", "vdsr_patch"]


def _rgb(img, path):
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        return np.ascontiguousarray(img[:, :, :3])
    raise ValueError(f"{path}: expected a gray, RGB or RGBA image, got shape {img.shape}")


def load_training_images(root, sets):
    """Decode every image of ``root/<set>`` for each name in ``sets`` into RGB uint8 arrays.

    Returns (images, paths). Raises FileNotFoundError for a missing folder and ValueError
    for a set without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder {root} does not exist")
    if not sets:
        raise ValueError("no training sets named")
    images, paths = [], []
    for name in sets:
        folder = root / name
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(f"training set {name!r} not found: {folder} is not a folder "
                                    f"(sub-folders of {root}: {found or 'none'})")
        files = list_images(folder)
        if not files:
            raise ValueError(f"training set {name!r} ({folder}) holds no images")
        for f in files:
            images.append(_rgb(read_image(f), f))
            paths.append(Path(f))
    return images, paths


def make_lr_images(images, scale):
    """Crop each HR image to a multiple of ``scale`` and shrink it with MATLAB bicubic.

    Returns (hr_cropped, lr) lists of uint8 arrays with ``hr.shape[:2] == scale * lr.shape[:2]``.
    """
    hrs, lrs = [], []
    for img in images:
        h, w = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
        hr = np.ascontiguousarray(img[:h, :w])
        lr = np.asarray(imresize(hr, 1 / scale))
        if lr.shape[:2] != (h // scale, w // scale):
            raise ValueError(f"imresize returned shape {lr.shape} for an HR image of {hr.shape} "
                             f"at scale 1/{scale}")
        hrs.append(hr)
        lrs.append(lr)
    return hrs, lrs


def augment(lr, hr, transforms):
    """Apply dihedral transform ``t`` (0..7: ``t % 4`` quarter turns, then a horizontal flip
    when ``t >= 4``) to each patch pair of the (B, C, h, w) batches ``lr`` and ``hr``;
    returns two new contiguous arrays."""
    out_lr, out_hr = [], []
    for a, b, t in zip(lr, hr, transforms):
        a, b = np.rot90(a, t % 4, axes=(1, 2)), np.rot90(b, t % 4, axes=(1, 2))
        if t >= 4:
            a, b = a[:, :, ::-1], b[:, :, ::-1]
        out_lr.append(a)
        out_hr.append(b)
    return np.stack(out_lr), np.stack(out_hr)


class PatchBatches(torch.utils.data.Dataset):
    """Batches of random aligned LR/HR patches: item ``i`` is ``(lr, hr)`` uint8 tensors of
    shape (batch, 3, patch, patch) and (batch, 3, scale*patch, scale*patch).

    Images are picked with probability proportional to their number of patch positions,
    so every patch position of the training set is equally likely; then a position and one
    of the 8 flips/rotations are drawn uniformly. ``length`` is the number of items (the
    index space the sampler may ask for). Images too small for one patch are skipped.

    ``scales`` (several, the first ``scale``): item ``i`` is ``([lr_2, lr_3, ...], hr)``, the
    batch split evenly between the scales in their order (the first ones take the
    remainder); ``hr`` holds every part's HR patches, all ``scale * patch`` pixels, and the
    part of scale ``s`` has LR patches of ``scale * patch / s`` pixels (a whole number). The
    parts are drawn in order from batch ``i``'s one generator, so the first part is the
    single-scale batch ``i`` of its size.
    """

    def __init__(self, images, scale, patch, batch, seed=0, rank=0, length=None, scales=None):
        if patch < 1 or batch < 1:
            raise ValueError(f"patch ({patch}) and batch ({batch}) must be positive")
        self.parts = None
        if scales is not None:
            self._mix(images, scale, patch, batch, seed, rank, length, list(scales))
            return
        hrs, lrs = make_lr_images(images, scale)
        keep = [i for i, lr in enumerate(lrs) if min(lr.shape[:2]) >= patch]
        if not keep:
            raise ValueError(f"no training image is large enough for {patch}x{patch} LR patches "
                             f"at x{scale} (needs {patch * scale}x{patch * scale} HR pixels)")
        # planar (C, H, W) copies: crops and quarter turns then copy long rows, not pixels
        self.hr = [np.ascontiguousarray(hrs[i].transpose(2, 0, 1)) for i in keep]
        self.lr = [np.ascontiguousarray(lrs[i].transpose(2, 0, 1)) for i in keep]
        self.skipped = len(images) - len(keep)
        self.scale, self.patch, self.batch = scale, patch, batch
        self.seed, self.rank = seed, rank
        self.length = length if length is not None else 2 ** 62
        rows = np.array([lr.shape[1] - patch + 1 for lr in self.lr], dtype=np.int64)
        cols = np.array([lr.shape[2] - patch + 1 for lr in self.lr], dtype=np.int64)
        self._rows, self._cols = rows, cols
        counts = (rows * cols).astype(np.float64)
        self._p = counts / counts.sum()

    def _mix(self, images, scale, patch, batch, seed, rank, length, scales):
        """Set up the parts of a multi-scale batch: one single-scale dataset per scale."""
        hr = scale * patch
        if not scales or scales[0] != scale or len(set(scales)) != len(scales):
            raise ValueError(f"scales {scales} must be distinct and begin with the scale {scale}")
        if batch < len(scales):
            raise ValueError(f"a batch of {batch} cannot hold a patch of each of the scales {scales}")
        uneven = [s for s in scales if hr % s]
        if uneven:
            raise ValueError(f"the HR patch ({patch} x {scale} = {hr} pixels) is not a multiple of "
                             f"the scale(s) {uneven}")
        sizes = [batch // len(scales) + (k < batch % len(scales)) for k in range(len(scales))]
        self.parts = [PatchBatches(images, s, hr // s, n, seed, rank, length)
                      for s, n in zip(scales, sizes)]
        self.skipped = max(part.skipped for part in self.parts)
        self.scale, self.patch, self.batch, self.scales = scale, patch, batch, scales
        self.seed, self.rank, self.length = seed, rank, self.parts[0].length

    def __len__(self):
        return self.length

    def numpy_batch(self, index, stream=0):
        """Batch ``index`` as (lr, hr) uint8 numpy arrays of shape (B, 3, h, w); with
        ``scales``, ``lr`` is the list of the parts' LR arrays. ``stream`` > 0: batch
        ``index`` of another sequence, independent of the training batches (stream 0)."""
        if not 0 <= index < self.length:
            raise IndexError(f"batch index {index} out of range [0, {self.length})")
        rng = np.random.default_rng((self.seed, self.rank, index) + ((stream,) if stream else ()))
        if self.parts is None:
            return self._draw(rng)
        drawn = [part._draw(rng) for part in self.parts]
        return [lr for lr, _ in drawn], np.concatenate([hr for _, hr in drawn])

    def _draw(self, rng):
        """``batch`` patch pairs drawn with ``rng``."""
        b, p, s = self.batch, self.patch, self.scale
        which = rng.choice(len(self.lr), size=b, p=self._p)
        ys = rng.integers(0, self._rows[which])
        xs = rng.integers(0, self._cols[which])
        transforms = rng.integers(0, 8, size=b)
        lr = [self.lr[i][:, y:y + p, x:x + p] for i, y, x in zip(which, ys, xs)]
        hr = [self.hr[i][:, s * y:s * (y + p), s * x:s * (x + p)] for i, y, x in zip(which, ys, xs)]
        return augment(lr, hr, transforms)

    def __getitem__(self, index):
        return self.tensors(int(index))

    def tensors(self, index, stream=0):
        """:meth:`numpy_batch` as uint8 tensors."""
        lr, hr = self.numpy_batch(index, stream)
        lr = [torch.from_numpy(a) for a in lr] if self.parts else torch.from_numpy(lr)
        return lr, torch.from_numpy(hr)


def vdsr_patch(scale, hr_patch=41):
    """LR patch size for VDSR's ``hr_patch`` x ``hr_patch`` training patches: ceil(41 / scale).

    ``scale`` may be a list of scales (multi-scale training, one HR patch size for all): the
    HR patch is then the smallest multiple of every scale at least ``hr_patch`` pixels (48 for
    2, 3, 4) and the LR patch is that of the first scale."""
    scales = [scale] if isinstance(scale, int) else list(scale)
    step = math.lcm(*scales)
    return math.ceil(hr_patch / step) * step // scales[0]
