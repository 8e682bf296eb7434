"""Adder models against their CNN twins, from the training records of the shipped weights.

    python benchmarks/twins.py                       # weights/ -> results/twins.md, docs/twins.png
    python benchmarks/twins.py --weights-dir DIR

Pairs every adder model in the folder with its twin (same model, architecture and scale,
``op`` conv) and tabulates what their JSONs record: iterations, training seconds (with
those of the parents they were started from), Set5 PSNR/SSIM at the end (bench protocol)
and the adder model's gap to its twin. The plot draws the Set5 validation curves of both
against the iteration, one panel per scale, with bicubic's score. Nothing is trained or
evaluated here except bicubic on Set5 (the shipped copy).
"""

import argparse
import json
import os
from pathlib import Path

from addersr import models
from addersr.eval import evaluate
from addersr.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
SET5 = ROOT / "addersr" / "assets" / "Set5"


def _set5(meta):
    return (meta.get("metrics") or {}).get("Set5")


def total_seconds(meta, folder):
    """Training seconds of these weights and of the parents they started from (a new run
    at another scale counts its parent's time; a continued run's own count includes it)."""
    seconds, parent = float(meta.get("seconds") or 0), meta.get("parent")
    while parent and not parent.get("continued"):
        seconds += float(parent.get("seconds") or 0)
        path = folder / (parent["weights"] + ".json")
        parent = json.loads(path.read_text()).get("parent") if path.is_file() else None
    return seconds


def pairs(folder):
    """``[(adder_name, adder_meta, twin_name or None, twin_meta or None)]`` by scale."""
    found = {path.stem: meta for path, meta in models.list_weights(folder)}
    twins = {models.twin_key(m): n for n, m in found.items() if m["op"] == "conv"}
    out = []
    for name, meta in sorted(found.items(), key=lambda kv: (int(kv[1]["scale"]), kv[0])):
        if meta["op"] == "adder":
            twin = twins.get(models.twin_key(meta))
            out.append((name, meta, twin, found.get(twin)))
    return out


def table(rows, folder, bicubic):
    head = ["scale", "model", "op", "iterations", "training (min)", "Set5 PSNR/SSIM",
            "vs bicubic", "adder - CNN"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, meta, twin, tmeta in rows:
        scale = int(meta["scale"])
        for n, m in ((name, meta), (twin, tmeta)):
            if m is None:
                continue
            s5 = _set5(m)
            score = f"{s5['psnr']:.2f}/{s5['ssim']:.4f}" if s5 else "-"
            gain = f"{s5['psnr'] - bicubic[scale]:+.2f}" if s5 else "-"
            gap = ""
            if m is meta and tmeta and s5 and _set5(tmeta):
                gap = f"{s5['psnr'] - _set5(tmeta)['psnr']:+.2f}"
            lines.append(f"| x{scale} | {n} | {'AdderSR' if m['op'] == 'adder' else 'CNN'} | "
                         f"{m.get('iterations', 0):,} | {total_seconds(m, folder) / 60:.1f} | "
                         f"{score} | {gain} | {gap} |")
    return "\n".join(lines)


def plot(rows, bicubic, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({int(m["scale"]) for _, m, _, _ in rows})
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4.5), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        for name, meta, twin, tmeta in rows:
            if int(meta["scale"]) != scale:
                continue
            for n, m, style in ((name, meta, dict(color="crimson", marker="o")),
                                (twin, tmeta, dict(color="black", ls="--", marker="s"))):
                curve = [v for v in (m or {}).get("validation") or [] if v.get("set", "Set5") == "Set5"]
                if curve:
                    ax.plot([v["iteration"] for v in curve], [v["psnr"] for v in curve],
                            ms=3, label=n, **style)
        ax.axhline(bicubic[scale], color="gray", ls=":", label="bicubic")
        ax.set_title(f"x{scale}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("Set5 PSNR (dB)")
    fig.suptitle("Shipped adder models and their CNN twins: Set5 during training")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    p.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "results" / "twins.md")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "twins.png")
    args = p.parse_args(argv)
    rows = pairs(args.weights_dir)
    if not rows:
        p.error(f"no adder weights in {args.weights_dir}")
    bicubic = {s: evaluate("bicubic", SET5, s, progress=False)["psnr"]
               for s in sorted({int(m["scale"]) for _, m, _, _ in rows})}
    text = table(rows, args.weights_dir, bicubic)
    devices = sorted({m.get("device", "?") for _, m, _, tm in rows for m in (m, tm) if m})
    md = (f"# Adder models and their CNN twins\n\n`python benchmarks/twins.py` (from the JSONs in "
          f"{args.weights_dir.name}/; trained on: {', '.join(devices)}). Training time includes the "
          f"parents a model started from. Set5 bicubic: "
          + ", ".join(f"x{s} {v:.2f}" for s, v in bicubic.items()) + f" dB. Plot: docs/{args.plot.name}."
          f"\n\n{text}\n")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.md, lambda f: f.write(md), mode="w")
    plot(rows, bicubic, args.plot)
    print(text)


if __name__ == "__main__":
    main()
