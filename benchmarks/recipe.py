"""Which training recipe lets adder networks learn as fast as their CNN twins?

    python benchmarks/recipe.py                      # every variant, ~2 min each on 2 CPU cores
    python benchmarks/recipe.py --only cnn paper     # some of them
    python benchmarks/recipe.py --steps 200          # a quicker, rougher look

Small twins, trained with ``python -m addersr.train`` (in this process) on the same data in
the same order: EDSR-baseline with 4 blocks of 32 features, x2, batch 16 of 24x24 LR
patches from T91, Adam, cosine from 2e-4 to 0, ``--steps`` steps, seed 0. Every variant is
evaluated on Set5 with the bench protocol after every quarter of the steps.

``paper`` is the adder network with AdderNet's and AdderSR's settings (N(0, 1) adder
weights, eta 0.2, BN momentum 0.1, learned power activations from 1, res_scale 0.1); the
first ablations change one thing of it (``from: paper``), the second group one thing of
``sgd``, AdderNet's own optimiser (SGD with momentum 0.9 and the adaptive rate, lr 0.01;
``from: sgd``). A variant whose training diverges is recorded as such. ``recipe`` is the
trainer's default adder recipe (``addersr.train.ADDER_RECIPE``; rerun when it changes).
``cnn`` is the CNN twin; the distillation variants use its exported weights as teacher. Results are kept in the JSON: a rerun skips the variants
already measured with the same arguments (``--rerun NAME`` forces one).

Writes ``benchmarks/results/recipe.{json,md}`` and the learning curves ``docs/recipe.png``.
"""

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from addersr import train
from addersr.device import describe as device_name
from addersr.nn import Adder2d
from addersr.eval import evaluate

ROOT = Path(__file__).resolve().parents[1]
# AdderNet / AdderSR as published: every adder option at its paper value.
PAPER = ["--eta", "0.2", "--adder-lr", "1", "--adder-init", "1", "--bn-momentum", "0.1",
         "--power-init", "1", "--power-learn", "yes", "--warmup", "0", "--clip-grad", "0"]

# AdderNet's own optimiser: SGD (momentum 0.9) with the adaptive rate, lr 0.01 for everything.
SGD = PAPER + ["--optimizer", "sgd", "--lr", "0.01"]

# name, base ("conv", "paper", "sgd" or "recipe": the trainer's defaults), extra arguments, what it tests
VARIANTS = [
    ("cnn", "conv", [], "CNN twin (published EDSR recipe)"),
    ("paper", "paper", [], "AdderNet/AdderSR settings under Adam"),
    ("adder-lr-10", "paper", ["--adder-lr", "10"], "adder weights at 10x the learning rate"),
    ("adder-lr-50", "paper", ["--adder-lr", "50"], "adder weights at 50x the learning rate"),
    ("adder-lr-200", "paper", ["--adder-lr", "200"], "adder weights at 200x the learning rate"),
    ("adder-lr-1000", "paper", ["--adder-lr", "1000"], "adder weights at 1000x the learning rate"),
    ("init-0.1", "paper", ["--adder-init", "0.1"], "adder weights start at N(0, 0.1^2)"),
    ("init-0.02", "paper", ["--adder-init", "0.02"], "adder weights start at N(0, 0.02^2)"),
    ("sgd", "paper", ["--optimizer", "sgd", "--lr", "0.01"],
     "AdderNet's own recipe: SGD (momentum 0.9, lr 0.01) with the adaptive rate"),
    ("sgd-lr-0.02", "sgd", ["--lr", "0.02"], "sgd, lr 0.02"),
    ("sgd-lr-0.04", "sgd", ["--lr", "0.04"], "sgd, lr 0.04"),
    ("sgd-lr-0.08", "sgd", ["--lr", "0.08"], "sgd, lr 0.08"),
    ("sgd-lr-0.16", "sgd", ["--lr", "0.16"], "sgd, lr 0.16"),
    ("sgd-lr-0.005", "sgd", ["--lr", "0.005"], "sgd, lr 0.005"),
    ("sgd-eta-0.1", "sgd", ["--eta", "0.1"], "sgd, adaptive rate eta 0.1"),
    ("sgd-eta-0.4", "sgd", ["--eta", "0.4"], "sgd, adaptive rate eta 0.4"),
    ("sgd-init-0.3", "sgd", ["--adder-init", "0.3"], "sgd, adder weights from N(0, 0.3^2)"),
    ("sgd-bn-0.01", "sgd", ["--bn-momentum", "0.01"], "sgd, BN momentum 0.01"),
    ("sgd-power-fixed", "sgd", ["--power-learn", "no"], "sgd, power exponents fixed at 1"),
    ("sgd-power-0.8", "sgd", ["--power-init", "0.8"], "sgd, power exponents start at 0.8"),
    ("sgd-res-1", "sgd", ["--arch", "n_blocks=4", "n_feats=32", "res_scale=1"], "sgd, res_scale 1 (the CNN's)"),
    ("sgd-warmup", "sgd", ["--warmup", "100"], "sgd, 100 steps of warm-up"),
    ("sgd-clip", "sgd", ["--clip-grad", "0.5"], "sgd, gradient norm clipped to 0.5"),
    ("sgd-distill", "sgd", ["--teacher", "{cnn}", "--distill", "1"], "sgd + output distillation from the CNN twin"),
    ("sgd-distill-feat", "sgd", ["--teacher", "{cnn}", "--distill", "1", "--distill-features", "1"],
     "sgd + output and block-feature distillation"),
    ("sgd-adam", "sgd", ["--optimizer", "sgd+adam", "--lr", "0.02", "--other-lr", "2e-4"],
     "sgd lr 0.02 for the adder weights, Adam 2e-4 (the CNN's) for the rest"),
    ("recipe", "recipe", [], "the trainer's default adder recipe (ADDER_RECIPE)"),
]


def _argv(name, base, extra, args, workdir):
    argv = ["--model", "edsr-baseline", "--scale", "2", "--arch", "n_blocks=4", "n_feats=32",
            "--op", "conv" if base == "conv" else "adder", "--data-root", str(args.data / "train"),
            "--train-sets", "T91", "--patch", "24", "--batch", "16", "--iters", str(args.steps),
            "--lr-schedule", "cosine", "--val-every", str(args.steps // 4),
            "--val-data", str(args.data / "benchmark" / "Set5"), "--ckpt-every", "0",
            "--workers", "0", "--device", "cpu", "--seed", "0", "--out", str(workdir / name)]
    if base != "recipe":  # the recipe row takes the trainer's learning rate too
        argv += ["--lr", "2e-4"]
    argv += {"paper": PAPER + ["--optimizer", "adam"], "sgd": SGD}.get(base, [])
    if name == "cnn":
        argv += ["--export", str(workdir / "cnn-teacher")]
    return argv + [a.replace("{cnn}", str(workdir / "cnn-teacher")) for a in extra]


def _machine():
    return f"{device_name('cpu')}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def active_fraction(model, lr):
    """Fraction of adder weights that sit inside the range of their inputs.

    For each weight ``w[o, c, i, j]`` the share ``p`` of the layer's input values of channel
    ``c`` (a training batch, batch-norm in training mode) that exceed it; the weight is
    active when 5% < p < 95%. Outside, ``|x - w|`` is linear in ``x`` over the data, so the
    weight acts as a fixed +-1 convolution tap. None for a network without adder layers.
    """
    model = copy.deepcopy(model).train()  # batch statistics; the caller's running ones stay
    adders = [m for m in model.modules() if isinstance(m, Adder2d)]
    if not adders:
        return None
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0])) for m in adders]
    model(lr)
    for h in hooks:
        h.remove()
    active = total = 0
    pick = torch.Generator().manual_seed(0)
    for m in adders:
        x = inputs[m]
        xs = x.transpose(0, 1).reshape(x.shape[1], -1)
        xs = xs[:, torch.randperm(xs.shape[1], generator=pick)[:4096]].sort(1).values.contiguous()
        w = m.weight.transpose(0, 1).reshape(x.shape[1], -1).contiguous()
        p = torch.searchsorted(xs, w) / xs.shape[1]
        active += int(((p > 0.05) & (p < 0.95)).sum())
        total += w.numel()
    return active / total


def run_variant(name, argv, log):
    """Train one variant; its Set5 curve, training seconds and final active fraction
    (``diverged``: the trainer's message, when the loss became NaN)."""
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            run = train.main(argv)
    except SystemExit as stop:  # the trainer stops a diverged run with a message
        if not str(stop.code).startswith("error:"):
            raise
        reason = str(stop.code).removeprefix("error: ").split(";")[0]  # no run folder in it
        return {"curve": [], "seconds": None, "active": None, "diverged": reason}
    lr = run.data[0][0].float().div(255)
    return {"curve": [{k: r[k] for k in ("iteration", "psnr", "ssim")} for r in run.history],
            "seconds": round(run.seconds, 1), "active": active_fraction(run.model, lr)}


def _first_batch(args):
    from addersr.data.patches import PatchBatches, load_training_images
    images, _ = load_training_images(args.data / "train", ["T91"])
    return PatchBatches(images, 2, 24, 16, seed=0)[0][0].float().div(255)


def _from_checkpoint(path):
    from addersr import models
    state = train.load_checkpoint(path)
    cfg = state["config"]
    model = models.build(cfg["model"], cfg["scale"], op=cfg["op"], **cfg["arch"])
    model.load_state_dict(state["model"])
    return model


def table(results, order, bicubic):
    """Markdown table of the measured variants, with the gap to the CNN twin."""
    cnn = results.get("cnn", {}).get("curve")
    rows = [r for r in order if r in results]
    steps = next(([p["iteration"] for p in results[r]["curve"]] for r in rows if results[r]["curve"]), [])
    head = (["variant", "what changes", "from"] + [f"{s} steps" for s in steps]
            + ["vs CNN", "active adder weights", "seconds"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in rows:
        r = results[name]
        if r.get("diverged"):
            lines.append("| " + " | ".join([name, r["note"], r["base"]] + ["diverged"] * len(steps)
                                            + ["", "", ""]) + " |")
            continue
        psnr = [p["psnr"] for p in r["curve"]]
        gap = f"{psnr[-1] - cnn[-1]['psnr']:+.2f}" if cnn and name != "cnn" else ""
        active = f"{r['active']:.0%}" if r.get("active") is not None else ""
        lines.append("| " + " | ".join([name, r["note"], r["base"]] + [f"{v:.2f}" for v in psnr]
                                        + [gap, active, f"{r['seconds']:.0f}"]) + " |")
    lines.append("| " + " | ".join(["bicubic", "", ""] + [f"{bicubic:.2f}"] * len(steps) + ["", "", ""]) + " |")
    return "\n".join(lines)


def plot(results, order, bicubic, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("AdderNet/AdderSR settings; step size and initial scale of the adder weights",
               lambda n, r: r["base"] in ("paper", "conv", "recipe")),
              ("SGD with AdderNet's adaptive rate (lr 0.01), one change each",
               lambda n, r: r["base"] in ("sgd", "conv", "recipe") or n == "sgd")]
    fig, axes = plt.subplots(1, 2, figsize=(16, 6), sharey=True, gridspec_kw={"wspace": 0.45})
    colors = plt.get_cmap("tab20").colors
    for ax, (title, keep) in zip(axes, groups):
        shown = 0
        for name in order:
            r = results.get(name)
            if r is None or not r["curve"] or not keep(name, r):
                continue
            xs = [p["iteration"] for p in r["curve"]]
            ys = [p["psnr"] for p in r["curve"]]
            if name == "cnn":
                style = dict(color="black", lw=2.5, ls="--")
            elif name == "recipe":
                style = dict(lw=3, color="crimson", marker="s")
            else:
                style = dict(lw=1.3, color=colors[shown % len(colors)])
                shown += 1
            ax.plot(xs, ys, **{"marker": "o", "ms": 3, "label": name, **style})
        ax.axhline(bicubic, color="gray", lw=1, ls=":", label="bicubic")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    axes[0].set_ylabel("Set5 PSNR (dB), x2")
    lows = [p["psnr"] for r in results.values() for p in r["curve"]]
    if lows:
        axes[0].set_ylim(max(min(lows) - 0.3, bicubic - 4), max(lows) + 0.3)
    fig.suptitle("Adder EDSR-baseline 4x32 vs its CNN twin, x2 (T91, batch 16 of 24x24, cosine schedule, "
                 "same data order)")
    save_figure(fig, path)


def save_figure(fig, path):
    """Write a matplotlib figure as PNG under a temporary name, then rename it; close it."""
    import matplotlib.pyplot as plt
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def study_args(argv, doc, name, unit, names):
    """Parse the options of a small-model study (this script, backbones.py): data, steps,
    which runs (``names``, each a ``unit``), where results, plot and run folders go."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--data", type=Path, default=os.environ.get("ADDERSR_DATA"),
                   help="folder holding train/ and benchmark/ (default $ADDERSR_DATA)")
    p.add_argument("--steps", type=int, default=800, help=f"training steps per {unit} (default 800)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"run only these {unit}s")
    p.add_argument("--rerun", nargs="+", default=[], metavar="NAME", help=f"measure these {unit}s again")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / f"{name}.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / f"{name}.png")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / name,
                   help=f"run folders (and the CNN teacher's weights) (default runs/{name})")
    args = p.parse_args(argv)
    if args.data is None or not (args.data / "train" / "T91").is_dir():
        p.error("pass --data FOLDER (holding train/T91 and benchmark/Set5) or set ADDERSR_DATA")
    if args.steps < 4 or args.steps % 4:
        p.error("--steps must be a positive multiple of 4")
    unknown = sorted(set((args.only or []) + args.rerun) - set(names))
    if unknown:
        p.error(f"unknown {unit}(s) {unknown}; available: {', '.join(names)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None):
    names = [v[0] for v in VARIANTS]
    args = study_args(argv, __doc__, "recipe", "variant", names)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    saved = _load(args.results)
    results = saved.get("variants", {}) if saved.get("steps") == args.steps else {}
    bicubic = evaluate("bicubic", args.data / "benchmark" / "Set5", 2, progress=False)["psnr"]
    log_path = args.workdir / "recipe.log"
    missing = [n for n, r in results.items() if "active" not in r and (args.workdir / n / "last.pt").is_file()]
    if missing:  # results of an older version of this script: measure from the final checkpoints
        lr = _first_batch(args)
        for name in missing:
            results[name]["active"] = active_fraction(_from_checkpoint(args.workdir / name / "last.pt"), lr)
    selected = set(args.only or names)
    rerun = set(args.rerun)
    needs_teacher = any("{cnn}" in " ".join(v[2]) for v in VARIANTS if v[0] in selected)
    if needs_teacher and not (args.workdir / "cnn-teacher.json").is_file():
        selected.add("cnn")  # the distillation variants need the CNN twin's weights
        rerun.add("cnn")
    for name, base, extra, note in VARIANTS:
        if name not in selected:
            continue
        argv_run = _argv(name, base, extra, args, args.workdir)
        shown = [a.replace(str(args.data), "$ADDERSR_DATA").replace(str(args.workdir), "runs/recipe")
                 for a in argv_run]
        defaults = dict(train.ADDER_RECIPE) if base == "recipe" else None
        old = results.get(name, {})
        if old.get("argv") == shown and old.get("defaults") == defaults and name not in rerun:
            continue
        print(f"{name}: {note} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with open(log_path, "a") as log:
            measured = run_variant(name, argv_run, log)
        results[name] = {**measured, "base": base, "note": note, "argv": shown, "defaults": defaults}
        curve = " ".join(f"{p['psnr']:.2f}" for p in measured["curve"])
        print(f"{name}: Set5 {curve} dB ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        _save(args, results, bicubic, names)
    _save(args, results, bicubic, names)
    print(table(results, names, bicubic))


def _save(args, results, bicubic, names):
    """Write the JSON, the Markdown table and the plot of what is measured so far."""
    doc = {"steps": args.steps, "machine": _machine(), "bicubic_set5": bicubic,
           "command": "python benchmarks/recipe.py", "variants": results}
    _write(args.results, json.dumps(doc, indent=1) + "\n")
    _write(args.results.with_suffix(".md"), _markdown(doc, names))
    if results:
        plot(results, names, bicubic, args.plot)


def _markdown(doc, names):
    return (f"# Adder training recipe: small twins on the CPU\n\n"
            f"`{doc['command']}` ({doc['steps']} steps per variant; {doc['machine']}).\n"
            f"Set5 PSNR (dB, x2, bench protocol) after each quarter of the steps. "
            f"Plot: docs/recipe.png.\n\n" + table(doc["variants"], names, doc["bicubic_set5"]) + "\n")


if __name__ == "__main__":
    main()
