"""Shared fixtures. The benchmark data is found through $ADDERSR_DATA (a folder holding
``benchmark/`` and ``train/``); tests that need it skip when it is unset."""

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def data_root():
    """The datasets folder named by $ADDERSR_DATA, or skip."""
    root = os.environ.get("ADDERSR_DATA")
    if not root:
        pytest.skip("ADDERSR_DATA is not set")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"ADDERSR_DATA={root} is not a folder")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny layers and training steps are dominated by thread wake-ups on a busy machine:
    run them on one torch and one numba thread."""
    import numba
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba_threads)


@pytest.fixture
def tiny_data(tmp_path):
    """A data root in ``tmp_path`` for the benchmark scripts: train/T91 (three 64x64 images)
    and benchmark/Set5 (two 32x32), blocky random pictures."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder, n, size in (("train/T91", 3, 64), ("benchmark/Set5", 2, 32)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            img = np.kron(rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8),
                          np.ones((4, 4, 1), np.uint8))
            Image.fromarray(img).save(tmp_path / folder / f"{i}.png")
    return tmp_path


@pytest.fixture(scope="module")
def sr_data(tmp_path_factory):
    """Training set ``train/A`` (three RGB images of awkward sizes and a gray one) and a
    validation folder ``Set5`` (two blocky 24x28 pictures: multiples of 2, 3 (24 only) and 4)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(2)
    (root / "train" / "A").mkdir(parents=True)
    (root / "Set5").mkdir()
    for i, (h, w) in enumerate([(40, 36), (44, 52), (37, 41)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "train" / "A" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (30, 34), dtype=np.uint8)).save(root / "train" / "A" / "g.png")
    for i in range(2):
        smooth = np.kron(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
        Image.fromarray(smooth).save(root / "Set5" / f"{i}.png")
    return root
