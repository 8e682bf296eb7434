"""Does every backbone's default adder recipe keep up with its CNN twin? Small twins on the CPU.

    python benchmarks/backbones.py                  # every pair, 800 steps each
    python benchmarks/backbones.py --only vdsr-10x32 --steps 400

Each pair is one small backbone trained twice with ``python -m addersr.train`` (in this
process) and nothing but its defaults (the adder recipe of its backbone, the CNN twin's
published one), x2, on T91 in the same data order, a cosine schedule over ``--steps``
steps: a VDSR of reduced depth and width, an EDSR (res_scale 0.1) of reduced depth and
width, and the EDSR-baseline 4 x 32 of the shipped models. Set5 (bench protocol) after
every quarter of the steps. Results are kept in the JSON and a rerun skips the runs already
measured with the same arguments and defaults (``--rerun NAME`` forces one).

Writes ``benchmarks/results/backbones.{json,md}`` and ``docs/backbones.png``.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import _load, _machine, _write, run_variant, save_figure, study_args  # noqa: E402

from addersr import train  # noqa: E402
from addersr.eval import evaluate  # noqa: E402
from addersr.training import config  # noqa: E402

# name, model, architecture and data options (the defaults of the backbone otherwise)
PAIRS = [
    ("vdsr-10x32", "vdsr", ["--arch", "depth=10", "n_feats=32", "--batch", "16"]),
    ("edsr-8x32", "edsr", ["--arch", "n_blocks=8", "n_feats=32", "--patch", "24", "--batch", "16"]),
    ("edsr-baseline-4x32", "edsr-baseline", ["--arch", "n_blocks=4", "n_feats=32", "--patch", "24", "--batch", "16"]),
]


def _argv(model, extra, op, args, out):
    return ["--model", model, "--op", op, "--scale", "2", *extra, "--data-root", str(args.data / "train"),
            "--train-sets", "T91", "--iters", str(args.steps), "--lr-schedule", "cosine",
            "--val-every", str(args.steps // 4), "--val-data", str(args.data / "benchmark" / "Set5"),
            "--ckpt-every", "0", "--workers", "0", "--device", "cpu", "--seed", "0", "--out", str(out)]


def _defaults(model, op):
    """The recipe the run takes from the trainer (what a rerun must match)."""
    args = train.parse_args(["--model", model, "--op", op, "--scale", "2"])
    cfg = config.resolve({k: v for k, v in vars(args).items() if k not in ("parser", "resume")})
    return {k: cfg[k] for k in config.RECIPE_KEYS if k in cfg and cfg[k] is not None
            and k not in ("iters", "patch", "batch", "train_sets", "seed", "teacher")}


def table(results, bicubic):
    """Markdown: each pair's Set5 curve for adder and CNN and the gap at the end."""
    steps = next(([p["iteration"] for p in r["curve"]] for r in results.values() if r.get("curve")), [])
    lines = ["| backbone | op | recipe | " + " | ".join(f"{s} steps" for s in steps)
             + " | adder - CNN | seconds | machine |", "|" + " --- |" * (6 + len(steps))]
    for name, model, _ in PAIRS:
        for op in ("adder", "conv"):
            r = results.get(f"{name}-{op}")
            if r is None:
                continue
            recipe = r["defaults"]["optimizer"] + f" {r['defaults']['lr']:g}"
            if r.get("diverged"):
                lines.append(f"| {name} | {op} | {recipe} | " + " | ".join(["diverged"] * len(steps))
                             + f" | | | {r.get('machine', '')} |")
                continue
            psnr = [p["psnr"] for p in r["curve"]]
            twin = results.get(f"{name}-conv", {}).get("curve")
            gap = f"{psnr[-1] - twin[-1]['psnr']:+.2f}" if op == "adder" and twin else ""
            lines.append(f"| {name} | {op} | {recipe} | " + " | ".join(f"{v:.2f}" for v in psnr)
                         + f" | {gap} | {r['seconds']:.0f} | {r.get('machine', '')} |")
    lines.append("| bicubic | | | " + " | ".join(f"{bicubic:.2f}" for _ in steps) + " | | | |")
    return "\n".join(lines)


def plot(results, bicubic, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PAIRS), figsize=(5 * len(PAIRS), 4), sharey=True)
    for ax, (name, _, _) in zip(axes, PAIRS):
        for op, style in (("adder", dict(color="crimson", marker="s")), ("conv", dict(color="black", ls="--", marker="o"))):
            r = results.get(f"{name}-{op}")
            if r and r.get("curve"):
                ax.plot([p["iteration"] for p in r["curve"]], [p["psnr"] for p in r["curve"]],
                        label="AdderSR" if op == "adder" else "CNN twin", **style)
        ax.axhline(bicubic, color="gray", ls=":", label="bicubic")
        ax.set_title(name + ", x2")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("Set5 PSNR (dB)")
    fig.suptitle("Default recipes, adder vs CNN twin (T91, cosine, same data order)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    names = [name for name, _, _ in PAIRS]
    args = study_args(argv, __doc__, "backbones", "pair", names)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    saved = _load(args.results)
    results = saved.get("runs", {}) if saved.get("steps") == args.steps else {}
    for r in results.values():  # runs kept from an earlier file were measured on its machine
        r.setdefault("machine", saved.get("machine"))
    bicubic = evaluate("bicubic", args.data / "benchmark" / "Set5", 2, progress=False)["psnr"]
    for name, model, extra in PAIRS:
        if name not in (args.only or names):
            continue
        for op in ("conv", "adder"):
            key = f"{name}-{op}"
            run_argv = _argv(model, extra, op, args, args.workdir / key)
            shown = [a.replace(str(args.data), "$ADDERSR_DATA").replace(str(args.workdir), "runs/backbones")
                     for a in run_argv]
            old, defaults = results.get(key, {}), _defaults(model, op)
            if old.get("argv") == shown and old.get("defaults") == defaults and name not in args.rerun:
                continue
            print(f"{key} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            with open(args.workdir / "backbones.log", "a") as log:
                measured = run_variant(key, run_argv, log)
            results[key] = {**measured, "argv": shown, "defaults": defaults, "machine": _machine()}
            curve = " ".join(f"{q['psnr']:.2f}" for q in measured["curve"]) or measured.get("diverged")
            print(f"{key}: Set5 {curve} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            _save(args, results, bicubic)
    _save(args, results, bicubic)
    print(table(results, bicubic))


def _save(args, results, bicubic):
    doc = {"steps": args.steps, "machine": _machine(), "bicubic_set5": bicubic,
           "command": "python benchmarks/backbones.py", "runs": results}
    _write(args.results, json.dumps(doc, indent=1) + "\n")
    _write(args.results.with_suffix(".md"),
           f"# Every backbone's default recipe: adder vs CNN twin, small models on the CPU\n\n"
           f"`{doc['command']}` ({args.steps} steps per run; each row names the machine that ran it, "
           f"whose seconds are not comparable with another's). Set5 PSNR (dB, x2, "
           f"bench protocol) after each quarter of the steps. Plot: docs/backbones.png.\n\n"
           + table(results, bicubic) + "\n")
    if results:
        plot(results, bicubic, args.plot)


if __name__ == "__main__":
    main()
