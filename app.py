"""AdderSR web demo: upload an image and upscale it with a multiplication-free network.

    python app.py [--host 127.0.0.1] [--port 7860] [--device auto] [--weights-dir DIR]
                  [--concurrency 1] [--share]

The page compares the model's result with bicubic interpolation on a slider and reports
the time taken, the output size, the additions and multiplications the network spent and
its estimated energy next to its twin's (AdderSR <-> CNN, 45 nm figures of
``addersr.energy``). The models offered are the weights in ``--weights-dir``, else
$ADDERSR_WEIGHTS, else the weights shipped in ``weights/``; with none there the page still
opens and says so. Large images go through exact tiled inference; outputs above
``MAX_OUTPUT_PIXELS`` are refused with a clear message.

API: the endpoint ``/upscale`` takes ``(image, weights, tile)``; only the image is
required. Its first output is the upscaled PNG.
"""

import argparse
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path

# Gradio phones home at start-up unless told not to; the demo must start offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from addersr import models  # noqa: E402
from addersr.data import imresize, read_image  # noqa: E402
from addersr.energy import count_ops  # noqa: E402
from addersr.upscale import ImageTooLarge, image_size, load_image, save_png, upscale  # noqa: E402

MAX_OUTPUT_PIXELS = 4096 * 4096  # largest output accepted: 16.8 megapixels
TILE = 256  # inputs wider or taller than this many pixels are upscaled in exact tiles
MAX_UPLOAD = "64mb"
QUEUE_SIZE = 64  # requests that may wait in the queue
KEEP_RESULTS_S = 3600  # results and uploads older than this are deleted
ASSETS = Path(models.__file__).resolve().parent.parent / "assets" / "Set5"
EXAMPLE_REDUCTION = 4  # the Set5 examples are shrunk this much (MATLAB bicubic) to be LR inputs
OP_NAMES = {"adder": "AdderSR", "conv": "CNN"}


def _refuse(message):
    """A ``gr.Error`` for a request the app turns down (shown to the user, no traceback)."""
    return gr.Error(message, print_exception=False)


def _set5_psnr(meta):
    """Set5 PSNR recorded in a weights JSON (``metrics.Set5.psnr``, as training exports it); else None."""
    metrics = meta.get("metrics")
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            if key.lower() == "set5" and isinstance(value, dict) and "psnr" in value:
                return float(value["psnr"])
    return None


def weights_label(name, meta):
    """Dropdown label: ``edsr-baseline x2 · AdderSR · Set5 37.10 dB (name)``."""
    label = f"{meta['model']} x{meta['scale']} · {OP_NAMES.get(meta['op'], meta['op'])}"
    psnr = _set5_psnr(meta)
    if psnr is not None:
        label += f" · Set5 {psnr:.2f} dB"
    return f"{label} ({name})"


def _count(n):
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _energy(pj):
    for unit, size in (("J", 1e12), ("mJ", 1e9), ("µJ", 1e6), ("nJ", 1e3)):
        if pj >= size:
            return f"{pj / size:.2f} {unit}"
    return f"{pj:.0f} pJ"


def _describe(image):
    if isinstance(image, np.ndarray):
        return f"{'RGBA' if image.shape[-1] == 4 else 'RGB'} 16-bit"
    return {"I;16": "gray 16-bit", "L": "gray", "LA": "gray + alpha"}.get(image.mode, image.mode)


def bicubic(image, scale):
    """MATLAB-bicubic enlargement of an image as returned by ``load_image``, same kind out."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        out = imresize(array, scale)
    else:  # 16-bit: resize in float, round back
        out = imresize(array.astype(np.float64), scale)
        out = np.clip(np.rint(out), 0, np.iinfo(array.dtype).max).astype(array.dtype)
    if isinstance(image, np.ndarray):
        return out
    return Image.fromarray(out)


def example_images(folder):
    """The shipped Set5 images shrunk EXAMPLE_REDUCTION times, written to ``folder`` as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for hr_path in sorted(ASSETS.glob("*.png")):
        lr = imresize(read_image(hr_path), 1 / EXAMPLE_REDUCTION)
        paths.append(save_png(lr, folder / hr_path.name))
    return paths


class Upscaler:
    """The demo's work, independent of any web server: ``Upscaler(dir)(path) -> outputs``.

    ``weights_dir``: folder of ``NAME.safetensors`` + ``NAME.json`` (default: see
    :func:`addersr.models.weights_dir`). ``device``: "auto" (GPU when present), "cpu", ...
    Loaded models and operation counts are cached.
    """

    def __init__(self, weights_dir=None, device="auto"):
        import torch

        self.weights_dir = Path(weights_dir) if weights_dir else models.weights_dir()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(torch.device(device))
        self.weights = {path.stem: meta for path, meta in models.list_weights(self.weights_dir)}
        self.scratch = Path(tempfile.mkdtemp(prefix="addersr-app-"))  # results/, examples/
        weakref.finalize(self, shutil.rmtree, self.scratch, True)
        self.results = self.scratch / "results"
        self.results.mkdir()
        self._models, self._counts = {}, {}
        self._lock = threading.Lock()

    # ---- choices shown on the page
    def scales(self):
        return sorted({int(meta["scale"]) for meta in self.weights.values()})

    def choices(self, scale=None):
        """``[(label, name)]`` of the weights, those for ``scale`` only when given."""
        return [(weights_label(name, meta), name) for name, meta in self.weights.items()
                if scale is None or int(meta["scale"]) == int(scale)]

    def default(self, scale=None):
        choices = self.choices(scale)
        return choices[0][1] if choices else None

    def no_weights_message(self):
        return (f"No model weights found in `{self.weights_dir}`. Train one with "
                "`python -m addersr.train ... --export weights/NAME`, or start the app with "
                "`--weights-dir DIR` (or `ADDERSR_WEIGHTS=DIR`) pointing at a folder of "
                "`NAME.safetensors` + `NAME.json` files.")

    # ---- cached resources
    def model(self, name):
        with self._lock:
            if name not in self._models:
                model = models.load(self.weights_dir / name, device=self.device)
                # compile kernels and load lazy imports now, not in the first request's time
                upscale(np.zeros((8, 8, 3), np.uint8), model)
                self._models[name] = model
            return self._models[name]

    def counts(self, name, out_size):
        """Operation counts of the model and of its twin (other op) for one output size."""
        key = (name, tuple(out_size))
        with self._lock:
            if key not in self._counts:
                meta = self.weights[name]
                twin_op = "conv" if meta["op"] == "adder" else "adder"
                twin = models.build(meta["model"], int(meta["scale"]), op=twin_op,
                                    **(meta.get("config") or {}))
                own = models.build(meta["model"], int(meta["scale"]), op=meta["op"],
                                   **(meta.get("config") or {}))
                totals = [{k: v for k, v in count_ops(m, out_size=out_size).items()
                           if k != "layers"} for m in (own, twin)]
                self._counts[key] = (*totals, twin_op)
            return self._counts[key]

    def _result_dir(self):
        """A fresh folder for one request's files; deletes those older than KEEP_RESULTS_S."""
        now = time.time()
        for old in self.results.iterdir():
            if now - old.stat().st_mtime > KEEP_RESULTS_S:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.results))

    # ---- the handler
    def __call__(self, image, weights=None, tile=0, progress=gr.Progress()):
        """Upscale the image file ``image`` with ``weights`` (a name; None: the default).

        ``tile``: 0 picks tiles of TILE pixels for large inputs, N > 0 forces tiles of N.
        Returns ``(upscaled_png, (bicubic_png, upscaled_png), stats_markdown)``; raises
        ``gr.Error`` for a missing, unreadable or too large image or unknown weights.
        """
        if not self.weights:
            raise _refuse(self.no_weights_message())
        if image is None:
            raise _refuse("Upload an image first.")
        name = weights or self.default()
        if name not in self.weights:
            raise _refuse(f"Unknown weights {name!r}; available: {', '.join(self.weights)}.")
        if tile is None or int(tile) < 0:
            raise _refuse("Tile size must be 0 (automatic) or a positive number of pixels.")
        path, scale = Path(image), int(self.weights[name]["scale"])
        side = int(MAX_OUTPUT_PIXELS ** 0.5) // scale
        limit = (f"the limit is {MAX_OUTPUT_PIXELS / 1e6:.1f} megapixels of output "
                 f"(e.g. {side}x{side} at x{scale})")
        try:
            w, h = image_size(path)
        except ImageTooLarge:
            raise _refuse(f"{path.name} is far too large; {limit}.") from None
        except (FileNotFoundError, ValueError):
            raise _refuse(f"{path.name} is not an image this app can read (PNG, JPEG, WebP, "
                          "BMP or TIFF).") from None
        if w * h * scale * scale > MAX_OUTPUT_PIXELS:
            raise _refuse(f"{w}x{h} at x{scale} would give a {w * scale}x{h * scale} image; "
                          f"{limit}.")
        try:
            lr = load_image(path)
        except (FileNotFoundError, ValueError) as err:
            raise _refuse(f"Could not read {path.name}: {err}") from None
        tile = int(tile) or (TILE if max(w, h) > TILE else None)

        def report(done, total):
            progress((done, total), desc="Upscaling tiles", unit="tiles")

        model = self.model(name)
        start = time.perf_counter()
        sr = upscale(lr, model, tile=tile, progress=report)
        seconds = time.perf_counter() - start
        folder = self._result_dir()
        stem = path.stem
        out_path = save_png(sr, folder / f"{stem}_x{scale}_{name}.png")
        bic_path = save_png(bicubic(lr, scale), folder / f"{stem}_x{scale}_bicubic.png")
        stats = self._stats(name, lr, sr, seconds, tile)
        return str(out_path), (str(bic_path), str(out_path)), stats

    def _stats(self, name, lr, sr, seconds, tile):
        meta = self.weights[name]
        in_size = (lr.shape[1], lr.shape[0]) if isinstance(lr, np.ndarray) else lr.size
        out_w, out_h = (sr.shape[1], sr.shape[0]) if isinstance(sr, np.ndarray) else sr.size
        own, twin, twin_op = self.counts(name, (out_h, out_w))
        op = meta["op"]
        tiles = f", tiles of {tile} px" if tile else ""
        lines = [
            f"**{weights_label(name, meta)}** on {self.device}: **{seconds:.2f} s**{tiles}",
            "",
            f"{in_size[0]}x{in_size[1]} → **{out_w}x{out_h}** ({_describe(lr)}, "
            f"x{meta['scale']})",
            "",
            f"| for this image | {OP_NAMES[op]} (this model) | {OP_NAMES[twin_op]} twin |",
            "|---|---:|---:|",
            f"| multiplications | {_count(own['mults'])} | {_count(twin['mults'])} |",
            f"| additions | {_count(own['adds'])} | {_count(twin['adds'])} |",
            f"| estimated energy (45 nm) | {_energy(own['energy_pj'])} | "
            f"{_energy(twin['energy_pj'])} |",
        ]
        if own["energy_pj"] > 0 and twin["energy_pj"] > 0:
            ratio = twin["energy_pj"] / own["energy_pj"]
            lines += ["", f"Energy ratio {OP_NAMES[twin_op]} / {OP_NAMES[op]}: **{ratio:.2f}x**"
                      " (FP32: multiply 3.7 pJ, add 0.9 pJ; an adder op is two additions)."]
        return "\n".join(lines)


def _refuse_unreadable(component):
    """Wrap ``component.preprocess`` so that an upload Pillow cannot open raises a clear
    ``gr.Error`` instead of an internal error. (An instance attribute, not a subclass:
    Gradio writes a ``.pyi`` file beside the source of every Component subclass.)"""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise _refuse(f"{name} is not an image this app can read (PNG, JPEG, WebP, BMP "
                          "or TIFF).") from None

    component.preprocess = preprocess
    return component


INTRO = """# AdderSR: super-resolution without multiplications
The hidden layers of these networks compute **negative L1 distances** (AdderNet) instead of
convolutions: additions replace the multiplications. Drop an image, pick a model and
compare the result with bicubic interpolation on the slider.

PNG, JPEG, WebP, BMP or TIFF; gray, RGBA and 16-bit images keep their mode. Outputs are
limited to **{mp:.1f} megapixels** (e.g. {side}x{side} at x4); inputs larger than
{tile} px on a side are processed in exact tiles."""


def build_demo(weights_dir=None, device="auto", concurrency=1):
    """The Gradio Blocks app (queued; ``concurrency`` requests run at once)."""
    up = Upscaler(weights_dir, device)
    scales = up.scales()
    with gr.Blocks(title="AdderSR", analytics_enabled=False,
                   delete_cache=(KEEP_RESULTS_S, KEEP_RESULTS_S)) as demo:
        gr.Markdown(INTRO.format(mp=MAX_OUTPUT_PIXELS / 1e6, tile=TILE,
                                 side=int(MAX_OUTPUT_PIXELS ** 0.5) // 4))
        if not up.weights:
            gr.Markdown(f"⚠️ {up.no_weights_message()}", elem_id="no-weights")
        with gr.Row():
            with gr.Column(scale=2):
                image = _refuse_unreadable(gr.Image(
                    label="Low-resolution image", type="filepath", image_mode=None,
                    sources=["upload", "clipboard"], format="png", elem_id="input-image"))
                scale = gr.Radio([str(s) for s in scales], value=str(scales[0]) if scales else None,
                                 label="Scale", elem_id="scale")
                weights = gr.Dropdown(up.choices(scales[0] if scales else None),
                                      value=up.default(scales[0] if scales else None),
                                      label="Model (weights)", elem_id="weights")
                with gr.Accordion("Tiling", open=False):
                    tile = gr.Number(0, precision=0, minimum=0, label="Tile size in input pixels",
                                     info=f"0: automatic (tiles of {TILE} px for larger inputs). "
                                          "Tiling is exact: the result does not change.")
                run = gr.Button("Upscale", variant="primary", elem_id="upscale-button")
                examples = example_images(up.scratch / "examples")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image],
                                label=f"Set5, reduced {EXAMPLE_REDUCTION}x", cache_examples=False)
            with gr.Column(scale=3):
                slider = gr.ImageSlider(label="Bicubic vs. model", type="filepath",
                                        format="png", elem_id="comparison")
                stats = gr.Markdown(label="Statistics", elem_id="stats")
                result = gr.Image(label="Upscaled image", type="filepath",
                                  format="png", interactive=False, elem_id="result")
        scale.change(lambda s: gr.Dropdown(choices=up.choices(s), value=up.default(s)),
                     inputs=scale, outputs=weights, api_visibility="private")
        run.click(up, inputs=[image, weights, tile], outputs=[result, slider, stats],
                  api_name="upscale")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=concurrency)
    demo.upscaler = up  # the handler, for callers that want it without a server
    return demo


def launch(demo, host="127.0.0.1", port=7860, share=False, block=True):
    """Start the server (offline-safe settings); with ``block=False`` return at once."""
    return demo.launch(server_name=host, server_port=port, share=share,
                       prevent_thread_lock=not block,
                       max_file_size=MAX_UPLOAD, ssr_mode=False, show_error=True,
                       quiet=not block)


def main(argv=None):
    p = argparse.ArgumentParser(description="AdderSR web demo.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, ...")
    p.add_argument("--weights-dir", default=None,
                   help="folder of NAME.safetensors + NAME.json (default: $ADDERSR_WEIGHTS, "
                        "else the shipped weights/)")
    p.add_argument("--concurrency", type=int, default=1, help="requests processed at once")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link "
                                                        "(needs the internet)")
    args = p.parse_args(argv)
    demo = build_demo(args.weights_dir, args.device, args.concurrency)
    up = demo.upscaler
    if up.default():  # load the default model while the server starts
        threading.Thread(target=up.model, args=(up.default(),), daemon=True).start()
    else:
        print(up.no_weights_message())
    launch(demo, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
