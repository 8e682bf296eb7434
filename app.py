"""AdderSR web demo: upload an image and upscale it with a multiplication-free network.

    python app.py [--host 127.0.0.1] [--port 7860] [--device auto] [--weights-dir DIR]
                  [--concurrency 1] [--share]

The page compares the model's result on a slider with bicubic interpolation or, on
request, with its twin's (the CNN of the same size for an AdderSR model) and reports
the time taken, the output size, the additions and multiplications the network spent and
its estimated energy next to its twin's (AdderSR <-> CNN, 45 nm figures of
``addersr.energy``). The models offered are the weights in ``--weights-dir``, else
$ADDERSR_WEIGHTS, else the weights shipped in ``weights/``; with none there the page still
opens and says so. A model whose recorded Set5 PSNR is within ``PREVIEW_MARGIN_DB`` of
bicubic's is marked as a preview. Uploads are checked as soon as they arrive; outputs above
``MAX_OUTPUT_PIXELS`` and tiles below ``MIN_TILE`` are refused with a clear message; large
images go through exact tiled inference, and a request whose client disconnects stops at
its next tile. ``python app.py`` keeps uploads and results in one temporary folder, removed
when it exits (Ctrl-C or SIGTERM).

API: the endpoint ``/upscale`` takes ``(image, weights, tile, compare)``; only the image
is required (``compare``: "bicubic" or "twin"). Its first output is the upscaled PNG.
"""

import argparse
import functools
import math
import os
import shutil
import signal
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
from addersr.data import imresize  # noqa: E402
from addersr.device import resolve  # noqa: E402
from addersr.energy import count_ops  # noqa: E402
from addersr.eval import evaluate  # noqa: E402
from addersr.images import (ImageError, ImageTooLarge, check_size, image_size,  # noqa: E402
                            load_image, read_image, save_png)
from addersr.inference import MIN_TILE, check_tile, upscale  # noqa: E402

MAX_OUTPUT_PIXELS = 4096 * 4096  # largest output accepted: 16.8 megapixels
TILE = 256  # inputs wider or taller than this many pixels are upscaled in exact tiles
PREVIEW_MARGIN_DB = 1.0  # a model less than this much above bicubic on Set5 is a preview
MAX_UPLOAD = "64mb"
QUEUE_SIZE = 64  # requests that may wait in the queue
KEEP_RESULTS_S = 3600  # results and uploads older than this are deleted
ASSETS = Path(models.__file__).resolve().parent.parent / "assets" / "Set5"
EXAMPLE_REDUCTION = 4  # the Set5 examples are shrunk this much (MATLAB bicubic) to be LR inputs
OP_NAMES = {"adder": "AdderSR", "conv": "CNN"}
BICUBIC, TWIN = "bicubic", "twin"  # what the slider shows the result against
COMPARE = (BICUBIC, TWIN)


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


@functools.cache
def bicubic_set5(scale):
    """Set5 PSNR of bicubic interpolation at ``scale`` (the bench protocol, shipped Set5)."""
    return evaluate("bicubic", ASSETS, scale, progress=False)["psnr"]


def is_preview(meta):
    """True when the weights' recorded Set5 PSNR is less than PREVIEW_MARGIN_DB above bicubic."""
    psnr = _set5_psnr(meta)
    return psnr is not None and psnr - bicubic_set5(int(meta["scale"])) < PREVIEW_MARGIN_DB


def weights_label(name, meta):
    """Dropdown label: ``edsr-baseline x2 · AdderSR · Set5 37.10 dB (name)``, with
    ``· preview`` for a preview model."""
    label = f"{meta['model']} x{meta['scale']} · {OP_NAMES.get(meta['op'], meta['op'])}"
    psnr = _set5_psnr(meta)
    if psnr is not None:
        label += f" · Set5 {psnr:.2f} dB" + (" · preview" if is_preview(meta) else "")
    return f"{label} ({name})"


def quality_note(meta):
    """A sentence for the page on what quality to expect from these weights."""
    psnr = _set5_psnr(meta)
    if psnr is None:
        return "No quality score is recorded for this model."
    scale = int(meta["scale"])
    gain = psnr - bicubic_set5(scale)
    scores = (f"on the Set5 test pictures at x{scale} it scores {psnr:.2f} dB, {gain:+.2f} dB "
              f"compared with ordinary bicubic enlargement ({bicubic_set5(scale):.2f} dB; higher "
              "is better)")
    if gain < PREVIEW_MARGIN_DB:
        return (f"⚠️ **Preview model, at about bicubic quality**: {scores}. Expect results "
                "close to an ordinary enlargement.")
    return f"Quality: {scores}."


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


def _client_gone():
    """True when the request being served has lost its client (tab closed, connection
    dropped, job cancelled); False outside the server (a direct call)."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    if blocks is None or event_id is None:
        return False
    event = blocks._queue.event_ids_to_events.get(event_id)
    return event is None or not event.alive


class Upscaler:
    """The demo's work, independent of any web server: ``Upscaler(dir)(path) -> outputs``.

    ``weights_dir``: folder of ``NAME.safetensors`` + ``NAME.json`` (default: see
    :func:`addersr.models.weights_dir`). ``device``: "auto" (GPU when present), "cpu", ...
    ``temp_dir``: where its folder of results and examples is made (default: the system's).
    Loaded models and operation counts are cached.
    """

    def __init__(self, weights_dir=None, device="auto", temp_dir=None):
        self.weights_dir = Path(weights_dir) if weights_dir else models.weights_dir()
        self.device = str(resolve(device))
        self.weights = {path.stem: meta for path, meta in models.list_weights(self.weights_dir)}
        self.scratch = Path(tempfile.mkdtemp(prefix="addersr-app-", dir=temp_dir))
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
        """The best adder model (of ``scale`` when given): the largest recorded Set5 gain over
        bicubic; CNN twins and models without a score come after. None without weights."""
        def rank(name):
            meta = self.weights[name]
            psnr = _set5_psnr(meta)
            gain = psnr - bicubic_set5(int(meta["scale"])) if psnr is not None else -math.inf
            return meta["op"] != "adder", -gain, name
        names = [name for _, name in self.choices(scale)]
        return min(names, key=rank) if names else None

    def twin(self, name):
        """The weights of ``name``'s twin: same model, scale and architecture, the other op
        (the CNN of an AdderSR model and vice versa); None when none is offered."""
        meta = self.weights.get(name)
        if meta is None:
            return None
        twins = [other for other, m in self.weights.items()
                 if m["op"] != meta["op"] and models.twin_key(m) == models.twin_key(meta)]
        return min(twins) if twins else None

    def limit(self):
        """The output limit in words, with the largest input for each scale offered."""
        sides = ", ".join(f"{int(MAX_OUTPUT_PIXELS ** 0.5) // s}x{int(MAX_OUTPUT_PIXELS ** 0.5) // s}"
                          f" at x{s}" for s in self.scales() or [1])
        return f"the limit is {MAX_OUTPUT_PIXELS / 1e6:.1f} megapixels of output ({sides})"

    def note(self, name):
        """The quality sentence for the weights ``name`` ("" when there are none)."""
        return quality_note(self.weights[name]) if name in self.weights else ""

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

    # ---- the handlers
    def check(self, image, weights=None, tile=0, compare=BICUBIC):
        """Validate a request without running it (the image's header only).

        Returns ``(path, name, scale, (w, h), tile)``, ``tile`` being the tile size to use
        (None: the whole image at once). Raises ``gr.Error`` for a missing, unreadable or
        too large image, unknown weights, a bad tile size or a comparison with a twin that
        is not offered.
        """
        if not self.weights:
            raise _refuse(self.no_weights_message())
        if image is None:
            raise _refuse("Upload an image first.")
        name = weights or self.default()
        if name not in self.weights:
            raise _refuse(f"Unknown weights {name!r}; available: {', '.join(self.weights)}.")
        if compare not in COMPARE:
            raise _refuse(f"Compare with {compare!r}? Choose one of: {', '.join(COMPARE)}.")
        if compare == TWIN and self.twin(name) is None:
            op = OP_NAMES.get(self.weights[name]["op"], "")
            raise _refuse(f"No twin of this {op} model is offered; compare with bicubic.")
        try:
            check_tile(0 if tile is None else int(tile))
        except ValueError as err:
            raise _refuse(f"Tile size (pieces): {err}; 0 chooses automatically.") from None
        path, scale = Path(image), int(self.weights[name]["scale"])
        try:
            size = check_size(path, scale, MAX_OUTPUT_PIXELS)
        except ImageTooLarge as err:
            raise _refuse(f"{path.name} is too large: {err.reason}; {self.limit()}.") from None
        except (FileNotFoundError, ImageError):
            raise _refuse(f"{path.name} is not an image this app can read (PNG, JPEG, WebP, "
                          "BMP or TIFF).") from None
        tile = int(tile or 0) or (TILE if max(size) > TILE else None)
        return path, name, scale, size, tile

    def __call__(self, image, weights=None, tile=0, compare=BICUBIC, progress=gr.Progress()):
        """Upscale the image file ``image`` with ``weights`` (a name; None: the default).

        ``tile``: 0 picks tiles of TILE pixels for large inputs, N >= MIN_TILE forces tiles
        of N. ``compare``: what the result is shown against, ``"bicubic"`` or ``"twin"`` (the
        same image upscaled by the model's twin, see :meth:`twin`). Returns
        ``(upscaled_png, (other_png, upscaled_png), stats_markdown)``; raises ``gr.Error``
        for a bad request (see :meth:`check`) and when the client has gone (the work stops
        at the next tile).
        """
        path, name, scale, _, tile = self.check(image, weights, tile, compare)
        try:
            lr = load_image(path)
        except ImageError as err:
            raise _refuse(f"{path.name} could not be read: {err.reason}.") from None

        def run(weights_name, what):
            def report(done, total):
                if _client_gone():
                    raise _refuse("Cancelled: the client disconnected.")
                progress((done, total), desc=what, unit="tiles")

            model = self.model(weights_name)
            start = time.perf_counter()
            sr = upscale(lr, model, tile=tile, progress=report)
            return sr, time.perf_counter() - start

        sr, seconds = run(name, "Upscaling tiles")
        folder = self._result_dir()
        stem = path.stem
        out_path = save_png(sr, folder / f"{stem}_x{scale}_{name}.png")
        stats = self._stats(name, lr, sr, seconds, tile)
        if compare == TWIN:
            twin = self.twin(name)
            twin_sr, twin_seconds = run(twin, f"{OP_NAMES[self.weights[twin]['op']]} twin: upscaling tiles")
            other = save_png(twin_sr, folder / f"{stem}_x{scale}_{twin}.png")
            stats += "\n\n" + self._twin_line(twin, twin_seconds)
        else:
            other = save_png(bicubic(lr, scale), folder / f"{stem}_x{scale}_bicubic.png")
        return str(out_path), (str(other), str(out_path)), stats

    def _twin_line(self, twin, seconds):
        meta = self.weights[twin]
        psnr = _set5_psnr(meta)
        score = f", Set5 {psnr:.2f} dB" if psnr is not None else ""
        return (f"Left of the slider: its {OP_NAMES[meta['op']]} twin ({twin}{score}), "
                f"**{seconds:.2f} s**.")

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


def _check_uploads(component, up):
    """Wrap ``component.preprocess`` so that an upload that is not an image, or far too
    large to decode, is refused with a clear ``gr.Error`` (read by :mod:`addersr.images`)
    before Gradio opens it. (An instance attribute, not a subclass: Gradio writes a
    ``.pyi`` file beside the source of every Component subclass.)"""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path:
            name = payload.orig_name or "the upload"
            try:
                image_size(payload.path)
            except ImageTooLarge as err:
                raise _refuse(f"{name} is too large ({err.reason}); {up.limit()}.") from None
            except (FileNotFoundError, ImageError):
                raise _refuse(f"{name} is not an image this app can read (PNG, JPEG, WebP, "
                              "BMP or TIFF).") from None
        return original(payload)

    component.preprocess = preprocess
    return component


INTRO = """# AdderSR: super-resolution without multiplications
The hidden layers of these networks compute **negative L1 distances** (AdderNet) instead of
convolutions: additions replace the multiplications. Drop a picture, press **Upscale** and
compare the network's enlargement with an ordinary (bicubic) one on the slider.

PNG, JPEG, WebP, BMP or TIFF; gray, transparent and 16-bit pictures keep their kind. For
the enlarged picture {limit}; pictures larger than {tile} pixels on a side are processed
in pieces, with the same result."""


def slider_label(up, name, compare=BICUBIC):
    """The comparison slider's caption: what its left and right halves show."""
    meta = up.weights.get(name)
    right = f"{OP_NAMES.get(meta['op'], meta['op'])} network" if meta else "the network"
    twin = up.twin(name) if compare == TWIN else None
    left = (f"its {OP_NAMES[up.weights[twin]['op']]} twin" if twin
            else "ordinary enlargement (bicubic)")
    return f"Left: {left} · Right: {right} · drag the bar to compare"


def compare_control(up, name, current=BICUBIC, **props):
    """The "Compare with" choice for the weights ``name``: bicubic, and the twin when offered
    (the control is hidden without one). ``props``: more arguments of ``gr.Radio``."""
    twin = up.twin(name)
    choices = [("ordinary enlargement (bicubic)", BICUBIC)]
    if twin:
        choices.append((f"its {OP_NAMES[up.weights[twin]['op']]} twin (runs it too)", TWIN))
    value = current if twin and current in COMPARE else BICUBIC
    return gr.Radio(choices, value=value, visible=twin is not None, **props)


def build_demo(weights_dir=None, device="auto", concurrency=1, temp_dir=None):
    """The Gradio Blocks app (queued; ``concurrency`` requests run at once). ``temp_dir``:
    where the :class:`Upscaler` makes its folder (default: the system's temporary folder)."""
    up = Upscaler(weights_dir, device, temp_dir)
    scales = up.scales()
    first = scales[0] if scales else None
    with gr.Blocks(title="AdderSR", analytics_enabled=False,
                   delete_cache=(KEEP_RESULTS_S, KEEP_RESULTS_S)) as demo:
        gr.Markdown(INTRO.format(limit=up.limit(), tile=TILE))
        if not up.weights:
            gr.Markdown(f"⚠️ {up.no_weights_message()}", elem_id="no-weights")
        with gr.Row():
            with gr.Column(scale=2):
                image = _check_uploads(gr.Image(
                    label="Picture to enlarge", type="filepath", image_mode=None,
                    sources=["upload", "clipboard"], format="png", elem_id="input-image"), up)
                scale = gr.Radio([(f"x{s}", str(s)) for s in scales],
                                 value=str(first) if scales else None,
                                 label="Enlargement (times wider and taller)",
                                 visible=len(scales) > 1, elem_id="scale")
                # custom values: the API may name weights of any scale (check() refuses
                # unknown names), not only those listed for the first scale
                weights = gr.Dropdown(up.choices(first), value=up.default(first), label="Model",
                                      allow_custom_value=True, elem_id="weights")
                note = gr.Markdown(up.note(up.default(first)), elem_id="model-note")
                compare = compare_control(up, up.default(first), label="Compare the result with",
                                          elem_id="compare")
                with gr.Accordion("Advanced: process in pieces", open=False):
                    tile = gr.Number(0, precision=0, minimum=0,
                                     label="Piece size, in pixels of your picture",
                                     info=f"0: automatic (pieces of {TILE} pixels for larger "
                                          f"pictures). At least {MIN_TILE}. The result is "
                                          "the same; smaller pieces need less memory.")
                run = gr.Button("Upscale", variant="primary", interactive=False,
                                elem_id="upscale-button")
                examples = example_images(up.scratch / "examples")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image],
                                label=f"Set5, reduced {EXAMPLE_REDUCTION}x", cache_examples=False)
            with gr.Column(scale=3):
                slider = gr.ImageSlider(label=slider_label(up, up.default(first)),
                                        type="filepath", format="png",
                                        interactive=False, elem_id="comparison")
                stats = gr.Markdown(label="Statistics", elem_id="stats")
                result = gr.File(label="Download the enlarged picture (PNG)",
                                 interactive=False, elem_id="result")

        def ready(path, name, what):
            """The Upscale button, usable once the picture suits the model (errors shown now;
            the tile size is checked when the button is pressed)."""
            if path is not None:
                up.check(path, name, compare=what)
            return gr.Button(interactive=path is not None)

        for event in (image.change, weights.change):  # disable at once, enable if valid
            event(lambda: gr.Button(interactive=False), None, run, queue=False,
                  api_visibility="private").then(  # queued (errors are shown), never waits
                ready, [image, weights, compare], run, concurrency_limit=None,
                api_visibility="private")
        scale.change(lambda s: gr.Dropdown(choices=up.choices(s), value=up.default(s)),
                     inputs=scale, outputs=weights, api_visibility="private")
        weights.change(up.note, weights, note, queue=False, api_visibility="private")
        weights.change(functools.partial(compare_control, up), [weights, compare], compare,
                       queue=False, api_visibility="private")
        for event in (weights.change, compare.change):
            event(lambda name, what: gr.ImageSlider(label=slider_label(up, name, what)),
                  [weights, compare], slider, queue=False, api_visibility="private")
        run.click(lambda: gr.Button(interactive=False), None, run, queue=False,
                  api_visibility="private").then(
            up, inputs=[image, weights, tile, compare], outputs=[result, slider, stats],
            api_name="upscale").then(
            ready, [image, weights, compare], run, concurrency_limit=None,
            api_visibility="private")
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
    # One temporary folder for everything this server writes: Gradio's uploads and copies
    # of results (unless GRADIO_TEMP_DIR is set) and the upscaler's results and examples.
    temp = tempfile.mkdtemp(prefix="addersr-app-")
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(temp, "gradio"))
    signal.signal(signal.SIGTERM, _stop)  # Ctrl-C's way out, so that the folder goes too
    try:
        demo = build_demo(args.weights_dir, args.device, args.concurrency, temp_dir=temp)
        up = demo.upscaler
        if up.default():  # load the default model while the server starts
            threading.Thread(target=up.model, args=(up.default(),), daemon=True).start()
        else:
            print(up.no_weights_message())
        launch(demo, args.host, args.port, args.share)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _stop(signum, frame):
    """SIGTERM: stop as Ctrl-C does (the server closes, then the temporary folder goes)."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
