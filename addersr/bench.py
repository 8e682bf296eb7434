"""Benchmark super-resolution on the standard test sets: ``python -m addersr.bench``.

Scores bicubic, a registry model (randomly initialised: a smoke test) or trained weights
(multi-scale VDSR weights at each scale they were trained for) with the protocol of :mod:`addersr.eval` on every dataset folder of the data root, and
prints a markdown table laid out like the AdderSR paper's (rows scale x model x method,
cells PSNR/SSIM on Y). ``--json`` / ``--csv`` / ``--md`` write the results to files.

Examples::

    python -m addersr.bench --model bicubic --data-root ../shared/datasets/benchmark
    python -m addersr.bench --weights edsr-baseline-adder-x2 --datasets Set5 Set14
    python -m addersr.bench                       # every weights file shipped in weights/
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .device import DeviceError, describe, resolve
from .data import dataset_root, find_datasets, list_images
from .data.datasets import BENCHMARK_SETS
from .eval import evaluate, load_images, unscorable
from .files import OutputError, atomic_write, prepare_output_dir
from .memory import keep_freed_memory
from .inference import check_tile
from . import signals

FIELDS = ("model", "op", "weights", "dataset", "scale", "images", "unreadable", "too_small", "psnr", "ssim",
          "lpips", "seconds_per_image", "params", "mults", "adds", "energy_mj")
METHOD = {None: "-", "conv": "CNN", "adder": "AdderNet"}
TABLE_SIZE = (720, 1280)  # output size for the table's operation and energy columns


class Job:
    """One thing to evaluate: bicubic, a registry model or a weights file (``loaded``: its
    network for each of ``scales``)."""

    def __init__(self, model, op, scales, weights=None, loaded=None):
        self.model, self.op, self.scales, self.weights = model, op, list(scales), weights
        self._loaded = loaded
        self._built = {}

    @property
    def label(self):
        if self.weights:
            return self.weights
        return self.model if self.op is None else f"{self.model}-{self.op}"

    def network(self, scale):
        """The network for ``scale`` ("bicubic" for the baseline), built once."""
        if self.model == "bicubic":
            return "bicubic"
        if self._loaded is not None:
            return self._loaded[scale]
        if scale not in self._built:
            from .models import build
            torch.manual_seed(0)
            self._built[scale] = build(self.model, scale, self.op)
        return self._built[scale]


def _costs(network, out_size):
    """params, mults, adds, energy (mJ) of ``network`` for one output of ``out_size``."""
    if network == "bicubic":
        return {"params": None, "mults": None, "adds": None, "energy_mj": None}
    from .energy import count_ops
    ops = count_ops(network, out_size=out_size)
    return {"params": sum(p.numel() for p in network.parameters()), "mults": ops["mults"],
            "adds": ops["adds"], "energy_mj": ops["energy_pj"] / 1e9}


def _stem_name(source):
    name = Path(source).name
    for suffix in (".safetensors", ".json"):
        name = name.removesuffix(suffix)
    return name


def _jobs(args, parser, device):
    scales = args.scales or [2, 3, 4]
    if args.model:
        if args.model == "bicubic":
            return [Job("bicubic", None, scales)]
        from .models import MODELS
        if args.model not in MODELS:
            parser.error(f"unknown --model {args.model!r}; choose bicubic or one of {sorted(MODELS)}")
        print(f"note: {args.model} ({args.op}) is randomly initialised: a smoke test, "
              "not a trained result", file=sys.stderr)
        return [Job(args.model, args.op, scales)]
    from .models import list_weights, load, trained_scales
    if args.weights:
        sources = args.weights
    else:
        sources = [str(path.with_suffix("")) for path, meta in list_weights()
                   if args.precision == "fp32" or meta["op"] == "adder"]
        if not sources:
            print("note: no weights shipped in weights/; evaluating bicubic", file=sys.stderr)
            return [Job("bicubic", None, scales)]
    jobs = []
    for source in sources:
        try:
            network = load(source, device=device, precision=args.precision)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        # every scale the weights were trained for (int8: those its calibration covers)
        served = [s for s in trained_scales(network.meta) if (not args.scales or s in args.scales)
                  and (args.precision == "fp32" or s in network.int8_scales)]
        if not served:
            continue
        loaded = {s: network if s == network.scale else load(source, device=device, scale=s,
                                                             precision=args.precision) for s in served}
        jobs.append(Job(network.meta["model"], network.meta["op"], served,
                        weights=_stem_name(source) + ("-int8" if args.precision == "int8" else ""),
                        loaded=loaded))
    if not jobs:
        parser.error(f"none of the weights is for the scales {args.scales}")
    return jobs


def markdown_table(results, datasets, incomplete=None, skipped=None):
    """The AdderSR-style table: rows scale x model x method, cells ``PSNR/SSIM``.

    ``incomplete``: ``{dataset: (unreadable file names, images in the set)}``; ``skipped``:
    ``{dataset: {file name: why it is too small to score}}``; those sets' columns are marked
    ``*`` and a note under the table names the files left out.
    """
    incomplete = incomplete or {}
    skipped = {d: v for d, v in (skipped or {}).items() if v}
    cols = ["Scale", "Model", "Method", "Params", "#Mul (G)", "#Add (G)", "Energy (mJ)"]
    cols += [f"{d}*" if d in incomplete or d in skipped else d for d in datasets]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    rows = {}
    for r in results:
        key = (r["scale"], r["_order"])
        rows.setdefault(key, {"r": r, "cells": {}})["cells"][r["dataset"]] = \
            f"{r['psnr']:.2f}/{r['ssim']:.4f}"

    def giga(value):
        return "-" if value is None else f"{value / 1e9:.1f}"

    for (scale, _), row in sorted(rows.items(), key=lambda kv: kv[0]):
        r, costs = row["r"], row["r"]["_table_costs"]
        params = "-" if costs["params"] is None else f"{costs['params'] / 1e6:.2f}M"
        name = r["weights"] or r["model"]
        cells = [f"x{scale}", name, METHOD.get(r["op"], r["op"]), params,
                 giga(costs["mults"]), giga(costs["adds"]),
                 "-" if costs["energy_mj"] is None else f"{costs['energy_mj']:.1f}"]
        cells += [row["cells"].get(d, "-") for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    for dataset, (names, total) in incomplete.items():
        lines.append(f"\n{dataset}*: incomplete, {len(names)} of {total} images could not be "
                     f"read and were left out ({', '.join(names)}).")
    for dataset, small in skipped.items():
        lines.append(f"\n{dataset}*: {len(small)} images too small to score were left out where too small "
                     f"({'; '.join(f'{n}: {why}' for n, why in small.items())}).")
    return "\n".join(lines)


def _read_set(dataset, folder, limit):
    """``(images, unreadable file names, files tried)`` for the first ``limit`` images of a
    set: a file that cannot be read is reported in a warning and left out."""
    paths = list_images(folder)[:limit]
    unreadable = []

    def skip(err):
        tqdm.write(f"warning: {err}; left out of {dataset}", file=sys.stderr)
        unreadable.append(err.path.name)

    try:
        images = load_images(paths, on_error=skip)
    except ValueError:  # "no images to evaluate": every file was unreadable
        images = []
    return images, unreadable, len(paths)


def _write(path, text):
    atomic_write(path, lambda f: f.write(text), "w", encoding="utf-8")


def _write_csv(path, rows):
    def write(f):
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, "w", newline="", encoding="utf-8")


def _parser():
    p = argparse.ArgumentParser(prog="python -m addersr.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", help="'bicubic' or a registry name (randomly initialised)")
    what.add_argument("--weights", nargs="+", metavar="PATH_OR_NAME",
                      help="weights file(s); model and scale come from the JSON sidecar")
    p.add_argument("--op", default="adder", choices=["adder", "conv"], help="layer kind for --model")
    p.add_argument("--datasets", nargs="+", help=f"dataset folders (default: {' '.join(BENCHMARK_SETS)}, "
                   "those present, else all)")
    p.add_argument("--scales", nargs="+", type=int, choices=[2, 3, 4],
                   help="default 2 3 4 (weights: every scale they were trained for; these among them)")
    p.add_argument("--data-root", help="folder whose sub-folders are the datasets "
                   "(default: $ADDERSR_DATA/benchmark, else the shipped Set5)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8: 8-bit adder layers on the CPU (adder weights with NAME.int8.json)")
    p.add_argument("--self-ensemble", action="store_true", help="average the 8 flips/rotations")
    p.add_argument("--tile", type=int, help="tile size in LR pixels, at least 64 (exact tiling: "
                   "overlap = receptive field)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--limit", type=int, help="only the first N images of each set (quick checks)")
    p.add_argument("--save-images", metavar="DIR", help="write SR images to DIR/<model>/<set>/x<scale>/")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--md", metavar="FILE", help="write the markdown report to FILE")
    return p


def _run(names, found, jobs, args, device, results, incomplete, skipped):
    """Score every job on every set, appending to ``results`` as each finishes; sets with
    unreadable files go to ``incomplete``, images too small to score to ``skipped``."""
    table_costs = {}
    steps = sum(len(j.scales) for j in jobs) * len(names)
    with tqdm(total=steps, desc="bench", unit="run", file=sys.stderr) as bar:
        for dataset in names:
            images, unreadable, files = _read_set(dataset, found[dataset], args.limit)
            if unreadable:
                incomplete[dataset] = (unreadable, files)
            for order, job in enumerate(jobs):
                for scale in job.scales:
                    scored = _scorable(images, scale, dataset, skipped)
                    if not scored:
                        bar.update()
                        continue
                    network = job.network(scale)
                    bar.set_postfix_str(f"{dataset} x{scale} {job.label}")
                    save = (Path(args.save_images) / job.label / dataset / f"x{scale}"
                            if args.save_images else None)
                    res = evaluate(network, scored, scale, device=device, tile=args.tile,
                                   self_ensemble=args.self_ensemble, lpips=not args.no_lpips,
                                   progress=True, desc=f"{dataset} x{scale}", save_dir=save)
                    h, w = (round(v / scale) * scale for v in res["mean_size"])
                    if (order, scale) not in table_costs:
                        table_costs[(order, scale)] = _costs(network, TABLE_SIZE)
                    results.append({
                        "model": job.model, "op": job.op, "weights": job.weights, "dataset": dataset,
                        "scale": scale, "images": res["images"], "unreadable": len(unreadable),
                        "too_small": len(images) - len(scored),
                        "psnr": res["psnr"], "ssim": res["ssim"],
                        "lpips": res["lpips"], "seconds_per_image": res["seconds_per_image"],
                        **_costs(network, (h, w)),
                        "_order": order, "_table_costs": table_costs[(order, scale)]})
                    bar.update()


def _scorable(images, scale, dataset, skipped):
    """The images of ``dataset`` that can be scored at ``scale``; the others are reported
    once in a warning and recorded in ``skipped[dataset][name]``."""
    kept = []
    for name, image in images:
        why = unscorable(image.shape, scale)
        if why is None:
            kept.append((name, image))
        elif name not in skipped.setdefault(dataset, {}):
            skipped[dataset][name] = why
            tqdm.write(f"warning: {dataset}/{name}: {why}; left out at x{scale}", file=sys.stderr)
    return kept


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_tile(args.tile)
    except ValueError as err:
        parser.error(f"--tile: {err}")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    try:
        device = resolve(args.device)
    except DeviceError as err:
        parser.error(str(err))
    try:
        root = dataset_root(args.data_root)
    except FileNotFoundError as err:
        parser.error(str(err))
    found = find_datasets(root)
    if args.datasets:
        missing = [d for d in args.datasets if d not in found]
        empty = [d for d in missing if (Path(root) / d).is_dir()]
        if empty:
            parser.error(f"dataset folder(s) {empty} in {root} hold no images; with images: "
                         f"{sorted(found)}")
        if missing:
            parser.error(f"dataset(s) {missing} not found in {root}; available: {sorted(found)}")
        names = args.datasets
    else:
        names = [d for d in BENCHMARK_SETS if d in found] or list(found)
    if not names:
        parser.error(f"no dataset folders with images in {root}")
    for option, path in (("--json", args.json), ("--csv", args.csv), ("--md", args.md)):
        if path is None:
            continue
        if Path(path).is_dir():
            parser.error(f"{option} {path} is a folder; name a file")
        try:
            prepare_output_dir(Path(path).parent)
        except OutputError as err:
            parser.error(f"{option}: {err}")
    if args.save_images:
        try:
            prepare_output_dir(args.save_images)
        except OutputError as err:
            parser.error(f"--save-images: {err}")
    jobs = _jobs(args, parser, device)
    if args.model and args.model != "bicubic":
        for job in jobs:  # fail on an unsupported scale before any work
            for s in job.scales:
                try:
                    job.network(s)
                except ValueError as err:
                    parser.error(str(err))

    started = time.perf_counter()
    dev = describe(device)
    print(f"device: {dev}\ndata root: {root}", file=sys.stderr)
    results, incomplete, skipped = [], {}, {}
    with signals.interruptible():
        try:
            _run(names, found, jobs, args, device, results, incomplete, skipped)
            stopped = None
        except KeyboardInterrupt:
            stopped = signals.received()

    return _report(args, argv, dev, root, started, names, results, incomplete, skipped, stopped)


def _report(args, argv, dev, root, started, names, results, incomplete, skipped, stopped):
    """Print the table and write ``--json``, ``--csv``, ``--md``; the public rows. After a
    signal (``stopped``) the finished runs are written all the same, then SystemExit."""
    table = markdown_table(results, names, incomplete, skipped)
    public = [{k: r[k] for k in FIELDS} for r in results]
    size = f"{TABLE_SIZE[1]}x{TABLE_SIZE[0]}"
    report = (f"Device: {dev}. Data: {root}. PSNR (dB) / SSIM on Y, border = scale; "
              f"#Mul, #Add and energy (45 nm FP32) for one {size} output. "
              f"Wall time {time.perf_counter() - started:.0f} s.\n\n{table}\n"
              + (f"\nInterrupted by {signals.name(stopped)}: only the {len(results)} runs finished "
                 "before it are shown.\n" if stopped else ""))
    print(report)
    if args.json:
        unread = {d: files for d, (files, _) in incomplete.items()}
        _write(args.json, json.dumps({"device": dev, "results": public, "unreadable": unread,
                                      "too_small": {d: v for d, v in skipped.items() if v},
                                      "interrupted": signals.name(stopped) if stopped else None},
                                     indent=2) + "\n")
    if args.csv:
        _write_csv(args.csv, public)
    if args.md:
        command = "python -m addersr.bench " + " ".join(sys.argv[1:] if argv is None else argv)
        _write(args.md, f"# Benchmark\n\n`{command}`\n\n{report}")
    if stopped:
        files = [path for path in (args.json, args.csv, args.md) if path]
        print(f"interrupted by {signals.name(stopped)}: the {len(results)} finished runs are "
              + (f"written to {', '.join(files)}" if files else "in the table above"), file=sys.stderr)
        raise SystemExit(signals.exit_status(stopped))
    return public


if __name__ == "__main__":
    keep_freed_memory()  # many large passes: keep their memory instead of faulting it in again
    main()
