"""Load test of the web demo: N concurrent ``/upscale`` requests through ``gradio_client``.

    python benchmarks/app_load.py [--requests 20] [--size 64] [--weights-dir DIR]
                                  [--weights NAME] [--one-at-a-time]
                                  [--concurrency 1] [--device cpu] [--out FILE]

    # how long one 256x256 x4 request takes in the demo, shipped weights:
    python benchmarks/app_load.py --requests 5 --one-at-a-time --size 256 \
        --weights-dir weights --weights edsr-small-x4-adder-cpu --out benchmarks/results/app_x4_256.md

Starts ``python app.py`` in a subprocess (by default on a random-weight, full-size
edsr-baseline x2 adder model saved in a temporary folder: the time does not depend on the
weights' values), sends all requests at once, one client per thread, checks every reply
(an image of the right size) and writes the wall time, the latencies and the server's
memory (resident set at rest and its peak, VmHWM) to ``benchmarks/results/app_load.md``.
"""

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def fire(url, image, requests=20, api_name="/upscale", weights=None, parallel=True):
    """Send ``requests`` calls of ``api_name`` with ``image`` (and ``weights``, a name; None:
    the app's default), all at once or, with ``parallel=False``, one after the other; report
    the outcome.

    Returns ``dict(ok, failed=[error strings], sizes=[(w, h)], latencies=[s], seconds)``.
    """
    from gradio_client import Client, handle_file

    # one client per request in flight, connected before the clock starts (as a page that
    # is already open): a request's latency is its upload, queue, work and download
    clients = [Client(url, verbose=False) for _ in range(requests if parallel else 1)]

    def one(i):
        client = clients[i % len(clients)]
        start = time.perf_counter()
        try:
            result = client.predict(handle_file(str(image)), weights, api_name=api_name)
            with Image.open(result[0]) as im:
                size = im.size
            return True, size, time.perf_counter() - start
        except Exception as err:  # every failure is reported, none stops the run
            return False, f"{type(err).__name__}: {err}", time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=requests if parallel else 1) as pool:
        outcomes = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
    return {"ok": sum(ok for ok, _, _ in outcomes),
            "failed": [info for ok, info, _ in outcomes if not ok],
            "sizes": [info for ok, info, _ in outcomes if ok],
            "latencies": [t for _, _, t in outcomes],
            "seconds": seconds}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_kib(pid, key):
    """``VmRSS`` or ``VmHWM`` (peak) of a process in KiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _wait_until_up(url, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app.py did not answer on {url} within {timeout} s")


def _random_weights(folder):
    import torch

    from addersr import models

    torch.manual_seed(0)
    models.save(models.build("edsr-baseline", 2, op="adder"), Path(folder) / "edsr-baseline_x2_adder",
                {"note": "random weights for the load test"})


def _scale(weights_dir, name):
    """The scale of the weights ``name`` in ``weights_dir`` (None: not known here)."""
    if name is None:
        return None
    from addersr import models

    return next((int(meta["scale"]) for path, meta in models.list_weights(weights_dir)
                 if path.stem == name), None)


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--size", type=int, default=32, help="side of the square test image (pixels)")
    p.add_argument("--weights-dir", default=None,
                   help="weights folder for the app (default: random edsr-baseline x2 adder)")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="weights to request (default: the app's default model)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="send the requests one after the other (latency of a lone request)")
    p.add_argument("--concurrency", type=int, default=1, help="the app's --concurrency")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "app_load.md"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="addersr-load-") as tmp:
        tmp = Path(tmp)
        weights = args.weights_dir
        if weights is None:
            weights = tmp / "weights"
            _random_weights(weights)
        from addersr.data import read_image
        hr = read_image(ROOT / "addersr" / "assets" / "Set5" / "butterfly.png")
        Image.fromarray(hr[:args.size, :args.size]).save(tmp / "input.png")

        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                                 "--weights-dir", str(weights), "--device", args.device,
                                 "--concurrency", str(args.concurrency)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            start = time.perf_counter()
            _wait_until_up(url, proc)
            startup = time.perf_counter() - start
            warm = fire(url, tmp / "input.png", requests=1, weights=args.weights)  # loads the model
            if warm["ok"] != 1:
                raise RuntimeError(f"warm-up request failed: {warm['failed']}")
            rest_kib = _memory_kib(proc.pid, "VmRSS")
            report = fire(url, tmp / "input.png", requests=args.requests, weights=args.weights,
                          parallel=not args.one_at_a_time)
            peak_kib = _memory_kib(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    lat = np.array(report["latencies"])
    scale = 2 if args.weights_dir is None else _scale(args.weights_dir, args.weights)
    expected = None if scale is None else (scale * args.size, scale * args.size)
    sizes_ok = expected is None or all(s == expected for s in report["sizes"])
    lines = [
        "# Web demo under load",
        "",
        f"`python benchmarks/app_load.py --requests {args.requests} --size {args.size}"
        f" --concurrency {args.concurrency} --device {args.device}"
        + ("" if args.weights_dir is None else f" --weights-dir {args.weights_dir}")
        + ("" if args.weights is None else f" --weights {args.weights}")
        + (" --one-at-a-time" if args.one_at_a_time else "") + "`",
        "",
        f"- machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}; load average "
        f"{load_before:.1f} before the run (other work on the machine slows it)",
        "- model: " + ("random-weight edsr-baseline x2 adder (full size)"
                       if args.weights_dir is None else
                       f"{args.weights or 'the default weights'} in {args.weights_dir}"),
        f"- input {args.size}x{args.size} RGB; the app's queue runs {args.concurrency} "
        "request(s) at a time; requests sent "
        + ("one after the other" if args.one_at_a_time else "all at once")
        + "; a request's latency is the client's (connected before the clock starts, as an "
        "open page): upload, queue, upscaling, bicubic or twin, PNG encoding, download",
        "",
        "| requests | succeeded | right size | wall time | throughput | latency p50 | p90 | max "
        "| server RSS at rest | server peak RSS |",
        "|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.requests} | {report['ok']} | {'yes' if sizes_ok else 'NO'} "
        f"| {report['seconds']:.1f} s | {args.requests / report['seconds']:.2f} /s "
        f"| {np.percentile(lat, 50):.2f} s | {np.percentile(lat, 90):.2f} s | {lat.max():.2f} s "
        f"| {rest_kib / 1024:.0f} MiB | {peak_kib / 1024:.0f} MiB |",
        "",
        f"Server start-up (imports, model list, first page): {startup:.1f} s. "
        "RSS at rest is measured after one warm-up request; the peak is VmHWM over the "
        "server's whole life.",
    ]
    if report["failed"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in report["failed"]]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report["ok"] == args.requests and sizes_ok else 1


if __name__ == "__main__":
    sys.exit(main())
