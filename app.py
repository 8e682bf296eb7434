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

import gradio as gr  # noqa: E402

from addersr.demo import Cancelled, Refused, Upscaler  # noqa: E402
from addersr.demo.catalogue import (OP_NAMES, bicubic_set5, is_preview, set5_gain,  # noqa: E402
                                    set5_psnr, weights_label)
from addersr.demo.checks import BICUBIC, COMPARE, TILE, TWIN, limit  # noqa: E402
from addersr.demo.service import EXAMPLE_REDUCTION, KEEP_RESULTS_S, example_images  # noqa: E402
from addersr.inference import MIN_TILE  # noqa: E402

MAX_UPLOAD = "64mb"
QUEUE_SIZE = 64  # requests that may wait in the queue


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


def quality_note(catalogue, name):
    """A sentence for the page on what quality to expect from the weights ``name`` of
    ``catalogue`` ("" when there are none)."""
    meta = catalogue.weights.get(name)
    if meta is None:
        return ""
    psnr = set5_psnr(meta)
    if psnr is None:
        return "No quality score is recorded for this model."
    scale = int(meta["scale"])
    scores = (f"on the Set5 test pictures at x{scale} it scores {psnr:.2f} dB, "
              f"{set5_gain(meta):+.2f} dB compared with ordinary bicubic enlargement "
              f"({bicubic_set5(scale):.2f} dB; higher is better)")
    if is_preview(meta):
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
    lines = [
        f"**{weights_label(name, meta)}** on {up.device}: **{result.seconds:.2f} s**{tiles}",
        "",
        f"{in_w}x{in_h} → **{out_w}x{out_h}** ({result.kind}, x{meta['scale']})",
        "",
        f"| for this image | {op} (this model) | {twin_op} twin |",
        "|---|---:|---:|",
        f"| multiplications | {_count(own['mults'])} | {_count(twin['mults'])} |",
        f"| additions | {_count(own['adds'])} | {_count(twin['adds'])} |",
        f"| estimated energy (45 nm) | {_energy(own['energy_pj'])} | "
        f"{_energy(twin['energy_pj'])} |",
    ]
    if own["energy_pj"] > 0 and twin["energy_pj"] > 0:
        ratio = twin["energy_pj"] / own["energy_pj"]
        lines += ["", f"Energy ratio {twin_op} / {op}: **{ratio:.2f}x**"
                  " (FP32: multiply 3.7 pJ, add 0.9 pJ; an adder op is two additions)."]
    if result.twin:
        twin_meta = up.catalogue.weights[result.twin]
        psnr = set5_psnr(twin_meta)
        score = f", Set5 {psnr:.2f} dB" if psnr is not None else ""
        lines += ["", f"Left of the slider: its {OP_NAMES[twin_meta['op']]} twin "
                      f"({result.twin}{score}), **{result.twin_seconds:.2f} s**."]
    return "\n".join(lines)


def handler(up):
    """The ``/upscale`` endpoint on the :class:`Upscaler` ``up``.

    ``(image, weights=None, tile=0, compare="bicubic") -> (upscaled_png, (other_png,
    upscaled_png), stats_markdown)``; Gradio's progress bar follows the tiles, a request
    whose client has gone stops at its next tile, and a refusal is raised as ``gr.Error``.
    """
    def upscale(image, weights=None, tile=0, compare=BICUBIC, progress=gr.Progress()):
        def report(done, total, what):
            progress((done, total), desc=what, unit="tiles")

        with _shown():
            try:
                result = up.upscale(image, weights, tile, compare, report, _client_gone)
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


def _ready(up, path, name, what):
    """The Upscale button, usable once the picture suits the model (errors shown now; the
    tile size is checked when the button is pressed)."""
    if path is not None:
        with _shown():
            up.check(path, name, compare=what)
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
                # custom values: the API may name weights of any scale (check() refuses
                # unknown names), not only those listed for the first scale
                weights = gr.Dropdown(cat.choices(first), value=chosen, label="Model",
                                      allow_custom_value=True, elem_id="weights")
                note = gr.Markdown(quality_note(cat, chosen), elem_id="model-note")
                compare = compare_control(cat, chosen, label="Compare the result with",
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
                slider = gr.ImageSlider(label=slider_label(cat, chosen),
                                        type="filepath", format="png",
                                        interactive=False, elem_id="comparison")
                stats = gr.Markdown(label="Statistics", elem_id="stats")
                result = gr.File(label="Download the enlarged picture (PNG)",
                                 interactive=False, elem_id="result")

        ready = functools.partial(_ready, up)
        for event in (image.change, weights.change):  # disable at once, enable if valid
            event(lambda: gr.Button(interactive=False), None, run, queue=False,
                  api_visibility="private").then(  # queued (errors are shown), never waits
                ready, [image, weights, compare], run, concurrency_limit=None,
                api_visibility="private")
        scale.change(lambda s: gr.Dropdown(choices=cat.choices(s), value=cat.default(s)),
                     inputs=scale, outputs=weights, api_visibility="private")
        weights.change(functools.partial(quality_note, cat), weights, note, queue=False,
                       api_visibility="private")
        weights.change(functools.partial(compare_control, cat), [weights, compare], compare,
                       queue=False, api_visibility="private")
        for event in (weights.change, compare.change):
            event(lambda name, what: gr.ImageSlider(label=slider_label(cat, name, what)),
                  [weights, compare], slider, queue=False, api_visibility="private")
        run.click(lambda: gr.Button(interactive=False), None, run, queue=False,
                  api_visibility="private").then(
            handler(up), inputs=[image, weights, tile, compare], outputs=[result, slider, stats],
            api_name="upscale").then(
            ready, [image, weights, compare], run, concurrency_limit=None,
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
    # One temporary folder for everything this server writes: Gradio's uploads and copies
    # of results (unless GRADIO_TEMP_DIR is set) and the upscaler's results and examples.
    temp = tempfile.mkdtemp(prefix="addersr-app-")
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(temp, "gradio"))
    signal.signal(signal.SIGTERM, _stop)  # Ctrl-C's way out, so that the folder goes too
    try:
        demo = build_demo(args.weights_dir, args.device, args.concurrency, temp_dir=temp)
        up = demo.upscaler
        if up.catalogue.default():  # load the default model while the server starts
            threading.Thread(target=up.model, args=(up.catalogue.default(),),
                             daemon=True).start()
        else:
            print(up.catalogue.no_weights_message())
        launch(demo, args.host, args.port, args.share)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _stop(signum, frame):
    """SIGTERM: stop as Ctrl-C does (the server closes, then the temporary folder goes)."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
