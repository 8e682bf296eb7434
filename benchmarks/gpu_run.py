"""One prepared GPU session: tests, every kernel variant, the train step, then training.

    PYTHONPATH=. python benchmarks/gpu_run.py OUT --minutes 10 --data-root data/train
    python benchmarks/gpu_run.py OUT --dry-run     # CPU, tiny shapes, Triton interpreter

In order: prints the device; runs the CUDA tests (pytest on tests/test_triton.py and
tests/test_fused.py); times the forward and input-gradient kernels of every Triton variant
(``addersr.ops.triton_kernels.VARIANTS``: first call = compile, then the median) on
16x64x48x48 with 64 filters, against the limit of DESIGN.md 1; times the training step of
adder EDSR-baseline x2 and its CNN twin (fused layer and eager layer); then spends what is
left of ``--minutes`` continuing ``--init`` weights with ``python -m addersr.train
--time-limit``. Writes at most 7 files to OUT: report.md, tests.log, kernels.json, train.log
and the exported weights (NAME.safetensors, NAME.json). Training needs ``--data-root``
(a folder of training sets, e.g. T91/ and BSD200/); without it that stage is skipped.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_LIMIT = 16.7e12  # DESIGN.md 1: H100/H200 fp32 adds / 2 per adder op


def _sh(cmd, log, timeout, env=None):
    """Run ``cmd``, append its output to ``log``; returns (exit code, seconds)."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1), cwd=ROOT,
                                env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - start


def run_tests(out, dry, budget):
    if dry:
        select = ["tests/test_triton.py", "tests/test_fused.py", "-k",
                  "variant_rule or (matches_eager and cpu-triton and shape0 and train)"]
    else:
        select = ["tests/test_triton.py", "tests/test_fused.py", "-k", "cuda or variant_rule"]
    rc, secs = _sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select],
                   out / "tests.log", budget)
    tail = (out / "tests.log").read_text().strip().splitlines()[-1:]
    return f"pytest exit {rc} in {secs:.0f} s: {tail[0] if tail else ''}"


def _timer(device):
    """Median seconds of ``fn``: Triton's event timer on a GPU, the wall clock on the CPU."""
    def timed(fn, reps):
        if device.type == "cuda":
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=max(reps, 50), return_mode="median") / 1e3
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return timed


def time_variants(device, shape, dry):
    """{variant: {pass: {first_s, s, Tops}}} for the Triton forward and input gradient."""
    import torch

    from addersr.ops import triton_kernels as tk

    n, c, h, w, o = shape
    x = torch.randn(n, c, h, w, device=device)
    wt = torch.randn(o, c, 3, 3, device=device)
    g = torch.randn(n, o, h, w, device=device)
    ops = n * o * c * 9 * h * w
    timed = _timer(device)
    rows = {}
    for name in tk.VARIANTS:
        rows[name] = {}
        for kind, fn in (("forward", lambda v=name: tk.forward(x, wt, (1, 1), (1, 1), variant=v)),
                         ("grad_input", lambda v=name: tk.grad_input(x, wt, g, (1, 1), (1, 1), variant=v))):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - start
            secs = timed(fn, 1 if dry else 20)
            rows[name][kind] = {"first_s": first, "s": secs, "Tops": ops / secs / 1e12}
    rows["rule"] = tk.choose_variant(n * h * w, o, dry)
    return rows


def time_steps(device, dry):
    """Train step and forward (ms) of adder EDSR-baseline x2 (fused and eager) and its CNN twin."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    import torch.nn.functional as F

    from addersr.models import build
    from addersr.nn import rescale_adder_grads
    from train_step import _median_time

    batch, patch, steps = (1, 6, 1) if dry else (16, 48, 10)
    arch = {"n_blocks": 1, "n_feats": 8} if dry else {}
    results = {}
    for label, op, fused in (("CNN", "conv", "1"), ("adder fused", "adder", "1"), ("adder eager", "adder", "0")):
        os.environ["ADDERSR_FUSED"] = fused
        torch.manual_seed(0)
        model = build("edsr-baseline", 2, op, backend="triton", **arch).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        lr = torch.rand(batch, 3, patch, patch, device=device)
        hr = torch.rand(batch, 3, 2 * patch, 2 * patch, device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            F.l1_loss(model(lr), hr).backward()
            if op == "adder":
                rescale_adder_grads(model)
            opt.step()

        train = _median_time(step, device, steps, 0 if dry else 2)
        model.eval()
        with torch.no_grad():
            infer = _median_time(lambda: model(lr), device, steps, 0 if dry else 1)
        results[label] = {"train_ms": train * 1e3, "forward_ms": infer * 1e3}
    os.environ.pop("ADDERSR_FUSED")
    return results, f"batch {batch} of {patch}x{patch}" + (f", {arch}" if arch else "")


def train_chunk(out, args, minutes, device):
    """Continue ``--init`` for ``minutes`` and export into OUT; returns a one-line summary."""
    if args.data_root is None:
        return "skipped: no --data-root"
    from addersr.models import load

    meta = load(args.init).meta
    name = Path(args.init).name.removesuffix(".safetensors") + "-gpu"
    sets = [p.name for p in Path(args.data_root).iterdir() if p.is_dir()]
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_run_"))
    cmd = [sys.executable, "-m", "addersr.train", "--init", args.init, "--data-root", args.data_root,
           "--train-sets", *sets, "--iters", str(meta["iterations"] + (2 if args.dry_run else args.extra_iters)),
           "--time-limit", f"{minutes:.3f}", "--out", str(run_dir), "--export", str(out / name),
           "--device", device.type, "--val-every", "0"]
    if args.dry_run:
        cmd += ["--patch", "6", "--batch", "2", "--workers", "0"]
    rc, secs = _sh(cmd, out / "train.log", minutes * 60 + 300)
    return f"exit {rc} after {secs:.0f} s; exported {name}.safetensors" if rc == 0 else f"exit {rc}, see train.log"


def report(out, device_text, tests, variants, shape, steps, steps_shape, training):
    lines = ["# GPU run", "", f"Device: {device_text}", "", f"Tests: {tests}", "",
             f"## Kernel variants, {'x'.join(map(str, shape[:4]))}, {shape[4]} filters 3x3 "
             f"(rule picks `{variants['rule']}`)", "",
             "| variant | fwd first call s | fwd T op/s | fwd of limit | grad first call s | grad T op/s "
             "| grad of limit |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in variants.items():
        if name == "rule":
            continue
        f, g = r["forward"], r["grad_input"]
        lines.append(f"| {name} | {f['first_s']:.2f} | {f['Tops']:.3g} | {f['Tops'] * 1e12 / GPU_LIMIT:.0%} | "
                     f"{g['first_s']:.2f} | {g['Tops']:.3g} | {g['Tops'] * 1e12 / GPU_LIMIT:.0%} |")
    cnn = steps["CNN"]
    lines += ["", f"## Training step, EDSR-baseline x2, {steps_shape}", "",
              "| network | train step ms | forward ms | / CNN (train) | / CNN (forward) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for label, r in steps.items():
        lines.append(f"| {label} | {r['train_ms']:.1f} | {r['forward_ms']:.1f} | "
                     f"{r['train_ms'] / cnn['train_ms']:.2f}x | {r['forward_ms'] / cnn['forward_ms']:.2f}x |")
    lines += ["", f"Training chunk: {training}", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    (out / "kernels.json").write_text(json.dumps({"variants": variants, "steps": steps}, indent=1))
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=9.0, help="total wall time (default 9)")
    parser.add_argument("--init", default="edsr-small-x2-adder-cpu", help="exported weights to continue")
    parser.add_argument("--data-root", default=None, help="folder of training sets (e.g. T91/, BSD200/)")
    parser.add_argument("--extra-iters", type=int, default=100000, help="iterations past --init's count")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    args = parser.parse_args(argv)
    deadline = time.time() + args.minutes * 60
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from addersr.device import hardware

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_run: no CUDA device (use --dry-run on the CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    device_text = f"{hardware(device)}, torch {torch.__version__}"
    print(device_text, flush=True)
    tests = run_tests(args.out, args.dry_run, 180 if args.dry_run else 0.25 * (deadline - time.time()))
    print(tests, flush=True)
    shape = (1, 8, 6, 7, 8) if args.dry_run else (16, 64, 48, 48, 64)
    phase = time.time()
    variants = time_variants(device, shape, args.dry_run)
    print(f"kernel variants timed in {time.time() - phase:.0f} s", flush=True)
    phase = time.time()
    steps, steps_shape = time_steps(device, args.dry_run)
    print(f"train steps timed in {time.time() - phase:.0f} s", flush=True)
    minutes = max(0.05, (deadline - time.time()) / 60 - 1.0)  # a minute for validation and export
    training = train_chunk(args.out, args, minutes, device)
    report(args.out, device_text, tests, variants, shape, steps, steps_shape, training)


if __name__ == "__main__":
    main()
