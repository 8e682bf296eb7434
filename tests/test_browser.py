"""The demo in a real browser: Debian's chromium, driven by Playwright, uploads an image,
clicks Upscale and reads the comparison slider's images.

Skips when /usr/bin/chromium is missing (``.ci/run`` installs it). A screenshot is always
written to a temporary folder; with ADDERSR_SCREENSHOT=1 it is also written to
``docs/app.png`` for the README, using the shipped weights when there are any.
"""

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_app import app, free_port, make_weights

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"Debian's chromium is not installed at {CHROMIUM} "
                              "(apt-get install chromium; .ci/run does it)"),
]


@contextlib.contextmanager
def _page(url):
    """A page of headless chromium opened at ``url``; the browser is closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            yield page
        finally:
            browser.close()


@pytest.fixture
def served(tmp_path, request):
    """The demo on a free port: on test weights, or for the README's screenshot
    (ADDERSR_SCREENSHOT=1, the test that takes it) on the shipped ones."""
    from addersr import models

    screenshot = bool(os.environ.get("ADDERSR_SCREENSHOT")) and request.node.name == "test_upload_upscale_compare"
    weights = None if screenshot and models.list_weights() else make_weights(tmp_path / "w")
    demo = app.build_demo(weights_dir=weights, device="cpu")
    port = free_port()
    app.launch(demo, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", demo.upscaler
    demo.close()


def test_upload_upscale_compare(served, tmp_path):
    url, upscaler = served
    # a Set5 image, halved: the kind of input the demo is for
    with Image.open(ROOT / "addersr" / "assets" / "Set5" / "butterfly.png") as im:
        lr = im.convert("RGB").resize((128, 128), Image.BICUBIC)
    lr.save(tmp_path / "butterfly_lr.png")
    scale = int(upscaler.catalogue.weights[upscaler.catalogue.default()]["scale"])

    with _page(url) as page:
        page.locator("#input-image input[type=file]").set_input_files(
            str(tmp_path / "butterfly_lr.png"))
        page.wait_for_selector("#input-image img", timeout=30_000)
        page.click("#upscale-button")
        page.wait_for_function(
            """() => {
                const imgs = [...document.querySelectorAll('#comparison img')];
                return imgs.length >= 2 && imgs.every(i => i.complete && i.naturalWidth > 0);
            }""", timeout=120_000)
        sizes = page.eval_on_selector_all(
            "#comparison img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        stats = page.inner_text("#stats")
        # the displayed PNG itself, fetched from the page's own URL
        src = page.eval_on_selector_all("#comparison img", "els => els.map(e => e.src)")[-1]
        body = page.request.get(src).body()
        page.wait_for_timeout(500)  # let the slider settle before the picture
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        if os.environ.get("ADDERSR_SCREENSHOT"):
            (ROOT / "docs").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "docs" / "app.png"), full_page=True)

    assert sizes and all(s == [128 * scale, 128 * scale] for s in sizes), sizes
    assert f"{128 * scale}x{128 * scale}" in stats
    (tmp_path / "fetched.png").write_bytes(body)
    with Image.open(tmp_path / "fetched.png") as shown:
        assert shown.size == (128 * scale, 128 * scale)
        assert np.asarray(shown).std() > 0  # a real picture, not a blank


def test_page_checks_uploads_labels_and_busy_button(served, tmp_path, monkeypatch):
    """The page fixes: no one-choice scale control, limits for the shipped scales, labelled
    slider halves, a preview model said to be one, a non-image refused on upload, the
    button off while a request runs, and the result shown once (plus a download)."""
    url, upscaler = served
    name = upscaler.catalogue.default()
    scale = int(upscaler.catalogue.weights[name]["scale"])
    model = upscaler.model(name)
    forward = model.forward

    def slow_forward(x):  # time to see the button while the request runs
        time.sleep(2)
        return forward(x)

    monkeypatch.setattr(model, "forward", slow_forward)  # undone after the test
    (tmp_path / "notes.png").write_bytes(b"my shopping list, not a picture")
    Image.new("RGB", (40, 30), (50, 100, 150)).save(tmp_path / "ok.png")
    button = "document.querySelector('#upscale-button').disabled"
    with _page(url) as page:
        page.wait_for_selector("#upscale-button", timeout=60_000)
        text = page.inner_text("body")
        assert page.is_disabled("#upscale-button")  # nothing to upscale yet
        assert not page.locator("#scale").is_visible()  # one scale: nothing to choose
        assert f"at x{scale})" in text and "x4" not in text
        slider = page.inner_text("#comparison")
        assert "Left: ordinary enlargement (bicubic)" in slider and "Right: AdderSR" in slider
        note = page.inner_text("#model-note")
        if app.is_preview(upscaler.catalogue.weights[name]):  # the shipped model's own note
            assert "Preview model, at about bicubic quality" in note
        else:
            assert note.startswith("Quality:") and "Preview" not in note

        page.locator("#input-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))
        page.wait_for_selector("text=notes.png is not an image this app can read",
                               timeout=30_000)  # refused before Upscale is pressed
        assert page.is_disabled("#upscale-button")

        page.locator("#input-image input[type=file]").set_input_files(str(tmp_path / "ok.png"))
        page.wait_for_function(f"() => !{button}", timeout=30_000)
        page.click("#upscale-button")
        page.wait_for_function(f"() => {button}", timeout=10_000)  # off while it runs
        page.wait_for_function(
            """() => [...document.querySelectorAll('#comparison img')]
                     .filter(i => i.complete && i.naturalWidth > 0).length >= 2""",
            timeout=120_000)
        page.wait_for_function(f"() => !{button}", timeout=30_000)  # on again
        shown = page.eval_on_selector_all(
            "img", f"els => els.filter(e => e.naturalWidth == {40 * scale}).length")
        label = page.inner_text("#result")
        links = page.eval_on_selector_all("#result a",
                                          "els => els.map(e => decodeURIComponent(e.href))")
    assert shown == 2  # bicubic and the result, both in the slider; no second copy
    assert "Download" in label and any(u.endswith(f"ok_x{scale}_{name}.png") for u in links), links


def _upscale_on_page(page, path, done):
    """Upload ``path``, press Upscale once it is allowed, and return the statistics once they
    include the text ``done``."""
    page.locator("#input-image input[type=file]").set_input_files(str(path))
    page.wait_for_function("() => !document.querySelector('#upscale-button').disabled",
                           timeout=30_000)
    page.click("#upscale-button")
    page.wait_for_function(f"() => document.querySelector('#stats').innerText.includes({done!r})",
                           timeout=120_000)
    return page.inner_text("#stats")


def test_compare_with_the_cnn_twin_on_the_page(served, tmp_path):
    """Choosing the twin renames the slider's halves and shows the twin's result on the left."""
    url, upscaler = served
    name = upscaler.catalogue.default()
    twin = upscaler.catalogue.twin(name)
    if twin is None:
        pytest.skip("the weights offered have no CNN twin of the default model")
    scale = int(upscaler.catalogue.weights[name]["scale"])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        tmp_path / "ok.png")
    with _page(url) as page:
        page.wait_for_selector("#compare", timeout=60_000)
        page.locator("#compare").get_by_text("its CNN twin").click()
        page.wait_for_function(
            "() => document.querySelector('#comparison').innerText.includes('its CNN twin')",
            timeout=30_000)
        stats = _upscale_on_page(page, tmp_path / "ok.png", "Left of the slider")
        srcs = page.eval_on_selector_all("#comparison img", "els => els.map(e => e.src)")
    assert f"{40 * scale}x{30 * scale}" in stats and twin in stats
    assert any(f"ok_x{scale}_{twin}.png" in s for s in srcs), srcs


def test_scale_control_serves_multi_scale_weights(tmp_path):
    """Weights trained for x2, x3 and x4 (multi-scale VDSR) beside x2-only ones: choosing x3
    on the page lists them at x3 with their x3 score and upscales three times."""
    from addersr import models
    from addersr.demo import catalogue

    folder = make_weights(tmp_path / "w")
    psnr = {str(s): {"Set5": {"psnr": catalogue.bicubic_set5(s) + 2.5}} for s in (2, 3, 4)}
    models.save(models.build("vdsr", 2, op="adder", depth=3, n_feats=8), folder / "ms",
                {"scales": [2, 3, 4], "metrics": psnr["2"], "metrics_by_scale": psnr})
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        tmp_path / "ok.png")
    demo = app.build_demo(weights_dir=folder, device="cpu")
    port = free_port()
    app.launch(demo, port=port, block=False)
    try:
        with _page(f"http://127.0.0.1:{port}/") as page:
            page.wait_for_selector("#scale", timeout=60_000)
            page.locator("#scale label", has_text="x3").click()
            page.wait_for_function(  # the x3 score of the only x3 weights
                "() => document.querySelector('#model-note').innerText.includes('at x3 it scores')",
                timeout=30_000)
            note = page.inner_text("#model-note")
            stats = _upscale_on_page(page, tmp_path / "ok.png", "90x60")
    finally:
        demo.close()
    assert f"{psnr['3']['Set5']['psnr']:.2f} dB, +2.50 dB" in note
    assert "vdsr x3" in stats and "(ms)" in stats and "x3)" in stats


def test_precision_choice_on_the_shipped_weights(tmp_path):
    """The shipped calibrated adder model opens on int8 with its sentence; fp32 can be chosen,
    the statistics say which ran; a CNN hides the choice."""
    from addersr import models

    if not any(w.with_suffix("").name == "edsr-small-x2-adder-cpu" for w, _ in models.list_weights()):
        pytest.skip("the shipped weights are not here")
    demo = app.build_demo(weights_dir=ROOT / "weights", device="cpu")
    port = free_port()
    app.launch(demo, port=port, block=False)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        tmp_path / "ok.png")
    try:
        with _page(f"http://127.0.0.1:{port}/") as page:
            page.wait_for_selector("#precision", timeout=60_000)
            assert app.INT8_NOTE in page.inner_text("#precision")
            int8 = _upscale_on_page(page, tmp_path / "ok.png", "(int8)")
            page.locator("#precision label", has_text="32-bit float").click()
            page.click("#upscale-button")
            page.wait_for_function(
                "() => document.querySelector('#stats').innerText.includes('(fp32)')",
                timeout=120_000)
            fp32 = page.inner_text("#stats")
            page.locator("#weights input").click()
            page.get_by_role("option", name="edsr-small-x2-conv-cpu", exact=False).click()
            page.wait_for_function("() => !document.querySelector('#precision') || "
                                   "document.querySelector('#precision').offsetParent === null",
                                   timeout=30_000)
    finally:
        demo.close()
    assert "8-bit adder layers (int8)" in int8 and "INT8 add 0.03 pJ" in int8
    assert "32-bit float (fp32)" in fp32 and "INT8" not in fp32
