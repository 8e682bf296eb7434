"""Time of one training step: adder EDSR-baseline x2 against its CNN twin.

    python benchmarks/train_step.py                    # CPU -> benchmarks/results/train_step_cpu.md
    python benchmarks/train_step.py --device cuda      # GPU, batch 16 of 48x48 LR patches

A step is what training does: forward pass, L1 loss against an HR batch, backward pass,
for the adder network AdderNet's adaptive learning rate (``rescale_adder_grads``, eta 0.2),
and an Adam step. Inputs are random (timing does not depend on the values). The default
batch is the EDSR recipe's 16 on a GPU and 2 on the CPU, so the CPU run ends in about a
minute. Reported: the median of ``--steps`` timed steps after ``--warmup`` untimed ones,
and the median forward pass alone (no_grad, eval mode) of the same batch.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from addersr.device import hardware, resolve
from addersr.models import build
from addersr.nn import rescale_adder_grads
from addersr.ops import resolve_backend


def machine(device):
    if device.type == "cuda":
        return f"{hardware(device)} (CUDA {torch.version.cuda})"
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    return f"{hardware(device)}, {torch.get_num_threads()} threads{load}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_model(op, args, device):
    torch.manual_seed(0)
    model = build("edsr-baseline", 2, op, backend=args.backend).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    lr = torch.rand(args.batch, 3, args.patch, args.patch, device=device)
    hr = torch.rand(args.batch, 3, 2 * args.patch, 2 * args.patch, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(lr), hr)
        loss.backward()
        if op == "adder":
            rescale_adder_grads(model, eta=0.2)
        opt.step()

    def forward():
        with torch.no_grad():
            model(lr)

    train = _median_time(step, device, args.steps, args.warmup)
    model.eval()
    infer = _median_time(forward, device, args.steps, 1)
    return train, infer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda")
    parser.add_argument("--batch", type=int, default=None, help="LR patches per batch (16 on GPU, 2 on CPU)")
    parser.add_argument("--patch", type=int, default=48, help="LR patch side (default 48)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default=None, help="adder backend (default: fastest available)")
    parser.add_argument("--out", default=None, help="markdown report (default benchmarks/results/train_step_<device>.md)")
    args = parser.parse_args(argv)
    device = resolve(args.device)
    if args.batch is None:
        args.batch = 16 if device.type == "cuda" else 2
    backend = resolve_backend(device, args.backend)

    results = {op: time_model(op, args, device) for op in ("conv", "adder")}
    (conv_train, conv_infer), (adder_train, adder_infer) = results["conv"], results["adder"]
    where = machine(device)
    lines = [
        "# Training step: adder EDSR-baseline x2 vs its CNN twin",
        "",
        f"`python benchmarks/train_step.py --device {device.type} --batch {args.batch} --patch {args.patch}`",
        "",
        f"Machine: {where}; torch {torch.__version__}; adder backend `{backend}`. "
        f"Batch {args.batch} of {args.patch}x{args.patch} LR patches; step = forward, L1 loss, "
        f"backward, adaptive learning rate (adder only), Adam. Median of {args.steps} steps "
        f"after {args.warmup} warm-up.",
        "",
        "| network | train step (ms) | forward, no_grad (ms) | patches/s (train) |",
        "| --- | --- | --- | --- |",
        f"| CNN (conv) | {conv_train * 1e3:.1f} | {conv_infer * 1e3:.1f} | {args.batch / conv_train:.1f} |",
        f"| AdderSR (adder) | {adder_train * 1e3:.1f} | {adder_infer * 1e3:.1f} | {args.batch / adder_train:.1f} |",
        "",
        f"Adder / CNN time: train step {adder_train / conv_train:.2f}x, forward {adder_infer / conv_infer:.2f}x.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"train_step_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
