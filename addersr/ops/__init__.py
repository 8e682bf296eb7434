"""The adder operator ``adder2d`` and its backends.

Backends: ``"reference"`` (plain PyTorch, any device), ``"cpu"`` (numba kernels) and
``"triton"`` (GPU kernels; on the CPU only under ``TRITON_INTERPRET=1``). ``backend=None``
picks the fastest one available for the tensor's device; the environment variable
``ADDERSR_BACKEND`` overrides that choice.
"""

import importlib
import importlib.util
import os

import torch

from .function import AdderFunction

__all__ = ["adder2d", "available_backends", "get_backend", "resolve_backend"]

_MODULES = {
    "reference": "addersr.ops.reference",
    "cpu": "addersr.ops.cpu",
    "triton": "addersr.ops.triton_kernels",
}


def _installed(package):
    return importlib.util.find_spec(package) is not None


def _triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device="cpu"):
    """Names of the backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and _installed("triton"):
        names.append("triton")
    if device.type == "cpu":
        if _installed("numba"):
            names.append("cpu")
        if _triton_interpreted() and _installed("triton"):
            names.append("triton")
    names.append("reference")
    return names


def resolve_backend(device, backend=None):
    """The backend name used for ``device``: ``backend``, else $ADDERSR_BACKEND, else the fastest."""
    name = backend or os.environ.get("ADDERSR_BACKEND") or None
    choices = available_backends(device)
    if name is None:
        return choices[0]
    if name not in _MODULES:
        raise ValueError(f"unknown adder backend {name!r}; expected one of {sorted(_MODULES)}")
    if name not in choices:
        hint = " (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)" if name == "triton" else ""
        raise ValueError(f"adder backend {name!r} cannot run on device {torch.device(device)}; "
                         f"available there: {choices}{hint}")
    return name


def get_backend(name):
    """The backend module called ``name``."""
    return importlib.import_module(_MODULES[name])


def _pair(value, what):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
    return pair


def _check(x, weight, bias, stride, padding):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("adder2d expects tensors for the input and the weight")
    if x.dim() != 4:
        raise ValueError(f"adder2d input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"adder2d weight must be 4-D (O, C, kh, kw), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[1]} channels but the weight expects {weight.shape[1]}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"adder2d supports float32 and float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"input dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"input is on {x.device} but the weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != x.device or bias.dtype != x.dtype:
            raise ValueError("bias must have the input's device and dtype")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    for size, k, p, what in zip(x.shape[2:], weight.shape[2:], padding, ("height", "width")):
        if size + 2 * p < k:
            raise ValueError(f"input {what} {size} with padding {p} is smaller than the kernel ({k}): no output")
    if x.numel() == 0:
        raise ValueError(f"adder2d input is empty: shape {tuple(x.shape)}")


def adder2d(x, weight, bias=None, stride=1, padding=0, backend=None):
    """Adder convolution: ``Y[n,o,p] = -sum_{c,i,j} |Xpad[n,c,p+(i,j)] - W[o,c,i,j]| (+ bias)``.

    Zero padding and stride behave as in ``conv2d``. Differentiable with AdderNet's rules:
    full-precision weight gradient ``sum g (X - W)`` and HardTanh input gradient
    ``sum g clamp(W - X, -1, 1)``. ``backend``: None, "reference", "cpu" or "triton".
    """
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    _check(x, weight, bias, stride, padding)
    module = get_backend(resolve_backend(x.device, backend))
    y = AdderFunction.apply(x, weight, stride, padding, module)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y
