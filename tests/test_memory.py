"""keep_freed_memory: glibc takes the settings, and a large tensor is still correct after it."""
import platform

import torch

from addersr.memory import keep_freed_memory


def test_keep_freed_memory():
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    x = torch.arange(40 * 2**20, dtype=torch.float32)  # 160 MiB: above any mmap threshold
    y = x.clone()
    del x
    z = torch.zeros(40 * 2**20)  # reuses the freed block: must still read as zeros
    assert float(z.abs().max()) == 0.0 and torch.equal(y[:5], torch.arange(5.0))
