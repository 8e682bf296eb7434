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

Adder weights with an int8 calibration (``NAME.int8.json``) get a precision choice: 8-bit
adder layers (their default: within 0.02 dB of fp32 on every shipped model, faster) or fp32.

API: the endpoint ``/upscale`` takes ``(image, weights, tile, compare, scale, precision)``;
only the image is required (``compare``: "bicubic" or "twin"; ``scale``: one the weights were
trained for, default their recorded one; ``precision``: "int8" or "fp32", default int8 where
the weights are calibrated for it, else fp32, as on the page). Its first output is the
upscaled PNG.

This file is the page: its texts, components and events, and the adapter that hands a
request to :class:`addersr.demo.Upscaler` (the work, with no Gradio in it) with Gradio's
progress bar and disconnect signal, and shows the service's refusals as ``gr.Error``.
"""

import argparse
import contextlib
import functools
import os
import shutil
import signal
import tempfile
import threading

# Gradio phones home at start-up unless told not to; the demo must start offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch and numba each bring an OpenMP runtime: idle threads of one that spin take the CPU
# from the other (and from PNG encoding); set before either loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gradio as gr  # noqa: E402

from addersr.demo import Cancelled, Refused, Upscaler  # noqa: E402
from addersr.demo.catalogue import (OP_NAMES, bicubic_set5, is_preview, set5_gain,  # noqa: E402
                                    set5_psnr, weights_label)
from addersr.demo.checks import BICUBIC, COMPARE, FP32, INT8, TILE, TWIN, limit  # noqa: E402
from addersr.demo.service import EXAMPLE_REDUCTION, KEEP_RESULTS_S, example_images  # noqa: E402
from addersr.energy import ENERGY_PJ  # noqa: E402
from addersr.inference import MIN_TILE  # noqa: E402
from addersr.memory import keep_freed_memory  # noqa: E402
from addersr.models import trained_scales  # noqa: E402

MAX_UPLOAD = "64mb"
QUEUE_SIZE = 64  # requests that may wait in the queue
PRECISION_CHOICES = [("8-bit (int8, faster)", INT8), ("32-bit float (fp32)", FP32)]
INT8_NOTE = ("8-bit adder layers: the same picture within 0.02 dB, about 2x faster on a CPU; "
             "the default.")


def _refuse(message):
    """A ``gr.Error`` for a request the app turns down (shown to the user, no traceback)."""
    return gr.Error(message, print_exception=False)


@contextlib.contextmanager
def _shown():
    """Show the service's :class:`Refused` on the page, as a ``gr.Error``."""
    try:
        yield
    except Refused as err:
        raise _refuse(str(err)) from None


def _client_gone():
    """True when the request being served has lost its client (tab closed, connection
    dropped, job cancelled); False outside the server (a direct call)."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    if blocks is None or event_id is None:
        return False
    event = blocks._queue.event_ids_to_events.get(event_id)
    return event is None or not event.alive


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


def _page_scale(meta, scale):
    """The page's chosen ``scale`` when the weights serve it, else their recorded one."""
    served = trained_scales(meta)
    return int(scale) if scale and int(scale) in served else served[0]


def quality_note(catalogue, name, scale=None):
    """A sentence for the page on what quality to expect from the weights ``name`` of
    ``catalogue`` at ``scale`` (None: their recorded one; "" when there are none)."""
    meta = catalogue.weights.get(name)
    if meta is None:
        return ""
    scale = _page_scale(meta, scale)
    psnr = set5_psnr(meta, scale)
    if psnr is None:
        return "No quality score is recorded for this model."
    scores = (f"on the Set5 test pictures at x{scale} it scores {psnr:.2f} dB, "
              f"{set5_gain(meta, scale):+.2f} dB compared with ordinary bicubic enlargement "
              f"({bicubic_set5(scale):.2f} dB; higher is better)")
    if is_preview(meta, scale):
        return (f"⚠️ **Preview model, at about bicubic quality**: {scores}. Expect results "
                "close to an ordinary enlargement.")
    return f"Quality: {scores}."


def stats_markdown(up, result):
    """The statistics under the slider for a :class:`addersr.demo.Result` of ``up``: time,
    sizes, the operations and energy next to the twin's, and the twin's own time if it ran."""
    name, tile = result.request.name, result.request.tile
    meta = up.catalogue.weights[name]
    op, twin_op = OP_NAMES[meta["op"]], OP_NAMES[result.twin_op]
    own, twin = result.ops, result.twin_ops
    (in_w, in_h), (out_w, out_h) = result.in_size, result.out_size
    tiles = f", tiles of {tile} px" if tile else ""
    int8 = result.precision == INT8
    precision = "8-bit adder layers (int8)" if int8 else "32-bit float (fp32)"
    lines = [
        f"**{weights_label(name, meta, result.request.scale)}** on {up.device}, {precision}: "
        f"**{result.seconds:.2f} s**{tiles}",
        "",
        f"{in_w}x{in_h} → **{out_w}x{out_h}** ({result.kind}, x{result.request.scale})",
        "",
        f"| for this image | {op} (this model{', int8' if int8 else ''}) | {twin_op} twin |",
        "|---|---:|---:|",
        f"| multiplications | {_count(own['mults'])} | {_count(twin['mults'])} |",
        f"| additions | {_count(own['adds'])} | {_count(twin['adds'])} |",
        f"| estimated energy (45 nm) | {_energy(own['energy_pj'])} | "
        f"{_energy(twin['energy_pj'])} |",
    ]
    if own["energy_pj"] > 0 and twin["energy_pj"] > 0:
        ratio = twin["energy_pj"] / own["energy_pj"]
        (mult, add), add8 = ENERGY_PJ["fp32"], ENERGY_PJ["int8"][1]
        figures = (f"INT8 add {add8} pJ in this model's adder layers, an adder op two adds; "
                   f"the rest FP32: multiply {mult} pJ, add {add} pJ" if int8 else
                   f"FP32: multiply {mult} pJ, add {add} pJ; an adder op is two additions")
        lines += ["", f"Energy ratio {twin_op} / {op}: **{ratio:.2f}x** ({figures})."]
    if result.twin:
        twin_meta = up.catalogue.weights[result.twin]
        psnr = set5_psnr(twin_meta, result.request.scale)
        score = f", Set5 {psnr:.2f} dB" if psnr is not None else ""
        lines += ["", f"Left of the slider: its {OP_NAMES[twin_meta['op']]} twin "
                      f"({result.twin}{score}), **{result.twin_seconds:.2f} s**."]
    return "\n".join(lines)


def handler(up):
    """The ``/upscale`` endpoint on the :class:`Upscaler` ``up``.

    ``(image, weights=None, tile=0, compare="bicubic", scale=None, precision=None) ->
    (upscaled_png, (other_png, upscaled_png), stats_markdown)`` (``scale``: one the weights
    were trained for; None: their recorded one; ``precision``: "int8" or "fp32"; None: int8
    where calibrated, else fp32); Gradio's progress bar follows the tiles, a request whose
    client has gone stops at its next tile, and a refusal is raised as ``gr.Error``.
    """
    def upscale(image, weights=None, tile=0, compare=BICUBIC, scale=None, precision=None,
                progress=gr.Progress()):
        def report(done, total, what):
            progress((done, total), desc=what, unit="tiles")

        with _shown():
            try:
                result = up.upscale(image, weights, tile, compare, report, _client_gone, scale,
                                    precision)
            except Cancelled:
                raise _refuse("Cancelled: the client disconnected.") from None
        output = str(result.output)
        return output, (str(result.other), output), stats_markdown(up, result)

    return upscale


def _check_uploads(component, up):
    """Wrap ``component.preprocess`` so that an upload that is not an image, or far too
    large to decode, is refused with a clear ``gr.Error`` (read by :mod:`addersr.images`)
    before Gradio opens it. (An instance attribute, not a subclass: Gradio writes a
    ``.pyi`` file beside the source of every Component subclass.)"""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path:
            with _shown():
                up.check_upload(payload.path, payload.orig_name or "the upload")
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


def slider_label(catalogue, name, compare=BICUBIC):
    """The comparison slider's caption: what its left and right halves show."""
    meta = catalogue.weights.get(name)
    right = f"{OP_NAMES.get(meta['op'], meta['op'])} network" if meta else "the network"
    twin = catalogue.twin(name) if compare == TWIN else None
    left = (f"its {OP_NAMES[catalogue.weights[twin]['op']]} twin" if twin
            else "ordinary enlargement (bicubic)")
    return f"Left: {left} · Right: {right} · drag the bar to compare"


def compare_control(catalogue, name, current=BICUBIC, **props):
    """The "Compare with" choice for the weights ``name``: bicubic, and the twin when offered
    (the control is hidden without one). ``props``: more arguments of ``gr.Radio``."""
    twin = catalogue.twin(name)
    choices = [("ordinary enlargement (bicubic)", BICUBIC)]
    if twin:
        op = OP_NAMES[catalogue.weights[twin]["op"]]
        choices.append((f"its {op} twin (runs it too)", TWIN))
    value = current if twin and current in COMPARE else BICUBIC
    return gr.Radio(choices, value=value, visible=twin is not None, **props)


def precision_control(up, name, scale=None, **props):
    """The precision choice for the weights ``name`` at ``scale``: shown, on their default
    (int8), where they run in int8 too; hidden on fp32 otherwise. ``props``: of ``gr.Radio``."""
    served = up.precisions(name, scale) if name in up.catalogue.weights else (FP32,)
    return gr.Radio(PRECISION_CHOICES, value=served[0], visible=len(served) > 1, **props)


def _precision_choice(demo, up, name, scale, weights, page_scale):
    """The precision control for the weights ``name`` at ``scale``, following the page's
    ``weights`` and ``page_scale``, and its hidden copy that the handler reads (None for API
    calls that name none: int8 where calibrated, else fp32), returned."""
    precision = precision_control(up, name, scale, label="Arithmetic", info=INT8_NOTE,
                                  elem_id="precision")
    page_precision = gr.Radio(PRECISION_CHOICES, value=None, visible=False,
                              elem_id="page-precision")
    for event in (weights.change, page_scale.change):  # int8 where calibrated, at its scale
        event(functools.partial(precision_control, up), [weights, page_scale], precision,
              queue=False, api_visibility="private")
    for event in (demo.load, precision.change):
        event(lambda p: p, precision, page_precision, queue=False, api_visibility="private")
    return page_precision


def _ready(up, path, name, what, scale=None):
    """The Upscale button, usable once the picture suits the model at the page's ``scale``
    (errors shown now; the tile size is checked when the button is pressed)."""
    if path is not None:
        with _shown():
            up.check(path, name, compare=what, scale=scale)
    return gr.Button(interactive=path is not None)


def build_demo(weights_dir=None, device="auto", concurrency=1, temp_dir=None):
    """The Gradio Blocks app (queued; ``concurrency`` requests run at once). ``temp_dir``:
    where the :class:`Upscaler` makes its folder (default: the system's temporary folder)."""
    up = Upscaler(weights_dir, device, temp_dir)
    cat = up.catalogue
    scales = cat.scales()
    first = scales[0] if scales else None
    chosen = cat.default(first)
    with gr.Blocks(title="AdderSR", analytics_enabled=False,
                   delete_cache=(KEEP_RESULTS_S, KEEP_RESULTS_S)) as demo:
        gr.Markdown(INTRO.format(limit=limit(scales), tile=TILE))
        if not cat.weights:
            gr.Markdown(f"⚠️ {cat.no_weights_message()}", elem_id="no-weights")
        with gr.Row():
            with gr.Column(scale=2):
                image = _check_uploads(gr.Image(
                    label="Picture to enlarge", type="filepath", image_mode=None,
                    sources=["upload", "clipboard"], format="png", elem_id="input-image"), up)
                scale = gr.Radio([(f"x{s}", str(s)) for s in scales],
                                 value=str(first) if scales else None,
                                 label="Enlargement (times wider and taller)",
                                 visible=len(scales) > 1, elem_id="scale")
                # the scale the page asks for: set from the control once the page has loaded,
                # None for API calls that name none (the weights' recorded scale)
                page_scale = gr.Number(None, precision=0, visible=False, elem_id="page-scale")
                # custom values: the API may name weights of any scale (check() refuses
                # unknown names), not only those listed for the first scale
                weights = gr.Dropdown(cat.choices(first), value=chosen, label="Model",
                                      allow_custom_value=True, elem_id="weights")
                note = gr.Markdown(quality_note(cat, chosen, first), elem_id="model-note")
                compare = compare_control(cat, chosen, label="Compare the result with",
                                          elem_id="compare")
                page_precision = _precision_choice(demo, up, chosen, first, weights, page_scale)
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
                slider = gr.ImageSlider(label=slider_label(cat, chosen),
                                        type="filepath", format="png",
                                        interactive=False, elem_id="comparison")
                stats = gr.Markdown(label="Statistics", elem_id="stats")
                result = gr.File(label="Download the enlarged picture (PNG)",
                                 interactive=False, elem_id="result")

        ready = functools.partial(_ready, up)
        for event in (image.change, weights.change, page_scale.change):  # disable, enable if valid
            event(lambda: gr.Button(interactive=False), None, run, queue=False,
                  api_visibility="private").then(  # queued (errors are shown), never waits
                ready, [image, weights, compare, page_scale], run, concurrency_limit=None,
                api_visibility="private")
        demo.load(lambda s: int(s) if s else None, scale, page_scale, queue=False,
                  api_visibility="private")
        scale.change(lambda s: (gr.Dropdown(choices=cat.choices(s), value=cat.default(s)),
                                int(s) if s else None),
                     inputs=scale, outputs=[weights, page_scale], api_visibility="private")
        for event in (weights.change, page_scale.change):  # the note of the chosen scale
            event(functools.partial(quality_note, cat), [weights, page_scale], note, queue=False,
                  api_visibility="private")
        weights.change(functools.partial(compare_control, cat), [weights, compare], compare,
                       queue=False, api_visibility="private")
        for event in (weights.change, compare.change):
            event(lambda name, what: gr.ImageSlider(label=slider_label(cat, name, what)),
                  [weights, compare], slider, queue=False, api_visibility="private")
        run.click(lambda: gr.Button(interactive=False), None, run, queue=False,
                  api_visibility="private").then(
            handler(up), inputs=[image, weights, tile, compare, page_scale, page_precision],
            outputs=[result, slider, stats], api_name="upscale").then(
            ready, [image, weights, compare, page_scale], run, concurrency_limit=None,
            api_visibility="private")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=concurrency)
    demo.upscaler = up  # the service, for callers that want it without a server
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
    keep_freed_memory()  # before the server's threads start: requests reuse their memory
    # One temporary folder for everything this server writes: Gradio's uploads and copies
    # of results (unless GRADIO_TEMP_DIR is set) and the upscaler's results and examples.
    temp = tempfile.mkdtemp(prefix="addersr-app-")
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(temp, "gradio"))
    signal.signal(signal.SIGTERM, _stop)  # Ctrl-C's way out, so that the folder goes too
    try:
        demo = build_demo(args.weights_dir, args.device, args.concurrency, temp_dir=temp)
        up = demo.upscaler
        if up.catalogue.default():  # load the default model while the server starts
            threading.Thread(target=_preload, args=(up, up.catalogue.default()),
                             daemon=True).start()
        else:
            print(up.catalogue.no_weights_message())
        launch(demo, args.host, args.port, args.share)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _preload(up, name):
    """Load the weights ``name`` before the first request; bad ones are reported when loaded."""
    try:
        up.model(name)
    except Refused:
        pass  # the upscaler printed why; requests for these weights get the page's message


def _stop(signum, frame):
    """SIGTERM: stop as Ctrl-C does (the server closes, then the temporary folder goes)."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
