"""adder2d on every CPU backend against an independent float64 brute-force reference."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import addersr.ops as ops
from addersr.ops import adder2d, available_backends, resolve_backend

BACKENDS = available_backends("cpu")


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _out_shape(x, weight, stride, padding):
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    kh, kw = weight.shape[2:]
    return (x.shape[0], weight.shape[0], (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1)


def brute(x, weight, grad_out, stride, padding):
    """Float64 forward, input and weight gradients, one kernel tap at a time (DESIGN.md 1)."""
    x, weight, g = x.double(), weight.double(), grad_out.double()[:, :, None]  # g: (N, O, 1, Ho, Wo)
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    xp = F.pad(x, (pw, pw, ph, ph))
    ho, wo = g.shape[-2:]
    y = torch.zeros(grad_out.shape, dtype=torch.float64)
    gxp, gw = torch.zeros_like(xp), torch.zeros_like(weight)
    for i in range(weight.shape[2]):
        for j in range(weight.shape[3]):
            tap = (slice(None), slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
            diff = xp[tap][:, None] - weight[None, :, :, i, j, None, None]  # (N, O, C, Ho, Wo)
            y -= diff.abs().sum(2)
            gw[:, :, i, j] = (g * diff).sum((0, 3, 4))
            gxp[tap] += (g * (-diff).clamp(-1, 1)).sum(1)
    return y, gxp[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]], gw


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


# (N, C, H, W, O, (kh, kw), stride, padding): odd sizes, channel counts off every block size.
CASES = [
    (2, 3, 11, 9, 5, (3, 3), 1, 1),
    (3, 7, 10, 13, 13, (5, 5), 2, 2),
    (2, 13, 9, 7, 67, (1, 1), 1, 0),
    (2, 5, 12, 11, 7, (3, 5), (2, 1), (0, 2)),
    (1, 67, 8, 9, 3, (3, 3), 2, 0),
    (2, 5, 7, 15, 6, (5, 3), (1, 2), (2, 1)),
    (2, 64, 9, 10, 64, (3, 3), 1, 1),
]


def _run(x, weight, grad_out, stride, padding, backend):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = adder2d(x, weight, stride=stride, padding=padding, backend=backend)
    y.backward(grad_out)
    return y, x.grad, weight.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5]}-s{c[6]}-p{c[7]}")
def test_against_brute_force(case, dtype, backend):
    n, c, h, w, o, k, stride, padding = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    weight = torch.randn(o, c, *k, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(_out_shape(x, weight, stride, padding), dtype=torch.float64).to(dtype)
    y_ref, gx_ref, gw_ref = brute(x, weight, grad_out, stride, padding)
    y, gx, gw = _run(x, weight, grad_out, stride, padding, backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert y.shape == y_ref.shape and gx.shape == x.shape and gw.shape == weight.shape
    assert rel(y, y_ref) < tol
    assert rel(gx, gx_ref) < tol
    assert rel(gw, gw_ref) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_memory_layouts(layout, backend):
    n, c, h, w, o, stride, padding = 2, 5, 9, 11, 6, (2, 1), 1
    if layout == "channels_last":
        x = torch.randn(n, c, h, w).to(memory_format=torch.channels_last)
        weight = torch.randn(o, c, 3, 3).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(n + 1, 2 * c, h + 3, w + 2)[1:, ::2, 2:-1, 1:-1]
        weight = torch.randn(c, o, 3, 3).transpose(0, 1)
    assert not x.is_contiguous() and not weight.is_contiguous()
    grad_out = torch.randn(_out_shape(x, weight, stride, padding))
    y_ref, gx_ref, gw_ref = brute(x, weight, grad_out, stride, padding)
    y, gx, gw = _run(x, weight, grad_out, stride, padding, backend)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    assert rel(y, y_ref) < 1e-5 and rel(gx, gx_ref) < 1e-5 and rel(gw, gw_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias(backend):
    x, weight, bias = torch.randn(2, 4, 7, 6), torch.randn(5, 4, 3, 3), torch.randn(5, requires_grad=True)
    y = adder2d(x, weight, bias, padding=1, backend=backend)
    y_ref, _, _ = brute(x, weight, torch.zeros(y.shape), 1, 1)
    assert rel(y, y_ref + bias.detach().double().reshape(1, -1, 1, 1)) < 1e-5
    grad_out = torch.randn(y.shape)
    y.backward(grad_out)
    torch.testing.assert_close(bias.grad, grad_out.sum((0, 2, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out(backend):
    x, weight = torch.randn(2, 3, 9, 8), torch.randn(4, 3, 3, 3)
    x[1, 2, 4, 5] = float("nan")
    x.requires_grad_()
    y = adder2d(x, weight, padding=1, backend=backend)
    seen = torch.zeros(2, 1, 9, 8)
    seen[1, 0, 4, 5] = 1
    hit = F.max_pool2d(seen, 3, 1, 1).expand_as(y).bool()  # outputs whose window holds the NaN
    assert torch.isnan(y[hit]).all()
    assert torch.isfinite(y[~hit]).all()
    y.sum().backward()
    assert torch.isnan(x.grad[1, :, 4, 5]).any()
    weight_nan = weight.clone()
    weight_nan[2, 1, 0, 0] = float("nan")
    y = adder2d(x.detach().nan_to_num(), weight_nan, padding=1, backend=backend)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, [0, 1, 3]]).all()


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("ADDERSR_BACKEND", raising=False)
    assert BACKENDS[-1] == "reference"
    assert resolve_backend("cpu") == BACKENDS[0]
    if "cpu" in BACKENDS:
        assert BACKENDS[0] == "cpu"

    calls = []
    for name in {BACKENDS[0], "reference"}:
        module = ops.get_backend(name)
        original = module.forward
        monkeypatch.setattr(module, "forward",
                            lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    adder2d(x, weight)
    assert calls == [BACKENDS[0]]
    monkeypatch.setenv("ADDERSR_BACKEND", "reference")
    assert resolve_backend("cpu") == "reference"
    adder2d(x, weight)
    assert calls[-1] == "reference"
    adder2d(x, weight, backend=BACKENDS[0])  # an explicit backend wins over the variable
    assert calls[-1] == BACKENDS[0]
    monkeypatch.setenv("ADDERSR_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown adder backend 'nonsense'"):
        adder2d(x, weight)


def test_unknown_and_unavailable_backends(monkeypatch):
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown adder backend 'fast'"):
        adder2d(x, weight, backend="fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="cannot run on device cpu.*TRITON_INTERPRET"):
        adder2d(x, weight, backend="triton")


@pytest.mark.parametrize("x_shape, w_shape, kwargs, message", [
    ((2, 5, 5), (3, 2, 3, 3), {}, "input must be 4-D"),
    ((1, 2, 5, 5), (3, 2, 3), {}, "weight must be 4-D"),
    ((1, 2, 5, 5), (3, 4, 3, 3), {}, "input has 2 channels but the weight expects 4"),
    ((1, 2, 5, 5), (3, 2, 7, 3), {}, "input height 5 with padding 0 is smaller than the kernel"),
    ((1, 2, 5, 2), (3, 2, 3, 3), {"padding": (1, 0)}, "input width 2 with padding 0 is smaller"),
    ((1, 2, 5, 5), (3, 2, 3, 3), {"padding": -1}, "padding must be non-negative"),
    ((1, 2, 5, 5), (3, 2, 3, 3), {"stride": 0}, "stride must be positive"),
    ((1, 2, 5, 5), (3, 2, 3, 3), {"stride": (1, 2, 3)}, "stride must be an int or a pair"),
    ((0, 2, 5, 5), (3, 2, 3, 3), {}, "input is empty"),
])
def test_bad_input(x_shape, w_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        adder2d(torch.randn(x_shape), torch.randn(w_shape), **kwargs)


def test_bad_dtypes_and_bias():
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="differs from weight dtype"):
        adder2d(x, weight.double())
    with pytest.raises(ValueError, match="supports float32 and float64"):
        adder2d(x.half(), weight.half())
    with pytest.raises(ValueError, match="bias must have shape"):
        adder2d(x, weight, torch.randn(2))
    with pytest.raises(ValueError, match="bias must have the input's device and dtype"):
        adder2d(x, weight, torch.randn(3, dtype=torch.float64))


_CONCURRENT = """
import torch
from concurrent.futures import ThreadPoolExecutor
from addersr.ops import adder2d
x, w = torch.randn(2, 8, 40, 40), torch.randn(8, 8, 3, 3)
ref = adder2d(x, w, padding=1, backend="cpu")
with ThreadPoolExecutor(4) as pool:
    outs = list(pool.map(lambda _: adder2d(x, w, padding=1, backend="cpu"), range(12)))
assert all(torch.equal(y, ref) for y in outs)
"""


@pytest.mark.skipif("cpu" not in BACKENDS, reason="numba is not installed")
@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_cpu_backend_from_several_threads(layer):
    """A web app calls the operator from worker threads; numba's workqueue layer would abort."""
    env = dict(os.environ)
    if layer == "workqueue":
        env["NUMBA_THREADING_LAYER"] = "workqueue"
    proc = subprocess.run([sys.executable, "-c", _CONCURRENT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


_MEMORY = """
import ctypes, torch
from addersr.ops import adder2d
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
x = torch.randn(1, 32, 64, 64, requires_grad=True)
w = torch.randn(32, 32, 3, 3, requires_grad=True)
g = torch.ones(1, 32, 64, 64)
for _ in range(2):  # compile or load the kernels, start autograd's threads
    adder2d(x, w, padding=1, backend="cpu").backward(g)
libc = ctypes.CDLL(None)
libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: freed blocks leave the resident set
libc.malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
base = kb("VmRSS")
adder2d(x, w, padding=1, backend="cpu").backward(g)
print((kb("VmHWM") - base) / 1024)
"""


@pytest.mark.skipif("cpu" not in BACKENDS or not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs numba and Linux /proc")
def test_cpu_memory_stays_linear():
    """Forward + backward of a 32-channel layer on 64x64: tensors of input size are 0.5 MiB;
    an unfolded O x C*k*k x H*W difference would be 144 MiB."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 12, proc.stdout


# Stride-1 shapes for the column-vectorised kernels: widths around their vector (16 or 8
# lanes) and block (2 and 3 vectors) edges, channels off the gradient's block of 4, filters
# off the forward's block of 8, rectangular kernels, padding wider than the kernel.
COLUMN_CASES = [
    (1, 1, 3, 1, 2, (1, 1), 0), (2, 5, 4, 15, 3, (3, 3), 1), (1, 6, 5, 16, 7, (3, 3), 1),
    (1, 9, 3, 17, 5, (3, 3), 1), (2, 4, 6, 33, 4, (5, 3), (2, 1)), (1, 7, 4, 48, 9, (3, 5), (1, 2)),
    (1, 3, 5, 31, 2, (3, 3), 0), (1, 2, 4, 20, 3, (3, 3), 2), (1, 4, 3, 50, 17, (3, 3), 1),
    (1, 3, 2, 64, 8, (1, 3), (0, 1)), (1, 3, 5, 7, 4, (1, 1), 1), (1, 5, 3, 33, 6, (1, 3), (0, 4)),
]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", COLUMN_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5]}-p{c[6]}")
def test_cpu_stride1_columns(case, dtype):
    """The stride-1 forward and input gradient (vectorised along columns; the gradient's clamp
    keyed by integers) on the inputs that choose the gradient's shift: centred, all >= 2 (no
    shift), all negative and wide."""
    n, c, h, w, o, k, padding = case
    from addersr.ops import cpu
    weight = torch.randn(o, c, *k, dtype=torch.float64)
    for x in (torch.randn(n, c, h, w, dtype=torch.float64), torch.rand(n, c, h, w, dtype=torch.float64) + 2,
              -5 - 3 * torch.rand(n, c, h, w, dtype=torch.float64)):
        grad_out = torch.randn(_out_shape(x, weight, 1, padding), dtype=torch.float64)
        y_ref, gx_ref, _ = brute(x, weight, grad_out, 1, padding)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        y = cpu.forward(x.to(dtype), weight.to(dtype), (1, 1), _pair(padding))
        assert y.dtype == dtype and y.shape == y_ref.shape and rel(y, y_ref) < tol
        gx = cpu.grad_input(x.to(dtype), weight.to(dtype), grad_out.to(dtype), (1, 1), _pair(padding))
        assert gx.dtype == dtype and gx.shape == x.shape and rel(gx, gx_ref) < tol


@pytest.mark.skipif("cpu" not in BACKENDS, reason="numba is not installed")
@pytest.mark.parametrize("stride", [(1, 1), (2, 1)])
def test_cpu_input_gradient_non_finite(stride):
    """NaN weights take float keys (integer ones would drop the NaN): NaN exactly where the
    reference has it. A NaN or -inf input stays out of the shift (only its own pixel is hit)."""
    from addersr.ops import cpu
    x, weight = torch.randn(2, 5, 9, 19, dtype=torch.float64), torch.randn(6, 5, 3, 3, dtype=torch.float64)
    grad_out = torch.randn(_out_shape(x, weight, stride, 1), dtype=torch.float64)
    weight_nan = weight.clone()
    weight_nan[3, 2, 1, 0] = float("nan")
    _, gx_ref, _ = brute(x, weight_nan, grad_out, stride, 1)
    gx = cpu.grad_input(x, weight_nan, grad_out, stride, (1, 1))
    assert torch.isnan(gx_ref).any() and torch.equal(torch.isnan(gx), torch.isnan(gx_ref))
    ok = ~torch.isnan(gx_ref)
    assert torch.allclose(gx[ok], gx_ref[ok], rtol=1e-12, atol=1e-12)
    bad = x.clone()
    bad[1, 2, 4, 5], bad[0, 1, 3, 7] = float("nan"), -float("inf")
    _, gx_ref, _ = brute(bad.nan_to_num(neginf=0.0), weight, grad_out, stride, 1)
    gx = cpu.grad_input(bad, weight, grad_out, stride, (1, 1))
    assert torch.isnan(gx[1, 2, 4, 5]) and not torch.isfinite(gx[0, 1, 3, 7])
    hit = torch.zeros_like(bad, dtype=torch.bool)
    hit[1, 2, 4, 5] = hit[0, 1, 3, 7] = True
    assert torch.allclose(gx[~hit], gx_ref[~hit], rtol=1e-12, atol=1e-12)


_NARROW = """
import torch
from addersr.ops import cpu, cpu_ir, reference
assert cpu_ir.VECTOR_BYTES == 32 and cpu._COL_BLOCK == (2, 2) and cpu._FWD_BLOCK == (4, 2)
torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
for n, c, h, w, o, k, p in ((2, 5, 4, 15, 3, 3, 1), (1, 3, 5, 9, 6, 3, 0), (1, 4, 3, 21, 2, 5, 2)):
    for dt in (torch.float32, torch.float64):
        x, wt = torch.randn(n, c, h, w, dtype=dt), torch.randn(o, c, k, k, dtype=dt)
        g = torch.randn(n, o, h + 2 * p - k + 1, w + 2 * p - k + 1, dtype=dt)
        tol = 1e-5 if dt == torch.float32 else 1e-12
        y = reference.forward(x.double(), wt.double(), (1, 1), (p, p))
        assert rel(cpu.forward(x, wt, (1, 1), (p, p)), y) < tol, (n, c, h, w, dt)
        gx = reference.grad_input(x.double(), wt.double(), g.double(), (1, 1), (p, p))
        assert rel(cpu.grad_input(x, wt, g, (1, 1), (p, p)), gx) < tol, (n, c, h, w, dt)
print("ok")
"""


@pytest.mark.skipif("cpu" not in BACKENDS, reason="numba is not installed")
@pytest.mark.parametrize("cpu_name", ["haswell", "generic"])
def test_cpu_columns_without_avx512(cpu_name, tmp_path):
    """Where numba targets a CPU without AVX-512 the column kernels take 32-byte vectors and
    smaller blocks (AVX2's 16 registers; plain x86-64 splits them further), and stay exact."""
    env = {**os.environ, "NUMBA_CPU_NAME": cpu_name, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _NARROW], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
