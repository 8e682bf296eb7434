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
