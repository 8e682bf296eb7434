"""Where models run: one rule to resolve a device name and one way to describe it.

Every entry point (training, bench, batch upscaling, the demo) takes ``--device`` with the
same meaning: ``auto`` (or nothing) is the GPU when one is present, else the CPU; any name
``torch.device`` accepts is checked against the machine, and a bad one raises
:class:`DeviceError` (a ``ValueError`` whose message the command line prints as it is).
"""

import os
import platform

import torch

__all__ = ["DeviceError", "resolve", "describe", "hardware"]


class DeviceError(ValueError):
    """A device name this machine cannot use."""


def resolve(name="auto"):
    """``torch.device`` for ``name``: None or ``"auto"`` -> ``cuda`` when available, else ``cpu``."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"bad --device {name!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: there are {count} CUDA devices")
    return device


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            found = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        found = None
    return found or platform.processor() or platform.machine()


def hardware(device):
    """The hardware alone: ``NVIDIA H200`` for a GPU, ``cpu (MODEL, N cores)`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({_cpu_model()}, {os.cpu_count()} cores)"


def describe(device):
    """``cuda:0 (NVIDIA H200)`` for a GPU, ``cpu (MODEL, N cores)`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return hardware(device)
