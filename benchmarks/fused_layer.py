"""One AdderSR layer, fused against eager, and the output stage alone; or whole models.

    python benchmarks/fused_layer.py                      # 2x64x48x48, CPU, all threads
    python benchmarks/fused_layer.py --shape 16x64x48x48 --threads 1 --device cuda
    python benchmarks/fused_layer.py --models --shape 2x3x48x48   # EDSR-baseline x2 steps

Times (best of ``--repeat``, the variants interleaved so that a busy machine slows them
alike) the training-mode forward and forward + backward of ``AdderSRLayer`` (relu=True,
alpha 0.8) with ``fused=True`` and ``fused=False``, and the stage after the adder op alone
(fused kernel, against eager BN + add + ReLU + power on the same adder output).
``--models``: the training step (``benchmarks/train_step.py``'s: forward, L1 loss, backward,
adaptive rate, Adam) and the no_grad forward of EDSR-baseline x2 as CNN, adder fused and
adder eager, interleaved step by step, best of ``--repeat``.
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F


def _best(fns, repeat, sync):
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def models(args, device, sync):
    """Best train-step and forward times of the three networks, interleaved."""
    from addersr.models import build
    from addersr.nn import rescale_adder_grads

    n, _, h, w = (int(v) for v in args.shape.split("x"))
    lr, hr = torch.rand(n, 3, h, w, device=device), torch.rand(n, 3, 2 * h, 2 * w, device=device)
    fns = {}
    for label, op, fused in (("CNN", "conv", True), ("adder fused", "adder", True), ("adder eager", "adder", False)):
        torch.manual_seed(0)
        model = build("edsr-baseline", 2, op).to(device)
        for m in model.modules():
            if hasattr(m, "fused"):
                m.fused = fused
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, op=op):
            model.train()
            opt.zero_grad(set_to_none=True)
            F.l1_loss(model(lr), hr).backward()
            if op == "adder":
                rescale_adder_grads(model)
            opt.step()

        def forward(model=model):
            model.eval()
            with torch.no_grad():
                model(lr)

        fns[f"{label} step"], fns[f"{label} forward"] = step, forward
    best = _best(fns, args.repeat, sync)
    for k, v in best.items():
        print(f"  {k:20s} {v * 1e3:8.1f} ms")
    for label in ("adder fused", "adder eager"):
        print(f"  {label} / CNN: train step {best[label + ' step'] / best['CNN step']:.2f}x, "
              f"forward {best[label + ' forward'] / best['CNN forward']:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2x64x48x48", help="NxCxHxW")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--models", action="store_true", help="EDSR-baseline x2 steps instead of one layer")
    args = parser.parse_args(argv)
    from addersr.nn import AdderSRLayer
    from addersr.ops import fused, resolve_backend

    if args.threads:
        import numba
        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"{args.shape} on {device}, {torch.get_num_threads()} threads{load}; best of {args.repeat}")
    if args.models:
        return models(args, device, sync)
    n, c, h, w = (int(v) for v in args.shape.split("x"))
    layer = AdderSRLayer(c).to(device)
    with torch.no_grad():
        layer.power.alpha.fill_(0.8)
    x = torch.randn(n, c, h, w, device=device).requires_grad_()
    g = torch.randn(n, c, h, w, device=device)
    stage = fused.stage_backend(resolve_backend(device))
    y = torch.randn(n, c, h, w, device=device) * 20 - 500
    mean, var = y.new_empty(c), y.new_empty(c)
    bn, alpha = layer.bn, layer.power.alpha.detach()

    def eager_stage():
        z = F.relu(x.detach() + F.batch_norm(y, None, None, bn.weight.detach(), bn.bias.detach(), True))
        return torch.sign(z) * z.abs().pow(alpha)

    def run(fused_flag, backward):
        def fn():
            layer.fused = fused_flag
            out = layer(x)
            if backward:
                out.backward(g)
        return fn

    fns = {"fused forward": run(True, False), "eager forward": run(False, False),
           "fused fwd+bwd": run(True, True), "eager fwd+bwd": run(False, True),
           "fused stage": lambda: stage.forward(x.detach(), y, bn.weight.detach(), bn.bias.detach(), alpha,
                                                mean, var, bn.eps, True, True),
           "eager stage": eager_stage}
    best = _best(fns, args.repeat, sync)
    for k, v in best.items():
        print(f"  {k:14s} {v * 1e3:8.2f} ms")
    for part in ("forward", "fwd+bwd", "stage"):
        print(f"  eager / fused {part}: {best['eager ' + part] / best['fused ' + part]:.2f}x")


if __name__ == "__main__":
    main()
