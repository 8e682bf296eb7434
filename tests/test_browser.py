"""The demo in a real browser: Debian's chromium, driven by Playwright, uploads an image,
clicks Upscale and reads the comparison slider's images.

Skips when /usr/bin/chromium is missing (``.ci/run`` installs it). A screenshot is always
written to a temporary folder; with ADDERSR_SCREENSHOT=1 it is also written to
``docs/app.png`` for the README, using the shipped weights when there are any.
"""

import os
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


@pytest.fixture
def served(tmp_path):
    from addersr import models

    screenshot = bool(os.environ.get("ADDERSR_SCREENSHOT"))
    weights = None if screenshot and models.list_weights() else make_weights(tmp_path / "w", metrics=False)
    demo = app.build_demo(weights_dir=weights, device="cpu")
    port = free_port()
    app.launch(demo, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", demo.upscaler
    demo.close()


def test_upload_upscale_compare(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, upscaler = served
    # a Set5 image, halved: the kind of input the demo is for
    with Image.open(ROOT / "addersr" / "assets" / "Set5" / "butterfly.png") as im:
        lr = im.convert("RGB").resize((128, 128), Image.BICUBIC)
    lr.save(tmp_path / "butterfly_lr.png")
    scale = int(upscaler.weights[upscaler.default()]["scale"])

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
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
        finally:
            browser.close()

    assert sizes and all(s == [128 * scale, 128 * scale] for s in sizes), sizes
    assert f"{128 * scale}x{128 * scale}" in stats
    (tmp_path / "fetched.png").write_bytes(body)
    with Image.open(tmp_path / "fetched.png") as shown:
        assert shown.size == (128 * scale, 128 * scale)
        assert np.asarray(shown).std() > 0  # a real picture, not a blank
