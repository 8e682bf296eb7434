"""Why a recipe diverges: gradient and update norms of each kind of parameter over the first steps.

    python benchmarks/diverge.py --data-root DATA/train [--steps 12]

For each case (a backbone at its real depth, trained as ``python -m addersr.train`` would
with the options given) the script makes real training steps (:meth:`Trainer.step`, the
trainer's own) on T91 patches and records, per step and per kind of parameter (head conv,
adder weights, batch norms, power exponents, hidden convs, tail / upsampler convs): the
gradient norm as backward left it (before clipping and the adaptive-rate rescale), the
update norm relative to the weight norm, the largest power exponent and the largest
activation entering the tail. It stops a case at its first non-finite loss. Writes
``benchmarks/results/diverge.{md,json}`` and ``docs/diverge.png``.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from addersr import models, train
from addersr.data.patches import PatchBatches, load_training_images
from addersr.device import hardware
from addersr.files import atomic_write
from addersr.nn import Adder2d, PowerActivation
from addersr.training import config, optim
from addersr.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
# (label, command-line options): each backbone at its real depth, under the old single adder
# recipe (plain SGD at 0.08 for every parameter) and under its default recipe
CASES = [
    ("vdsr 20x64 x2, SGD 0.08 for all (old default)",
     "--model vdsr --scale 2 --batch 4 --optimizer sgd --lr 0.08 --bn-init 1"),
    ("vdsr 20x64 x2, default recipe", "--model vdsr --scale 2 --batch 4"),
    ("edsr 32x256 x4, SGD 0.08 for all (old default)",
     "--model edsr --scale 4 --batch 2 --patch 12 --optimizer sgd --lr 0.08"),
    ("edsr 32x256 x4, default recipe", "--model edsr --scale 4 --batch 2 --patch 12"),
    ("edsr-baseline 4x32 x2, default recipe (the shipped models)",
     "--model edsr-baseline --scale 2 --arch n_blocks=4 n_feats=32 --batch 16 --patch 24"),
]
KINDS = ("head", "adder", "bn", "power", "conv", "tail")


def kind(name, module):
    """The kind of a parameter, by the module that holds it and its place in the network."""
    if isinstance(module, Adder2d):
        return "adder"
    if isinstance(module, torch.nn.BatchNorm2d):
        return "bn"
    if isinstance(module, PowerActivation):
        return "power"
    top = name.split(".")[0]
    return top if top in ("head", "tail") else "conv"


def _parts(options, data_root, images):
    args = train.parse_args(options.split() + ["--data-root", str(data_root), "--train-sets", "T91",
                                               "--val-every", "0", "--device", "cpu", "--workers", "0"])
    cfg = config.resolve({k: v for k, v in vars(args).items() if k not in ("parser", "resume")})
    config.check(cfg)
    torch.manual_seed(cfg["seed"])
    model = models.build(cfg["model"], cfg["scale"], op=cfg["op"], **cfg["arch"])
    optim.apply_adder_options(model, cfg, fresh=True)
    optimizer = optim.build_optimizer(model, cfg)
    data = PatchBatches(images, cfg["scale"], cfg["patch"], cfg["batch"], seed=cfg["seed"], length=10 ** 6)
    trainer = Trainer(cfg, model=model, net=model, optimizer=optimizer,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), data=data, distiller=None,
                      writer=None, val_folder=None, rank=0, world=1, device=torch.device("cpu"))
    return cfg, model, trainer


def run_case(options, data_root, images, steps):
    """Per-step records of one case (see the module docstring)."""
    cfg, model, trainer = _parts(options, data_root, images)
    owner = {id(p): kind(f"{mod_name}.{n}", mod) for mod_name, mod in model.named_modules()
             for n, p in mod.named_parameters(recurse=False)}
    params = [(owner[id(p)], p) for p in model.parameters()]
    grads = {}
    for k, p in params:
        p.register_hook(lambda g, k=k: grads.__setitem__(k, grads.get(k, 0.0) + float(g.double().pow(2).sum())))
    tail_input = {}
    tail = model.tail[0] if isinstance(model.tail, torch.nn.Sequential) else model.tail
    tail.register_forward_hook(lambda m, inp, out: tail_input.__setitem__("max", float(inp[0].detach().abs().max())))
    records = []
    for i in range(steps):
        lr_u8, hr_u8 = trainer.data[i]
        before = [p.detach().clone() for _, p in params]
        grads.clear()
        loss = float(trainer.step(lr_u8, hr_u8))
        trainer.iteration += 1
        update, weight = {}, {}
        for (k, p), old in zip(params, before):
            update[k] = update.get(k, 0.0) + float((p.detach() - old).double().pow(2).sum())
            weight[k] = weight.get(k, 0.0) + float(old.double().pow(2).sum())
        alphas = [float(m.alpha.detach()) for m in model.modules() if isinstance(m, PowerActivation)]
        records.append({"step": i + 1, "loss": loss, "tail_input_max": tail_input.get("max"),
                        "alpha_max": max(alphas) if alphas else None,
                        "grad": {k: math.sqrt(v) for k, v in grads.items()},
                        "update": {k: math.sqrt(update[k] / weight[k]) if weight[k] else None for k in update}})
        if not math.isfinite(loss):
            break
    return cfg, records


def _fmt(value):
    return "-" if value is None else ("nan" if not math.isfinite(value) else f"{value:.3g}")


def report(results, machine, steps):
    lines = ["# First steps of each backbone: gradient and update norms", "",
             f"`python benchmarks/diverge.py --steps {steps}` on {machine}. Grad: the norm of the "
             "gradient of each kind of parameter as backward left it (before clipping and the "
             "adaptive rate); upd: the norm of the step it took, relative to the norm of those "
             "weights before it. tail in: largest activation entering the tail (or upsampler) "
             "conv. A case stops at its first non-finite loss.", ""]
    for label, cfg, records in results:
        kinds = [k for k in KINDS if any(k in r["grad"] for r in records)]
        lines += [f"## {label}", "",
                  f"optimizer {cfg['optimizer']}, lr {cfg['lr']}"
                  + (f", other lr {cfg['other_lr']}" if cfg.get("other_lr") else "")
                  + f", batch {cfg['batch']} of {cfg['patch']} px, "
                  + ("diverged at step %d" % records[-1]["step"] if not math.isfinite(records[-1]["loss"])
                     else f"finite for {len(records)} steps"), "",
                  "| step | loss | " + " | ".join(f"grad {k} | upd {k}" for k in kinds)
                  + " | max alpha | tail in |",
                  "|" + "---|" * (4 + 2 * len(kinds))]
        for r in records:
            lines.append(f"| {r['step']} | {_fmt(r['loss'])} | "
                         + " | ".join(f"{_fmt(r['grad'].get(k))} | {_fmt(r['update'].get(k))}" for k in kinds)
                         + f" | {_fmt(r['alpha_max'])} | {_fmt(r['tail_input_max'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, _, records in results:
        steps = [r["step"] for r in records]
        axes[0].semilogy(steps, [r["loss"] for r in records], marker=".", label=label)
        axes[1].semilogy(steps, [r["update"].get("tail") or float("nan") for r in records], marker=".")
        axes[2].plot(steps, [r["alpha_max"] or float("nan") for r in records], marker=".")
    for ax, title, top in zip(axes, ("training loss (L1)", "tail step / tail weights", "largest power exponent"),
                              (1e3, 1e2, 2.0)):
        ax.set_title(title + " (off the top: diverged)")
        ax.set_xlabel("step")
        ax.set_ylim(top=top)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", help="folder holding T91/ (required unless --replot)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--cases", nargs="+", type=int, help="indices into CASES (default all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diverge"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "diverge.png"))
    p.add_argument("--replot", action="store_true", help="only redraw the plot from the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        doc = json.loads(out.with_suffix(".json").read_text())
        plot([(c["label"], None, c["records"]) for c in doc["cases"]], args.plot)
        return
    if not args.data_root:
        p.error("--data-root is required")
    torch.set_num_threads(1)
    images, _ = load_training_images(args.data_root, ["T91"])
    results = []
    for i in args.cases or range(len(CASES)):
        label, options = CASES[i]
        start = time.perf_counter()
        cfg, records = run_case(options, args.data_root, images, args.steps)
        print(f"{label}: {len(records)} steps, last loss {records[-1]['loss']:.4g}, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        results.append((label, cfg, records))
    machine = f"{hardware('cpu')}, torch {torch.__version__}"
    doc = {"machine": machine, "cases": [{"label": lab, "options": dict(CASES)[lab], "records": rec}
                                         for lab, _, rec in results]}
    atomic_write(out.with_suffix(".md"), lambda f: f.write(report(results, machine, args.steps) + "\n"), "w")
    atomic_write(out.with_suffix(".json"), lambda f: json.dump(doc, f, indent=1), "w")
    plot(results, args.plot)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
