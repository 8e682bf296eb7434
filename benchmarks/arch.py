"""Which adder network size trains best on this machine in a fixed time?

    python benchmarks/arch.py                   # every size, --budget seconds each (~25 min in all)
    python benchmarks/arch.py --budget 600      # longer runs
    python benchmarks/arch.py --only edsr-4x32  # some of them

Each candidate is an AdderSR network from the registry, trained by ``python -m
addersr.train`` (in this process) with the trainer's default adder recipe, as the shipped
CPU models: x2, T91 + BSD200, batch 16 of 24x24 LR patches, cosine schedule to 0, seed 0.
Its number of steps is set so that training takes ``--budget`` seconds: the time per step
is measured first, as the difference between a 10-step and a 40-step run (the first steps
pay for compilation). Set5 PSNR (bench protocol) at the end. Candidates already measured
with the same arguments are skipped (``--rerun NAME`` forces one).

Writes ``benchmarks/results/arch.{json,md}``.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from addersr import train
from addersr.device import describe as device_name
from addersr.eval import evaluate
from addersr.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]

# name, registry model, architecture overrides
CANDIDATES = [
    ("edsr-2x32", "edsr-baseline", {"n_blocks": 2, "n_feats": 32}),
    ("edsr-4x32", "edsr-baseline", {"n_blocks": 4, "n_feats": 32}),
    ("edsr-8x32", "edsr-baseline", {"n_blocks": 8, "n_feats": 32}),
    ("edsr-4x48", "edsr-baseline", {"n_blocks": 4, "n_feats": 48}),
    ("vdsr-8x32", "vdsr", {"depth": 8, "n_feats": 32}),
]


def _argv(model, arch, iters, args, out):
    """The trainer's command line for one run of ``iters`` steps."""
    return (["--model", model, "--scale", "2", "--op", "adder", "--arch"]
            + [f"{k}={v}" for k, v in arch.items()]
            + ["--data-root", str(args.data / "train"), "--train-sets", *args.train_sets,
               "--patch", "24", "--batch", "16",
               "--iters", str(iters), "--lr-schedule", "cosine", "--val-every", str(iters),
               "--val-data", str(args.data / "benchmark" / "Set5"), "--ckpt-every", "0",
               "--workers", "0", "--device", "cpu", "--seed", "0", "--out", str(out)])


def _train(argv, log):
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return train.main(argv)


def seconds_per_step(model, arch, args, out, log):
    """Training seconds per step after the first ones: (t(40 steps) - t(10 steps)) / 30, or
    t(40 steps) / 40 when the 10-step run took longer (it compiled the kernels: cold cache)."""
    short = _train(_argv(model, arch, 10, args, out), log).seconds
    long = _train(_argv(model, arch, 40, args, out), log).seconds
    return (long - short) / 30 if long > short else long / 40


def measure(model, arch, args, out, log):
    """Calibrate, then train for about ``args.budget`` seconds; the row of the table."""
    per_step = seconds_per_step(model, arch, args, out, log)
    iters = max(4, int(args.budget / per_step) // 4 * 4)
    run = _train(_argv(model, arch, iters, args, out), log)
    final = run.history[-1]
    return {"model": model, "arch": arch, "params": sum(p.numel() for p in run.model.parameters()),
            "seconds_per_step": round(per_step, 4), "steps": iters, "seconds": round(run.seconds, 1),
            "psnr": final["psnr"], "ssim": final["ssim"], "budget": args.budget}


def table(results, bicubic):
    head = ["network", "parameters", "s / step", "steps", "training s", "Set5 PSNR", "SSIM", "vs bicubic"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, _, _ in CANDIDATES:
        r = results.get(name)
        if r is None:
            continue
        lines.append(f"| {name} | {r['params']:,} | {r['seconds_per_step']:.3f} | {r['steps']:,} | "
                     f"{r['seconds']:.0f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr'] - bicubic:+.2f} |")
    return "\n".join(lines)


def _save(path, doc):
    atomic_write(path, lambda f: f.write(json.dumps(doc, indent=1) + "\n"), mode="w")
    md = (f"# Adder network sizes at equal training time\n\n`{doc['command']} --budget "
          f"{doc['budget']:g}` ({doc['machine']}). x2, default adder recipe, "
          f"{' + '.join(doc['train_sets'])}, batch 16 of 24x24, cosine schedule over the steps "
          f"that fit the budget; Set5 PSNR (dB, bench protocol) at the end of each run; bicubic "
          f"{doc['bicubic_set5']:.2f} dB.\n\n" + table(doc["candidates"], doc["bicubic_set5"]) + "\n")
    atomic_write(path.with_suffix(".md"), lambda f: f.write(md), mode="w")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=os.environ.get("ADDERSR_DATA"),
                   help="folder holding train/ and benchmark/ (default $ADDERSR_DATA)")
    p.add_argument("--train-sets", nargs="+", default=["T91", "BSD200"], help="default T91 BSD200")
    p.add_argument("--budget", type=float, default=240, help="training seconds per size (default 240)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="measure only these sizes")
    p.add_argument("--rerun", nargs="+", default=[], metavar="NAME", help="measure these again")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "arch.json")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "arch", help="run folders and log")
    args = p.parse_args(argv)
    if args.data is None or not (args.data / "train" / "T91").is_dir():
        p.error("pass --data FOLDER (holding train/ and benchmark/Set5) or set ADDERSR_DATA")
    if args.budget <= 0:
        p.error("--budget must be positive")
    names = [c[0] for c in CANDIDATES]
    unknown = sorted(set((args.only or []) + args.rerun) - set(names))
    if unknown:
        p.error(f"unknown size(s) {unknown}; available: {', '.join(names)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    try:
        saved = json.loads(args.results.read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    same = saved.get("budget") == args.budget and saved.get("train_sets") == args.train_sets
    results = saved.get("candidates", {}) if same else {}
    bicubic = evaluate("bicubic", args.data / "benchmark" / "Set5", 2, progress=False)["psnr"]
    doc = {"budget": args.budget, "machine": f"{device_name('cpu')}, {torch.get_num_threads()} threads, "
           f"torch {torch.__version__}", "bicubic_set5": bicubic, "command": "python benchmarks/arch.py",
           "train_sets": args.train_sets, "candidates": results}
    for name, model, arch in CANDIDATES:
        if (args.only and name not in args.only) or (name in results and name not in args.rerun):
            continue
        print(f"{name}: measuring ...", file=sys.stderr, flush=True)
        with open(args.workdir / "arch.log", "a") as log:
            results[name] = measure(model, arch, args, args.workdir / name, log)
        r = results[name]
        print(f"{name}: {r['steps']} steps in {r['seconds']:.0f} s, Set5 {r['psnr']:.2f} dB",
              file=sys.stderr, flush=True)
        _save(args.results, doc)
    _save(args.results, doc)
    print(table(results, bicubic))


if __name__ == "__main__":
    main()
