"""Triton adder kernels against a float64 brute-force reference.

On the CPU the kernels run under Triton's interpreter. ``TRITON_INTERPRET=1`` is set per
test through ``monkeypatch`` (never at import), so the other test files in the same pytest
process see the environment they started with; the backend wraps its kernels per
interpreter mode on first use, so the order in which modules import Triton does not
matter. With CUDA the same matrix also runs compiled on the GPU, plus larger shapes.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from addersr.ops import adder2d, available_backends, resolve_backend, triton_kernels  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The CPU under the Triton interpreter, and the GPU (compiled) when there is one."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device(request.param)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def reference(x, weight, grad_out, stride, padding):
    """Float64 forward, input gradient and weight gradient, one kernel tap at a time."""
    x, weight, g = x.double(), weight.double(), grad_out.double()
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    kh, kw = weight.shape[2:]
    xp = F.pad(x, (pw, pw, ph, ph))
    ho, wo = g.shape[2:]
    y = torch.zeros_like(g)
    gxp = torch.zeros_like(xp)
    gw = torch.zeros_like(weight)
    for i in range(kh):
        for j in range(kw):
            rows, cols = slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw)
            diff = xp[:, None, :, rows, cols] - weight[None, :, :, i, j, None, None]  # (N, O, C, Ho, Wo)
            y -= diff.abs().sum(2)
            gw[:, :, i, j] = (g[:, :, None] * diff).sum((0, 3, 4))
            gxp[:, :, rows, cols] += (g[:, :, None] * (-diff).clamp(-1, 1)).sum(1)
    return y, gxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]], gw


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def run_triton(x, weight, grad_out, stride, padding):
    """adder2d(backend="triton") through autograd: (y, grad x, grad weight)."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = adder2d(x, weight, stride=stride, padding=padding, backend="triton")
    y.backward(grad_out)
    return y, x.grad, weight.grad


def check(x, weight, stride, padding, tol):
    """Run the kernels on x (any layout) and compare all three results with the reference."""
    kh, kw = weight.shape[2:]
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    out_shape = (x.shape[0], weight.shape[0], (x.shape[2] + 2 * ph - kh) // sh + 1,
                 (x.shape[3] + 2 * pw - kw) // sw + 1)
    g = torch.randn(out_shape, dtype=x.dtype, device=x.device)
    got = run_triton(x, weight, g, stride, padding)
    want = reference(x, weight, g, stride, padding)
    for name, a, b in zip(("forward", "grad input", "grad weight"), got, want):
        assert a.shape == b.shape and a.dtype == x.dtype and a.device == x.device, name
        assert rel(a, b) < tol, (name, rel(a, b))


# (N, C, H, W, O, (kh, kw), stride, padding): odd sizes, channel counts off the block
# sizes (one and two 32-channel groups), k = 1/3/5 with kh != kw, stride 1-3, padding 0-2.
CASES = [
    (2, 3, 7, 9, 5, (3, 3), 1, 1),
    (1, 5, 9, 7, 13, (1, 1), 1, 0),
    (2, 13, 6, 5, 3, (5, 5), 1, 2),
    (1, 3, 11, 8, 5, (3, 5), (2, 1), (1, 2)),
    (2, 5, 9, 9, 13, (3, 3), 2, 0),
    (1, 13, 7, 7, 37, (3, 3), 2, 1),
    (1, 37, 5, 6, 5, (3, 3), 1, 1),
    (3, 3, 5, 6, 3, (5, 3), 1, (2, 1)),
    (1, 3, 5, 5, 5, (1, 1), 1, 2),
    (2, 4, 8, 10, 6, (3, 3), 3, 1),
]
IDS = [f"n{n}c{c}h{h}w{w}o{o}k{k[0]}x{k[1]}s{s}p{p}".replace(" ", "") for n, c, h, w, o, k, s, p in CASES]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(case, dtype, tol, device):
    n, c, h, w, o, k, stride, padding = case
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    weight = torch.randn(o, c, *k, dtype=dtype, device=device)
    check(x, weight, stride, padding, tol)


def test_close_values_and_clipping(device):
    """Input and weights within 1 of each other exercise both sides of the HardTanh clip."""
    x = torch.rand(2, 5, 7, 8, dtype=torch.float64, device=device)
    weight = torch.rand(6, 5, 3, 3, dtype=torch.float64, device=device) * 3 - 1
    check(x, weight, 1, 1, 1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "permuted"])
def test_memory_layouts(layout, device):
    base = torch.randn(2, 5, 9, 14, device=device)
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = base[:, :, :, ::2]
    else:
        x = base.transpose(2, 3)
    assert not x.is_contiguous()
    weight = torch.randn(7, 5, 3, 3, device=device).transpose(2, 3)
    check(x, weight, 1, 1, 1e-5)


@pytest.mark.parametrize("variant", sorted(triton_kernels.VARIANTS))
def test_kernel_variants(variant, device, monkeypatch):
    """Every named tiling (one or two channel groups, pixel blocks, pipelining) gives the same result."""
    monkeypatch.setenv("ADDERSR_TRITON_VARIANT", variant)
    x = torch.randn(2, 35, 5, 6, dtype=torch.float64, device=device)
    weight = torch.randn(70, 35, 3, 3, dtype=torch.float64, device=device)
    check(x, weight, 1, 1, 1e-12)
    check(x[:, :13], weight[:5, :13], 2, 0, 1e-12)


def test_variant_rule(monkeypatch):
    monkeypatch.delenv("ADDERSR_TRITON_VARIANT", raising=False)
    choose = triton_kernels.choose_variant
    assert choose(16 * 48 * 48, 64) == "p128a2w4"  # 288 x 1 programs: two waves
    assert choose(2 * 21 * 19, 256) == "p32a2w1"
    assert choose(10 ** 6, 3) == "p128a1w4"  # one channel group: no 256-pixel variant
    assert choose(100, 64, interpret=True) == triton_kernels._INTERPRETER_VARIANT
    assert all(choose(p, c) in triton_kernels.VARIANTS for p in (1, 999, 10 ** 7) for c in (1, 64, 512))
    monkeypatch.setenv("ADDERSR_TRITON_VARIANT", "nope")
    with pytest.raises(ValueError, match="unknown Triton variant 'nope'"):
        choose(100, 64)


def test_availability(monkeypatch):
    x = torch.randn(1, 3, 5, 5)
    weight = torch.randn(4, 3, 3, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match="CUDA tensor, or TRITON_INTERPRET=1"):
        triton_kernels.forward(x, weight, (1, 1), (1, 1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in available_backends("cpu")
    if CUDA:
        assert resolve_backend("cuda") == "triton"


def test_too_many_pixels(device):
    """Pixel indices are int32: a batch of 2^31 pixels is refused before anything is allocated."""
    x = torch.zeros(1, 1, 1, 1, device=device).expand(2 ** 31, 1, 1, 1)
    weight = torch.zeros(1, 1, 1, 1, device=device)
    with pytest.raises(ValueError, match="too large for the Triton adder kernels"):
        triton_kernels.forward(x, weight, (1, 1), (0, 0))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("case", [
    (16, 64, 48, 48, 64, (3, 3), 1, 1),
    (2, 256, 21, 19, 256, (3, 3), 1, 1),
    (4, 64, 41, 41, 3, (3, 3), 1, 1),
    (3, 3, 37, 29, 64, (5, 5), 2, 2),
], ids=["16x64x48x48", "2x256x21x19", "4x64x41x41-o3", "3x3x37x29-k5s2"])
def test_cuda_large(case):
    n, c, h, w, o, k, stride, padding = case
    x = torch.randn(n, c, h, w, device="cuda")
    weight = torch.randn(o, c, *k, device="cuda")
    check(x, weight, stride, padding, 1e-5)


def _gpu_memory():
    return torch.cuda.get_device_properties(0).total_memory if CUDA else 0


@pytest.mark.slow
@pytest.mark.skipif(_gpu_memory() < 32 * 2 ** 30, reason="needs a CUDA device with 32 GB")
def test_cuda_int64_offsets():
    """Over 2^31 input elements: the far corner of the last image against the reference."""
    n, c, h, w = 2, 64, 4096, 4200  # 2.2e9 elements
    x = torch.randn(n, c, h, w, device="cuda")
    weight = torch.randn(1, c, 3, 3, device="cuda")
    y = adder2d(x, weight, padding=1, backend="triton")
    g = torch.randn_like(y)
    gx = triton_kernels.grad_input(x, weight, g, (1, 1), (1, 1))
    # A 10x10 corner crop sees its true neighbourhood except in its first row and column.
    want_y, want_gx, _ = reference(x[-1:, :, -10:, -10:], weight, g[-1:, :, -10:, -10:], 1, 1)
    assert rel(y[-1:, :, -9:, -9:], want_y[:, :, 1:, 1:]) < 1e-5
    assert rel(gx[-1:, :, -9:, -9:], want_gx[:, :, 1:, 1:]) < 1e-5
