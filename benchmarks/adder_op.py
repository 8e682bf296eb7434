"""Throughput of the adder operator: AdderNet's unfold code, torch.cdist, ours, and conv2d.

    python benchmarks/adder_op.py                  # CPU shapes -> benchmarks/results/adder_op_cpu.md
    python benchmarks/adder_op.py --device cuda    # GPU shapes -> benchmarks/results/adder_op_cuda.md
    python benchmarks/adder_op.py --shapes 1x64x96x96:64 2x32x40x40:16 --repeat 5 --out /tmp/t.md

A shape is NxCxHxW:O (O filters of 3x3, stride 1, padding 1). For every shape and method
it times the forward pass, the input gradient and a full training step (forward + input
and weight gradients) in G adder-op/s (one op = one subtraction and one accumulation;
N*O*C*9*H*W ops per pass, a training step counts three passes), or G MAC/s for conv2d.
Methods: ``unfold`` is AdderNet's official algorithm (patches unfolded and an
O x C*k*k x N*H*W difference tensor materialised; skipped with a note when it would need
more than 40% of the free memory); ``cdist`` is torch.cdist(p=1) over unfolded patches
(its autograd gradients are sign-based, not AdderNet's rules; timed as they are); ``ours`` is
``addersr.ops.adder2d`` with the default backend. Each (shape, method) runs in its own
subprocess; peak memory is the rise of the resident set (CPU, /proc VmHWM) or of
allocated GPU memory during one call. Times are the best of at least ``--repeat`` runs;
fast methods keep running for ``--min-seconds``, slow baselines stop after 10 s. Ratios
compare measurements of the same run; other processes on the machine make single
numbers noisy, so check ``uptime`` first.
"""

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input



def measured_ghz():
    """The clock this core runs at now, from a chain of dependent one-cycle integer ops
    (add, then xor; the shift beside them is off the chain): under a hypervisor
    /proc/cpuinfo gives the nominal clock, and turbo can be far above it (3.9-4.0 against
    2.6 GHz on the 2-core Zen 5 EPYC). None without numba."""
    try:
        import numpy as np
        from numba import njit
    except ImportError:
        return None

    @njit(cache=False)
    def chain(a, n):
        x = np.int64(1)
        for i in range(n):
            x = (x + a[i & 7]) ^ (x >> 7)
        return x

    a, n = np.arange(8, dtype=np.int64), 50_000_000
    chain(a, 10)
    best = min(_seconds(lambda: chain(a, n)) for _ in range(3))
    return 2 * n / best / 1e9


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fp32_lanes():
    """fp32 lanes per vector add at full rate: 16 where the CPU adds 512-bit vectors at full
    rate (Intel CPUs with AVX-512: ports 0 and 5 of Sapphire / Emerald Rapids; AMD Zen 5
    server and desktop parts, family 26, models 0x00-0x1f and 0x40-0x4f), 8 with AVX2 (also
    Zen 4 and mobile Zen 5, whose AVX-512 splits into 256-bit halves), else 4."""
    flags, vendor, family, model = set(), "", 0, 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(value.split())
                elif key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "cpu family" and not family:
                    family = int(value)
                elif key == "model" and not model:
                    model = int(value)
    except OSError:
        pass
    full_512 = vendor == "GenuineIntel" or (vendor == "AuthenticAMD" and family == 26
                                            and (model < 0x20 or 0x40 <= model < 0x50))
    return 16 if "avx512f" in flags and full_512 else 8 if "avx2" in flags else 4


def clock_ghz():
    """(GHz, how): :func:`measured_ghz`, else /proc/cpuinfo's "cpu MHz" (under a hypervisor
    the nominal clock), else 2.0."""
    mhz = 0.0
    try:
        with open("/proc/cpuinfo") as f:
            mhz = next((float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")), 0.0)
    except OSError:
        pass
    measured = measured_ghz()
    ghz = measured or (mhz or 2000.0) / 1e3
    how = f"{ghz:.2f} GHz measured" + (f" (nominal {mhz / 1e3:.2f})" if mhz else "") if measured \
        else f"{ghz:.2f} GHz nominal"
    return ghz, how


def cpu_limit():
    """This CPU's fp32 limit in adder ops/s, and how it was computed.

    2 vector add pipes x fp32 lanes (:func:`fp32_lanes`) x clock (:func:`clock_ghz`, turbo
    included) x cores / 2 adds per adder op (DESIGN.md 1): the rate of an adder op done
    with fp32 adds. Cores: the CPUs this process may use. The stride-1 kernels move work off
    the add pipes, so they can pass it: per adder op the forward issues sub, and, fma (the
    fma adds |d| * 1 on the FMA pipes), the input gradient integer max, min (any vector
    pipe) and an fma; ``benchmarks/port_limits.c`` measures what those mixes peak at.
    """
    lanes = fp32_lanes()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ghz, clock = clock_ghz()
    limit = 2 * lanes * ghz * 1e9 * cores / 2
    how = (f"2 add pipes x {lanes} fp32 lanes x {clock} x {cores} cores / 2 adds per op; the kernels "
           "move the accumulation to the FMA pipes and the input gradient's clamp to integer ones, "
           "so they can pass it")
    return limit, how


GPU_LIMIT = 16.7e12  # DESIGN.md 1: H100 fp32 67 TFLOP/s / 2 adds per op
DEFAULT_SHAPES = {"cpu": ["1x64x96x96:64", "16x64x48x48:64", "1x256x48x48:256"],
                  "cuda": ["16x64x48x48:64", "16x256x48x48:256", "64x64x41x41:64"]}
PASSES = ("forward", "grad_input", "train_step")
SLOW = {"unfold", "cdist"}
K, STRIDE, PAD = 3, 1, 1


def parse_shape(text):
    try:
        dims, o = text.split(":")
        n, c, h, w = (int(v) for v in dims.lower().split("x"))
        return n, c, h, w, int(o)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxCxHxW:O, e.g. 1x64x96x96:64") from None


# --- AdderNet's official algorithm (huawei-noah/AdderNet adder.py), rewritten ---------------
# (its weight gradient's adaptive-rate scaling, a negligible cost, is left out)

def _unfold_cols(x):
    """(C*k*k, L*N) patches, laid out as the official code does."""
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(1, n * c, h, w), K, padding=PAD, stride=STRIDE)
    return cols.reshape(n, c * K * K, -1).permute(1, 2, 0).contiguous().reshape(c * K * K, -1)


def _out_hw(x):
    return [(s + 2 * PAD - K) // STRIDE + 1 for s in x.shape[2:]]


def unfold_forward(x, w):
    ho, wo = _out_hw(x)
    out = -(w.reshape(w.shape[0], -1).unsqueeze(2) - _unfold_cols(x).unsqueeze(0)).abs().sum(1)
    return out.reshape(w.shape[0], ho, wo, x.shape[0]).permute(3, 0, 1, 2).contiguous()


def _unfold_grads(x, w, g, want_x=True, want_w=True):
    xcol, wcol = _unfold_cols(x), w.reshape(w.shape[0], -1)
    gcol = g.permute(1, 2, 3, 0).reshape(g.shape[1], -1)
    gx = gw = None
    if want_w:
        gw = ((xcol.unsqueeze(0) - wcol.unsqueeze(2)) * gcol.unsqueeze(1)).sum(2).reshape(w.shape)
    if want_x:
        gxcol = (-(xcol.unsqueeze(0) - wcol.unsqueeze(2)).clamp(-1, 1) * gcol.unsqueeze(1)).sum(0)
        n, c, h, wd = x.shape
        gxcol = gxcol.reshape(c * K * K, -1, n).permute(2, 0, 1).reshape(1, n * c * K * K, -1)
        gx = F.fold(gxcol, (h, wd), K, padding=PAD, stride=STRIDE).reshape(x.shape)
    return gx, gw


def unfold_grad_input(x, w, g):
    return _unfold_grads(x, w, g, want_w=False)[0]


def unfold_train_step(x, w, g):
    unfold_forward(x, w)
    return _unfold_grads(x, w, g)


def unfold_bytes(n, c, h, w, o):
    """Peak of the official code: two (O, C*k*k, N*L) fp32 temporaries (difference and abs)."""
    return 2 * o * c * K * K * n * h * w * 4


# --- torch.cdist(p=1) over unfolded patches -------------------------------------------------

def cdist_forward(x, w):
    ho, wo = _out_hw(x)
    cols = F.unfold(x, K, padding=PAD, stride=STRIDE).transpose(1, 2)  # (N, L, C*k*k)
    y = -torch.cdist(cols, w.reshape(1, w.shape[0], -1), p=1)  # (N, L, O)
    return y.transpose(1, 2).reshape(x.shape[0], w.shape[0], ho, wo)


# --- the methods: forward, input gradient, training step ------------------------------------

def make_method(name, x, w, g):
    """Three closures (forward, grad_input, train_step) for ``name`` on these tensors."""
    if name == "unfold":
        return (lambda: unfold_forward(x, w), lambda: unfold_grad_input(x, w, g),
                lambda: unfold_train_step(x, w, g))
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

    def train(fn):
        def step():
            xg.grad = wg.grad = None
            fn(xg, wg).backward(g)
        return step

    if name == "cdist":
        graph = cdist_forward(xg, w)
        return (lambda: cdist_forward(x, w),
                lambda: torch.autograd.grad(graph, xg, g, retain_graph=True),
                train(cdist_forward))
    if name == "ours":
        from addersr.ops import adder2d, get_backend, resolve_backend

        backend = get_backend(resolve_backend(x.device))
        return (lambda: adder2d(x, w, padding=PAD),
                lambda: backend.grad_input(x, w, g, (STRIDE, STRIDE), (PAD, PAD)),
                train(lambda a, b: adder2d(a, b, padding=PAD)))
    if name.startswith("conv2d"):
        return (lambda: F.conv2d(x, w, padding=PAD),
                lambda: conv2d_input(x.shape, w, g, padding=PAD),
                train(lambda a, b: F.conv2d(a, b, padding=PAD)))
    raise ValueError(f"unknown method {name!r}")


def methods_for(device):
    return ["unfold", "cdist", "ours"] + (["conv2d", "conv2d_tf32"] if device == "cuda" else ["conv2d"])


# --- measuring ------------------------------------------------------------------------------

class Meter:
    """Wall time (synchronised on CUDA) and the peak memory rise of one call."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn):
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def peak(self, fn):
        """Run after the timings: on the CPU it changes how glibc allocates."""
        if self.cuda:
            self.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            self.sync()
            return torch.cuda.max_memory_allocated() - base
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: freed blocks of 64 KiB+ leave the resident set
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _proc_kb("/proc/self/status", "VmRSS")
        fn()
        return (_proc_kb("/proc/self/status", "VmHWM") - base) * 1024


def free_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return _proc_kb("/proc/meminfo", "MemAvailable") * 1024


def _proc_kb(path, key):
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from {path}")


def worker(spec):
    """Measure one (shape, method) and return a dict pass -> {seconds, peak_bytes}."""
    device, method, shape, repeat = spec["device"], spec["method"], spec["shape"], spec["repeat"]
    n, c, h, w, o = shape
    if method == "unfold" and unfold_bytes(*shape) > 0.4 * free_bytes(device):
        return {"skipped": f"needs ~{unfold_bytes(*shape) / 2**30:.1f} GiB, more than 40% of the "
                           f"{free_bytes(device) / 2**30:.1f} GiB free"}
    torch.backends.cudnn.allow_tf32 = method == "conv2d_tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(device)
    wt = torch.randn(o, c, K, K, generator=gen).to(device)
    g = torch.randn(n, o, *_out_hw(x), generator=gen).to(device)
    meter = Meter(device)
    result, fns = {}, dict(zip(PASSES, make_method(method, x, wt, g)))
    for name, fn in fns.items():
        meter.time(fn)  # warm-up (and compilation)
        times, start = [], time.perf_counter()
        while len(times) < repeat or (method not in SLOW and time.perf_counter() - start < spec["min_seconds"]
                                      and len(times) < 50 * repeat):
            times.append(meter.time(fn))
            if method in SLOW and time.perf_counter() - start > 10:
                break
        result[name] = {"seconds": min(times), "runs": len(times)}
    for name, fn in fns.items():  # after every timing: measuring the peak changes how glibc allocates
        result[name]["peak_bytes"] = meter.peak(fn)
    return result


def sanity_check(device):
    """All adder methods agree with each other on a small shape before anything is timed."""
    from addersr.ops import adder2d

    x, w = torch.randn(2, 5, 7, 6, device=device), torch.randn(4, 5, K, K, device=device)
    exact = unfold_forward(x.double(), w.double())
    for name, y in (("ours", adder2d(x, w, padding=PAD)), ("unfold", unfold_forward(x, w)),
                    ("cdist", cdist_forward(x, w))):
        if (y.double() - exact).norm() > 1e-5 * exact.norm():
            raise SystemExit(f"sanity check failed: {name} disagrees with the float64 unfold result")


# --- report ---------------------------------------------------------------------------------

def machine(device):
    from addersr.device import hardware

    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}"]
    if device == "cuda":
        lines.append(f"- GPU: {hardware(device)}")
    lines.append(f"- CPU: {hardware('cpu')}, torch threads {torch.get_num_threads()}")
    try:
        import numba

        lines.append(f"- numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads")
    except ImportError:
        pass
    with open("/proc/loadavg") as f:
        lines.append(f"- load average at the start: {f.read().split()[0]}")
    return lines


def report(device, shapes, results, repeat, min_seconds, limit, how):
    unit = "T" if device == "cuda" else "G"
    scale = 1e12 if device == "cuda" else 1e9
    out = [f"# Adder operator throughput ({device})", "", *machine(device), "",
           f"3x3 filters, stride 1, padding 1; best of at least {repeat} runs (fast methods: of "
           f"{min_seconds:g} s of runs; unfold and cdist: of at most 10 s of runs). "
           f"{unit} op/s = adder ops per second (conv2d rows: MAC/s); a training step counts 3 passes. "
           f"Limit: {limit / scale:.3g} {unit} op/s ({how}). Peak = memory rise during one call.", ""]
    for shape in shapes:
        n, c, h, w, o = shape
        ops = n * o * c * K * K * h * w
        out += [f"## {n}x{c}x{h}x{w}, {o} filters ({ops / 1e9:.2f} G ops per pass)", "",
                f"| method | pass | ms | {unit} op/s | of limit | this / ours (time) | peak MiB |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        res = results[shape]
        notes = []
        for method, passes in res.items():
            if "skipped" in passes:
                notes.append(f"- {method}: skipped, {passes['skipped']}")
                continue
            if "error" in passes:
                notes.append(f"- {method}: failed, {passes['error']}")
                continue
            for name in PASSES:
                m = passes[name]
                count = ops * (3 if name == "train_step" else 1)
                rate = count / m["seconds"]
                ours = res.get("ours", {}).get(name)
                ratio = f"{m['seconds'] / ours['seconds']:.1f}x" if ours and method != "ours" else ""
                frac = f"{rate / limit:.0%}" if not method.startswith("conv2d") else ""
                out.append(f"| {method} | {name} | {m['seconds'] * 1e3:.1f} | {rate / scale:.3g} | {frac} | "
                           f"{ratio} | {m['peak_bytes'] / 2**20:.0f} |")
        out += [""] + notes + ([""] if notes else [])
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="NxCxHxW:O, e.g. 1x64x96x96:64")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per pass (at least)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="keep timing fast methods this long: the best run of a longer window "
                             "is less disturbed by other processes")
    parser.add_argument("--methods", nargs="+", help="subset of unfold, cdist, ours, conv2d(_tf32)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES[args.device]]
    methods = args.methods or methods_for(args.device)
    out = args.out or Path(__file__).parent / "results" / f"adder_op_{args.device}.md"
    sanity_check(args.device)
    limit, how = (GPU_LIMIT, "DESIGN.md 1") if args.device == "cuda" else cpu_limit()  # before the load
    results = {}
    for shape in shapes:
        results[shape] = {}
        for method in methods:
            spec = {"device": args.device, "method": method, "shape": shape, "repeat": args.repeat,
                    "min_seconds": args.min_seconds}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                  capture_output=True, text=True)
            if proc.returncode:
                err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                results[shape][method] = {"error": err}
            else:
                results[shape][method] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{'x'.join(map(str, shape[:4]))}:{shape[4]} {method}: {results[shape][method]}", flush=True)
    text = report(args.device, shapes, results, args.repeat, args.min_seconds, limit, how)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
