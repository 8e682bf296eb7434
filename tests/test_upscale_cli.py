"""``python -m addersr.upscale`` and its image reading/writing (16-bit PNG and TIFF)."""

import errno
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
import torch
from PIL import Image

from addersr import models
from addersr.images import load_image, save_png
from addersr.upscale import main, output_name


def _png16(array, filters, height=None):
    """A 16-bit colour PNG whose row y uses filter ``filters[y % len(filters)]``.

    Built byte by byte (pypng's writer uses filter 0 only, while libpng-style encoders use
    all five). Filtering is computed forwards from the raw bytes. ``height`` overrides the
    header's row count (a damaged file).
    """
    h, w, c = array.shape
    raw = np.ascontiguousarray(array, dtype=">u2").view(np.uint8).reshape(h, -1).astype(np.int32)
    bpp = 2 * c
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    upleft = np.zeros_like(raw)
    upleft[1:, bpp:] = raw[:-1, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    preds = [np.zeros_like(raw), left, up, (left + up) // 2, paeth]
    rows = []
    for y in range(h):
        kind = filters[y % len(filters)]
        rows.append(bytes([kind]) + ((raw[y] - preds[kind][y]) % 256).astype(np.uint8).tobytes())
    colour = {3: 2, 4: 6}[c]
    ihdr = struct.pack(">IIBBBBB", w, height or h, 16, colour, 0, 0, 0)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def _random16(shape, seed):
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


@pytest.mark.parametrize("channels", [3, 4])
def test_png16_with_all_row_filters_reads_exactly(tmp_path, channels):
    rng = np.random.default_rng(channels)
    # smooth ramps plus noise, so the filters see both small and large differences
    ramp = np.linspace(0, 60000, 23)[None, :, None] + np.linspace(0, 5000, 17)[:, None, None]
    array = np.clip(ramp + rng.integers(0, 5000, (17, 23, channels)), 0, 65535).astype(np.uint16)
    path = tmp_path / "filtered.png"
    path.write_bytes(_png16(array, filters=[0, 1, 2, 3, 4, 4, 3, 2, 1]))
    got = load_image(path)
    assert got.dtype == np.uint16 and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    # Pillow decodes the same file independently (reducing it to the high bytes)
    with Image.open(path) as pil:
        np.testing.assert_array_equal(np.asarray(pil.convert("RGBA" if channels == 4 else "RGB")),
                                      (array >> 8).astype(np.uint8))


@pytest.mark.parametrize("shape", [(9, 14, 3), (9, 14, 4), (8, 11)])
def test_png16_save_load_roundtrip_is_lossless(tmp_path, shape):
    array = _random16(shape, 1)
    path = save_png(array, tmp_path / "w.png")
    got = load_image(path)
    if array.ndim == 2:  # 16-bit gray comes back as a Pillow I;16 image
        assert got.mode == "I;16"
    else:  # 16-bit colour as a uint16 array
        assert isinstance(got, np.ndarray)
    got = np.asarray(got)
    assert got.dtype == np.uint16 and got.shape == shape
    np.testing.assert_array_equal(got, array)
    with Image.open(path) as pil:  # a valid PNG for another decoder: Pillow keeps the high bytes
        assert pil.size == (shape[1], shape[0])
        if array.ndim == 3:
            np.testing.assert_array_equal(np.asarray(pil), (array >> 8).astype(np.uint8))


def test_png_compress_level_changes_the_size_not_the_pixels(tmp_path):
    smooth = np.kron(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8),
                     np.ones((8, 8, 1), np.uint8))
    fast, small = save_png(smooth, tmp_path / "f.png", 1), save_png(smooth, tmp_path / "s.png", 9)
    for path in (fast, small):
        np.testing.assert_array_equal(np.asarray(load_image(path)), smooth)
    assert fast.stat().st_size > small.stat().st_size


def test_png16_gray_crosschecked_with_pillow(tmp_path):
    """16-bit gray both ways: Pillow's (filtered) file read by us, ours read by Pillow."""
    gray = _random16((13, 10), 6)
    Image.fromarray(gray).save(tmp_path / "pillow.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "pillow.png")), gray)
    save_png(gray, tmp_path / "ours.png")
    with Image.open(tmp_path / "ours.png") as pil:
        assert pil.mode in ("I;16", "I")
        np.testing.assert_array_equal(np.asarray(pil).astype(np.int64), gray)
    # gray+alpha 16-bit is written too: Pillow reads it (as 8-bit) with the high bytes
    la = _random16((5, 6, 2), 7)
    save_png(la, tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as pil:
        rgba = np.asarray(pil.convert("RGBA"))
    np.testing.assert_array_equal(rgba[..., 0], la[..., 0] >> 8)
    np.testing.assert_array_equal(rgba[..., 3], la[..., 1] >> 8)


@pytest.mark.parametrize("settings", [
    {"interlace": True},
    {"compression": 0, "chunk_limit": 64},  # stored, many IDAT chunks
    {"compression": 9, "gamma": 0.45455, "background": (1000, 2000, 3000)},
    {"transparent": (0, 0, 0)},  # tRNS: the stored samples come back, no alpha added
    {"alpha": True, "interlace": True},
])
def test_png16_written_by_pypng_reads_back(tmp_path, settings):
    alpha = settings.pop("alpha", False)
    array = _random16((7, 10, 4 if alpha else 3), 8)
    array[0, 0, :3] = 0  # one pixel of the tRNS colour
    writer = png.Writer(10, 7, greyscale=False, alpha=alpha, bitdepth=16, **settings)
    with open(tmp_path / "p.png", "wb") as f:
        writer.write(f, array.reshape(7, -1).tolist())
    got = load_image(tmp_path / "p.png")
    assert isinstance(got, np.ndarray) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, array)


def test_png16_with_sbit_keeps_full_range(tmp_path):
    """A 12-bit image stored in 16 bits (sBIT chunk) reads as full-range 16-bit values."""
    array = np.random.default_rng(9).integers(0, 4096, (6, 5, 3), dtype=np.uint16)
    writer = png.Writer(5, 6, greyscale=False, bitdepth=12)  # scales to 16 bits + sBIT
    with open(tmp_path / "s.png", "wb") as f:
        writer.write(f, array.reshape(6, -1).tolist())
    got = load_image(tmp_path / "s.png")
    assert got.dtype == np.uint16 and got.max() > 4095
    np.testing.assert_array_equal(got >> 4, array)
    with Image.open(tmp_path / "s.png") as pil:
        np.testing.assert_array_equal(np.asarray(pil), (got >> 8).astype(np.uint8))


def test_tiff16_colour_contiguous_and_planar(tmp_path):
    array = np.random.default_rng(2).integers(0, 65536, (11, 7, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", array, photometric="rgb")
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(array, -1, 0), photometric="rgb",
                     planarconfig="separate")
    for name in ("c.tif", "p.tif"):
        got = load_image(tmp_path / name)
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, array)


def test_load_image_modes(tmp_path):
    gray16 = np.random.default_rng(3).integers(0, 65536, (6, 5), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(img), gray16)
    Image.new("P", (4, 3)).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    Image.new("1", (4, 3)).save(tmp_path / "b.bmp")
    assert load_image(tmp_path / "b.bmp").mode == "L"
    Image.new("CMYK", (4, 3)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg").mode == "RGB"
    # EXIF orientation 6 (rotate 90 degrees clockwise) is applied
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 3)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (3, 8)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    # damaged 16-bit colour PNGs: cut short, a flipped byte (CRC), fewer rows than promised
    data = _png16(_random16((20, 30, 3), 10), filters=[4])
    (tmp_path / "cut16.png").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[60] ^= 0xFF
    (tmp_path / "crc16.png").write_bytes(bytes(flipped))
    (tmp_path / "short16.png").write_bytes(_png16(_random16((20, 30, 3), 10), [1], height=25))
    for name in ("cut16.png", "crc16.png"):
        with pytest.raises(ValueError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(ValueError, match=r"short16\.png.*20 rows.*says 25"):
        load_image(tmp_path / "short16.png")


def test_output_name():
    assert output_name("/a/b/photo.final.JPG", 3) == "photo.final_x3.png"


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A small random-weight edsr-baseline x2 adder model saved as NAME.safetensors/.json."""
    torch.manual_seed(0)
    model = models.build("edsr-baseline", 2, op="adder", n_blocks=1, n_feats=8)
    stem = tmp_path_factory.mktemp("weights") / "tiny_x2"
    models.save(model, stem, {"note": "random test weights"})
    return stem.with_suffix(".safetensors")


def _expected(weights, rgb_uint8):
    """The model applied directly: uint8 RGB (round of the clamped [0, 1] output)."""
    model = models.load(weights)
    x = torch.from_numpy(rgb_uint8).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return np.rint(y * 255).astype(np.int16)


def test_cli_files_folders_globs_and_failures(tmp_path, tiny_weights, capsys):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    (src / "folder").mkdir(parents=True)
    a = rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)
    Image.fromarray(a).save(src / "a.png")
    Image.fromarray(rng.integers(0, 256, (7, 9), dtype=np.uint8)).save(src / "folder" / "g.bmp")
    Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)).save(src / "folder" / "t.webp",
                                                                         lossless=True)
    Image.fromarray(rng.integers(0, 256, (5, 8, 3), dtype=np.uint8)).save(src / "glob1.jpg")
    (src / "folder" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rgb16 = rng.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    save_png(rgb16, src / "deep.png")
    out = tmp_path / "out"
    status = main([str(src / "a.png"), str(src / "folder"), str(src / "glob*.jpg"),
                   str(src / "deep.png"), str(src / "missing.png"), "-o", str(out),
                   "--weights", str(tiny_weights), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1
    assert "broken.png" in err and "missing.png" in err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_x2.png", "deep_x2.png", "g_x2.png", "glob1_x2.png", "t_x2.png"]
    with Image.open(out / "a_x2.png") as im:
        assert im.size == (26, 20) and im.mode == "RGB"
        got = np.asarray(im).astype(np.int16)
    assert np.abs(got - _expected(tiny_weights, a)).max() <= 1
    with Image.open(out / "g_x2.png") as im:
        assert im.size == (18, 14) and im.mode == "L"
    with Image.open(out / "t_x2.png") as im:
        assert im.size == (10, 12) and im.mode == "RGBA"
    deep = load_image(out / "deep_x2.png")
    assert deep.dtype == np.uint16 and deep.shape == (12, 14, 3)


def test_cli_never_overwrites_inputs(tmp_path, tiny_weights, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (6, 6), (1, 2, 3)).save(folder / "b.png")
    Image.new("RGB", (5, 5), (9, 9, 9)).save(folder / "b_x2.png")  # = b.png's output name
    before = (folder / "b_x2.png").read_bytes()
    status = main([str(folder), "-o", str(folder), "--weights", str(tiny_weights), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1 and "overwrite" in err
    assert (folder / "b_x2.png").read_bytes() == before
    assert (folder / "b_x2_x2.png").is_file()  # the other input was processed


def test_cli_tiled_equals_whole(tmp_path, tiny_weights):
    img = np.random.default_rng(5).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    for tile, out in ((0, "whole"), (64, "tiled")):
        assert main([str(tmp_path / "x.png"), "-o", str(tmp_path / out), "--tile", str(tile),
                     "--weights", str(tiny_weights), "--device", "cpu"]) == 0
    whole = np.asarray(Image.open(tmp_path / "whole" / "x_x2.png"))
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "x_x2.png"))
    np.testing.assert_array_equal(whole, tiled)


def test_cli_shows_progress_per_tile(tmp_path, tiny_weights, capsys):
    Image.new("RGB", (130, 129), (30, 60, 90)).save(tmp_path / "big.png")
    assert main([str(tmp_path / "big.png"), "-o", str(tmp_path / "o"), "--tile", "64",
                 "--weights", str(tiny_weights), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    bars = [line for line in err.split("\r") if line.startswith("big.png")]
    assert any(" 9/9 [" in bar and "tile/s" in bar for bar in bars), bars  # 3 x 3 tiles
    assert any(re.search(r" 1/9 \[\d+:\d+<\d+:\d+", bar) for bar in bars), bars  # time left


def _one_line_error(err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err


def test_cli_refuses_tiles_below_the_floor(tmp_path, tiny_weights, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    for tile in ("1", "63", "-2"):
        assert main([str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--tile", tile,
                     "--weights", str(tiny_weights), "--device", "cpu"]) == 2
        _one_line_error(capsys.readouterr().err, "--tile", "at least 64")
    assert not (tmp_path / "o").exists()


def test_cli_max_pixels(tmp_path, tiny_weights, capsys):
    Image.new("RGB", (20, 15)).save(tmp_path / "x.png")  # 40 x 30 = 1200 output pixels
    args = [str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights),
            "--device", "cpu"]
    assert main(args + ["--max-pixels", "1000"]) == 1
    err = capsys.readouterr().err
    assert "x.png: 20x15 at x2 would give a 40x30 image" in err and "--max-pixels" in err
    assert not (tmp_path / "o" / "x_x2.png").exists()
    assert main(args + ["--max-pixels", "1.2e3"]) == 0
    assert (tmp_path / "o" / "x_x2.png").is_file()
    with pytest.raises(SystemExit) as exc:
        main(args + ["--max-pixels", "lots"])
    assert exc.value.code == 2 and "positive number of pixels" in capsys.readouterr().err


@pytest.fixture
def unwritable(monkeypatch):
    """Make files impossible to create in a folder, as a read-only folder does (simulated at
    ``os.open``: chmod does not stop root)."""
    folders = []
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if Path(path).parent in folders and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return folders


def test_cli_checks_the_output_folder_before_any_work(tmp_path, tiny_weights, capsys,
                                                      monkeypatch, unwritable):
    Image.new("RGB", (6, 5)).save(tmp_path / "in.png")
    (tmp_path / "file.txt").write_text("not a folder")
    ran = []
    monkeypatch.setattr("addersr.upscale.upscale", lambda *a, **k: ran.append(a))
    locked = tmp_path / "locked"
    locked.mkdir()
    unwritable.append(locked)
    cases = [(tmp_path / "file.txt", "exists and is not a folder"),  # was FileExistsError
             (tmp_path / "file.txt" / "sub", "cannot create the folder"),  # was OSError
             (locked, "cannot write in")]
    for out, message in cases:
        assert main([str(tmp_path / "in.png"), "-o", str(out), "--weights", str(tiny_weights),
                     "--device", "cpu"]) == 2
        _one_line_error(capsys.readouterr().err, message, str(out))
    assert ran == [] and list(locked.iterdir()) == []


def test_cli_full_disk_leaves_no_partial_file(tmp_path, tiny_weights, capsys, monkeypatch):
    """A write that fails half-way (a full disk) leaves the previous file intact and no
    temporary file behind, and stops the batch: no later file could be written either."""
    for name in ("a", "b"):
        save_png(_random16((6, 7, 3), 11), tmp_path / f"{name}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x2.png").write_bytes(b"previous result")

    def full_disk(self, f, rows):
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # some bytes reach the disk, then:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(png.Writer, "write_packed", full_disk)
    status = main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out),
                   "--weights", str(tiny_weights), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1
    assert "cannot write" in err and "No space left on device" in err and "stopping" in err
    assert "Traceback" not in err and "2 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.png"]  # no b_x2.png, no temp file
    assert (out / "a_x2.png").read_bytes() == b"previous result"


def test_save_png_is_atomic(tmp_path, monkeypatch):
    """Interrupted while writing (Ctrl-C here), save_png leaves the old file as it was."""
    target = tmp_path / "x.png"
    save_png(np.zeros((4, 4, 3), np.uint8), target)
    before = target.read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(np.ones((4, 4, 3), np.uint8), target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_cli_bad_arguments(tmp_path, tiny_weights, capsys):
    assert main([str(tmp_path / "none*.png"), "-o", str(tmp_path / "o"),
                 "--weights", str(tiny_weights)]) == 2
    assert "no input images" in capsys.readouterr().err
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    assert main([str(tmp_path / "x.png"), "-o", str(tmp_path / "o"),
                 "--weights", str(tmp_path / "absent.safetensors")]) == 2
    assert "absent" in capsys.readouterr().err


def test_module_entry_point(tmp_path, tiny_weights):
    """``python -m addersr.upscale`` as a user runs it: exit status and output file."""
    Image.new("RGB", (5, 4), (200, 100, 50)).save(tmp_path / "in.png")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "addersr.upscale", str(tmp_path / "in.png"),
                           "-o", str(tmp_path / "o"), "--weights", str(tiny_weights)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "o" / "in_x2.png") as im:
        assert im.size == (10, 8)
