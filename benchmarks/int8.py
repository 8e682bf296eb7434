"""8-bit adder inference on the CPU against fp32 adders, conv2d and PyTorch's own int8 CNN.

    python benchmarks/int8.py                    # -> benchmarks/results/int8_cpu.md / .json
    python benchmarks/int8.py --threads 1 --out int8_cpu_1thread
    python benchmarks/int8.py --psnr Set5 Set14 B100 Urban100   # -> results/int8_psnr.md / .json

Layers (3x3, stride 1, padding 1, as many filters as channels): the uint8 SAD kernel
(``addersr.ops.sad``: each variant the CPU has, bare and with the fused AdderSR epilogue
requantising into the next layer's input), the fp32 adder kernel (``adder2d``, backend
cpu, whole call) and ``F.conv2d`` (fp32, NCHW and channels_last), in G adder ops/s or
G MAC/s. Whole models on square RGB inputs: the int8 adder model (``precision="int8"``),
the fp32 adder model, its fp32 CNN twin and that twin quantised by PyTorch's post-training
static quantisation (FX graph mode, x86 backend, calibrated on the same T91 images as the
adder model; MeanShift stays fp32), with their Set5 PSNR. Every measurement is the median
of ``--repeat`` runs (layers: ``--layer-repeat``, as sub-millisecond calls are noisier),
the methods interleaved so that load changes hit them alike; the
load average is recorded before and after. Other processes on a shared machine make the
figures noisy: rerun on a quiet one.
"""

import os

# Two OpenMP runtimes (numba's and torch's): idle threads spin briefly, then sleep. Long
# spins steal the other runtime's cores; no spin (OMP_WAIT_POLICY=PASSIVE) makes every
# call wake a halted vCPU first (sub-millisecond kernels 1.5-2x slower and noisy on the
# 2-core Zen 5 VM). Must be set before numba and torch are imported.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")
os.environ.setdefault("KMP_BLOCKTIME", "0")
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from addersr import models, quant  # noqa: E402
from addersr.device import hardware  # noqa: E402
from addersr.eval import evaluate  # noqa: E402
from addersr.files import atomic_write  # noqa: E402
from addersr.memory import keep_freed_memory  # noqa: E402
from addersr.ops import adder2d, sad  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adder_op import clock_ghz, fp32_lanes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAYERS = [(32, 128), (64, 96)]


def per_cycle():
    """Ops (conv2d: MACs) per core and cycle at the ports' limit, by method: vpsadbw 2 per
    cycle (``benchmarks/port_limits.c``: 2.00-2.08 zmm per cycle on the 2-core Zen 5 EPYC),
    of 64 bytes where 512-bit vectors run at full rate (``fp32_lanes``), else of 32; an fp32
    adder op is 2 adds on 2 pipes of fp32 lanes; conv2d 2 FMA pipes."""
    lanes = fp32_lanes()
    return {"avx512": 128 if lanes == 16 else 64, "vpsadbw": 64, "portable": 64,
            "adder": lanes, "conv2d": 2 * lanes}


PER_CYCLE = per_cycle()


def _cpu():
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return (f"{hardware('cpu')}, family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
            f"{info.get('cpu MHz', '?')} MHz, SAD variants {sad.variants()}")


def _interleaved(fns, repeat, settle=0):
    """{name: median seconds}: ``fns`` run in turn ``repeat`` times after one warm-up each;
    each timed call follows ``settle`` untimed calls of the same function, which absorb the
    previous one's runtime: torch's and numba's OpenMP threads each spin after a call, and
    the other runtime's sub-millisecond kernel that starts meanwhile shares the cores."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            for _ in range(settle):
                f()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _limit(method, threads, ghz):
    """G ops/s at the port limit for ``method`` (None for methods without one)."""
    key = next((k for k in PER_CYCLE if k in method), None)
    return None if key is None else PER_CYCLE[key] * ghz * threads


def layer_rows(repeat, threads, ghz):
    rng = np.random.default_rng(0)
    rows = []
    for c, hw in LAYERS:
        cp = sad.padded_channels(c, 3)
        xq = rng.integers(0, 256, (1, hw + 2, hw + 2, cp)).astype(np.uint8)
        wq = rng.integers(0, 256, (c, 3, 3, cp)).astype(np.uint8)
        alpha, beta = np.full(c, -1e-4, np.float32), np.zeros(c, np.float32)
        qout = np.zeros_like(xq)
        x, w = torch.randn(1, c, hw, hw), torch.randn(c, c, 3, 3)
        xcl = x.contiguous(memory_format=torch.channels_last)
        packed = {v: sad.pack_filters(wq, v) for v in sad.variants()}  # as a loaded model has them
        fns = {f"uint8 SAD {v}": (lambda v=v: sad.sad2d(xq, packed[v])) for v in sad.variants()}
        fns[f"uint8 fused layer ({sad.default_variant()})"] = lambda: sad.adder_layer(
            xq, packed[sad.default_variant()], alpha, beta, 0.01, 0.4, True, qout=qout, s_out=0.01, z_out=0)
        fns["fp32 adder kernel (adder2d cpu)"] = lambda: adder2d(x, w, padding=1, backend="cpu")
        fns["F.conv2d fp32 NCHW (MAC/s)"] = lambda: F.conv2d(x, w, padding=1)
        fns["F.conv2d fp32 channels_last (MAC/s)"] = lambda: F.conv2d(xcl, w, padding=1)
        with torch.no_grad():
            med = _interleaved(fns, repeat, settle=1)
        ops = c * c * 9 * hw * hw
        base = med["fp32 adder kernel (adder2d cpu)"]
        conv = med["F.conv2d fp32 NCHW (MAC/s)"]
        for k, t in med.items():
            limit = _limit(k, threads, ghz)
            rows.append({"layer": f"1x{c}x{hw}x{hw}", "method": k, "ms": t * 1e3, "gops": ops / t / 1e9,
                         "limit_gops": limit, "vs_fp32_adder": base / t, "vs_conv2d": conv / t})
    return rows


class _Core(torch.nn.Module):
    """EDSR between its mean shifts (what PyTorch's quantisation converts)."""

    def __init__(self, m):
        super().__init__()
        self.head, self.body, self.tail = m.head, m.body, m.tail

    def forward(self, x):
        h = self.head(x)
        return self.tail(h + self.body(h))


class TorchInt8CNN(torch.nn.Module):
    """The CNN twin after PyTorch PTQ (FX, x86 backend); mean shifts in fp32."""

    def __init__(self, cnn, images):
        import warnings
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        from addersr.data.patches import make_lr_images
        super().__init__()
        torch.backends.quantized.engine = "x86"
        self.sub_mean, self.add_mean, self.scale = cnn.sub_mean, cnn.add_mean, cnn.scale
        lrs = [torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float() / 255
               for lr in make_lr_images(images, cnn.scale)[1]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            core = prepare_fx(_Core(cnn).eval(), get_default_qconfig_mapping("x86"), (lrs[0],))
            with torch.no_grad():
                for lr in lrs:
                    core(self.sub_mean(lr))
            self.core = convert_fx(core)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # for eval's device probe

    @torch.no_grad()
    def forward(self, x):
        return self.add_mean(self.core(self.sub_mean(x)))


def model_rows(scales, sizes, repeat, set5):
    images, _ = quant.calibration_images()
    rows = []
    for s in scales:
        nets = {"int8 adder (ours)": models.load(f"edsr-small-x{s}-adder-cpu", precision="int8"),
                "fp32 adder": models.load(f"edsr-small-x{s}-adder-cpu"),
                "fp32 CNN twin": models.load(f"edsr-small-x{s}-conv-cpu")}
        nets["int8 CNN twin (torch PTQ x86)"] = TorchInt8CNN(nets["fp32 CNN twin"], images)
        scores = {k: evaluate(m, set5, s, progress=False)["psnr"] for k, m in nets.items()} if set5 else {}
        for size in sizes:
            x = torch.rand(1, 3, size, size)
            with torch.no_grad():
                med = _interleaved({k: (lambda m=m: m(x)) for k, m in nets.items()}, repeat)
            cnn = med["fp32 CNN twin"]
            for k, t in med.items():
                rows.append({"scale": s, "input": f"{size}x{size}", "model": k, "ms": t * 1e3,
                             "vs_fp32_cnn": cnn / t, "set5_psnr": scores.get(k)})
    return rows


def _md_layers(rows):
    out = ["| layer | method | ms | G op/s (conv: G MAC/s) | share of port limit | x fp32 adder | x conv2d NCHW |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['layer']} | {r['method']} | {r['ms']:.2f} | {r['gops']:.1f} | "
            + (f"{r['gops'] / r['limit_gops']:.0%} of {r['limit_gops']:.0f} | " if r["limit_gops"] else "- | ")
            + f"{r['vs_fp32_adder']:.2f} | {r['vs_conv2d']:.2f} |" for r in rows]
    return "\n".join(out)


def _md_models(rows):
    out = ["| scale | input | model | ms | speed vs fp32 CNN | Set5 PSNR |", "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| x{r['scale']} | {r['input']} | {r['model']} | {r['ms']:.1f} | {r['vs_fp32_cnn']:.2f}x | "
            + (f"{r['set5_psnr']:.3f} |" if r["set5_psnr"] is not None else "- |") for r in rows]
    return "\n".join(out)


def psnr_table(sets, data_root, names=None):
    """PSNR/SSIM of the shipped adder models ``names`` (default all) in fp32 and int8 on ``sets``,
    at every scale their calibration covers (multi-scale VDSR: each trained scale)."""
    from addersr.data import dataset_root
    root = dataset_root(data_root)
    rows = []
    for path, meta in models.list_weights():
        name = path.with_suffix("").name
        if meta["op"] != "adder" or (names and name not in names):
            continue
        for scale in models.load(name, precision="int8").int8_scales:
            nets = {"fp32": models.load(name, scale=scale), "int8": models.load(name, precision="int8", scale=scale)}
            for ds in sets:
                r = {p: evaluate(m, root / ds, scale, progress=False) for p, m in nets.items()}
                rows.append({"weights": name, "scale": scale, "set": ds,
                             **{f"{p}_{k}": r[p][k] for p in r for k in ("psnr", "ssim")}})
                print(rows[-1], flush=True)
    return rows


def _row_key(r):
    """(weights, scale, set); rows of runs before multi-scale weights name no scale: their weights'."""
    scale = r.get("scale") or models.read(r["weights"])[0]["scale"]
    return r["weights"], scale, r["set"]


def psnr_main(args, machine, argv):
    """Score, merge with the rows already in results/OUT.json (same weights, scale and set:
    replaced), and write the table of all of them."""
    stem = args.out if args.out != "int8_cpu" else "int8_psnr"
    t0 = time.time()
    rows = psnr_table(args.psnr, args.data_root, args.psnr_weights)
    path = RESULTS / f"{stem}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    for r in old:
        r["scale"] = _row_key(r)[1]
    new_keys = {_row_key(r) for r in rows}
    order = ("Set5", "Set14", "B100", "Urban100")
    rows = sorted([r for r in old if _row_key(r) not in new_keys] + rows,
                  key=lambda r: (r["weights"], r["scale"], order.index(r["set"]) if r["set"] in order else 9))
    lines = ["| weights | scale | set | fp32 PSNR/SSIM | int8 PSNR/SSIM | int8 - fp32 (dB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['weights']} | x{r['scale']} | {r['set']} | {r['fp32_psnr']:.3f}/{r['fp32_ssim']:.4f} | "
              f"{r['int8_psnr']:.3f}/{r['int8_ssim']:.4f} | {r['int8_psnr'] - r['fp32_psnr']:+.4f} |" for r in rows]
    md = (f"# 8-bit adder models against fp32: PSNR/SSIM (Y channel, bench protocol)\n\n"
          f"`python benchmarks/int8.py {' '.join(argv or sys.argv[1:])}` on {machine} (the rows of other "
          f"weights are merged from earlier runs, on the machines this file's history names); "
          f"int8 calibrated on 8 T91 images (weights/NAME.int8.json). Last run "
          f"{time.time() - t0:.0f} s.\n\n" + "\n".join(lines) + "\n")
    _write(stem, md, {"machine": machine, "rows": rows})
    print(md)


def _write(stem, md, data):
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS / f"{stem}.md", lambda f: f.write(md), mode="w")
    atomic_write(RESULTS / f"{stem}.json", lambda f: f.write(json.dumps(data, indent=2) + "\n"), mode="w")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch and numba threads (default 2)")
    p.add_argument("--repeat", type=int, default=5, help="runs per model (default 5)")
    p.add_argument("--layer-repeat", type=int, default=15, help="runs per layer (default 15)")
    p.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--no-layers", action="store_true")
    p.add_argument("--no-models", action="store_true")
    p.add_argument("--no-set5", action="store_true", help="skip the models' Set5 PSNR")
    p.add_argument("--psnr", nargs="+", metavar="SET", help="only the int8-vs-fp32 PSNR table on these sets")
    p.add_argument("--psnr-weights", nargs="+", metavar="NAME", help="with --psnr: only these weights")
    p.add_argument("--data-root", help="benchmark sets folder (default $ADDERSR_DATA/benchmark)")
    p.add_argument("--out", default="int8_cpu", help="results/OUT.md and .json (default int8_cpu)")
    args = p.parse_args(argv)
    if not args.no_models and not os.environ.get("ADDERSR_DATA"):
        p.error("the int8 CNN twin is calibrated on T91: set ADDERSR_DATA (a folder holding train/T91)")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    machine = _cpu()
    if args.psnr:
        psnr_main(args, machine, argv)
        return
    load0 = os.getloadavg()
    ghz, clock = clock_ghz()
    layers = [] if args.no_layers else layer_rows(args.layer_repeat, args.threads, ghz)
    set5 = None if args.no_set5 else ROOT / "addersr" / "assets" / "Set5"
    nets = [] if args.no_models else model_rows(args.scales, args.sizes, args.repeat, set5)
    load1 = os.getloadavg()
    head = (f"# 8-bit adder inference on the CPU\n\n`python benchmarks/int8.py {' '.join(argv or sys.argv[1:])}`"
            f"\n\nMachine: {machine}; {args.threads} threads (torch and numba {numba.threading_layer()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}, GOMP_SPINCOUNT="
            f"{os.environ.get('GOMP_SPINCOUNT', '-')}); torch {torch.__version__}, numba "
            f"{numba.__version__}. Medians of {args.repeat} interleaved runs "
            f"({args.layer_repeat} for layers, each timed call after an untimed one of the same "
            f"method). Load average (1 min) "
            f"{load0[0]:.1f} before, {load1[0]:.1f} after, on {os.cpu_count()} cores"
            + (": the machine was shared, figures are noisy." if max(load0[0], load1[0]) > 0.5 else ".") + "\n")
    md = head
    if layers:
        md += (f"\n## Layers (3x3, padding 1, C -> C)\n\nPort limits per core and cycle: {PER_CYCLE} "
               f"at {clock} (benchmarks/int8.py, per_cycle).\n\n{_md_layers(layers)}\n")
    if nets:
        md += f"\n## Whole models (weights/edsr-small-xN-*-cpu)\n\n{_md_models(nets)}\n"
    _write(args.out, md, {"machine": machine, "threads": args.threads, "repeat": args.repeat, "layer_repeat": args.layer_repeat,
                            "load_before": load0, "load_after": load1, "layers": layers, "models": nets})
    print(md)


if __name__ == "__main__":
    keep_freed_memory()  # many large passes: keep their memory instead of faulting it in again
    main()
