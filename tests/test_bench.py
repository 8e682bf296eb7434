"""``python -m addersr.bench``: bicubic on the shipped Set5, a random model, weights files."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from addersr import bench
from addersr.data import read_image
from addersr.data.datasets import ASSETS

FIELDS = {"model", "op", "dataset", "scale", "psnr", "ssim", "lpips", "seconds_per_image",
          "params", "mults", "adds", "energy_mj"}
SET5_PUBLISHED = {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)}


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("ADDERSR_DATA", raising=False)


@pytest.fixture
def tiny_root(tmp_path):
    """A data root with one small dataset (two 48x40 crops of Set5 images)."""
    folder = tmp_path / "data" / "Tiny"
    folder.mkdir(parents=True)
    for name in ("bird", "head"):
        Image.fromarray(read_image(ASSETS / "Set5" / f"{name}.png")[60:108, 50:90]).save(folder / f"{name}.png")
    return tmp_path / "data"


def test_bicubic_on_shipped_set5(tmp_path, no_env, capsys):
    out = tmp_path / "r.json"
    bench.main(["--model", "bicubic", "--json", str(out), "--csv", str(tmp_path / "r.csv"),
                "--md", str(tmp_path / "r.md"), "--no-lpips"])
    data = json.loads(out.read_text())
    assert data["device"].startswith("cpu")
    rows = data["results"]
    assert [(r["dataset"], r["scale"]) for r in rows] == [("Set5", 2), ("Set5", 3), ("Set5", 4)]
    for r in rows:
        assert FIELDS <= set(r)
        assert r["model"] == "bicubic" and r["params"] is None and r["energy_mj"] is None
        assert abs(r["psnr"] - SET5_PUBLISHED[r["scale"]][0]) <= 0.02
        assert abs(r["ssim"] - SET5_PUBLISHED[r["scale"]][1]) <= 0.001
    with open(tmp_path / "r.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and float(table[0]["psnr"]) == pytest.approx(rows[0]["psnr"])
    printed = capsys.readouterr().out
    cell = f"{rows[0]['psnr']:.2f}/{rows[0]['ssim']:.4f}"
    assert "| x2 | bicubic |" in printed and cell in printed and "Set5" in printed
    assert cell in (tmp_path / "r.md").read_text()


def test_cli_entry_point(tmp_path, tiny_root):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "addersr.bench", "--model", "bicubic", "--scales", "4",
                           "--data-root", str(tiny_root), "--json", str(out), "--limit", "1",
                           "--save-images", str(tmp_path / "sr")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 1 and rows[0]["dataset"] == "Tiny" and rows[0]["scale"] == 4
    assert (tmp_path / "sr" / "bicubic" / "Tiny" / "x4" / "bird.png").is_file()
    assert "| x4 | bicubic |" in proc.stdout and "device: cpu" in proc.stderr


def test_random_adder_model(tmp_path, tiny_root):
    out = tmp_path / "r.json"
    bench.main(["--model", "edsr-baseline", "--op", "adder", "--scales", "2", "--data-root",
                str(tiny_root), "--json", str(out), "--no-lpips"])
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "edsr-baseline" and row["op"] == "adder" and row["dataset"] == "Tiny"
    assert np.isfinite(row["psnr"]) and row["seconds_per_image"] > 0
    assert row["params"] > 1e6  # 16 blocks x 64 features
    assert row["adds"] > row["mults"] > 0 and row["energy_mj"] > 0


def test_weights_file(tmp_path, tiny_root):
    from addersr.models import build, save

    model = build("edsr-baseline", 3, "conv", n_blocks=1, n_feats=8)
    save(model, tmp_path / "tiny-x3", {"note": "test"})
    out = tmp_path / "r.json"
    bench.main(["--weights", str(tmp_path / "tiny-x3.safetensors"), "--data-root", str(tiny_root),
                "--json", str(out), "--no-lpips"])
    (row,) = json.loads(out.read_text())["results"]
    assert (row["model"], row["op"], row["scale"]) == ("edsr-baseline", "conv", 3)
    assert row["params"] == sum(p.numel() for p in model.parameters())
    # a conv network: one multiply and (about) one add per MAC
    assert row["mults"] > 0 and row["adds"] == pytest.approx(row["mults"], rel=0.05)


def test_bad_options(tiny_root, capsys):
    root = str(tiny_root)
    cases = [(["--data-root", root, "--model", "bicubic", "--datasets", "Nope"], "not found"),
             (["--data-root", str(tiny_root / "missing"), "--model", "bicubic"], "not found"),
             (["--data-root", root, "--model", "srcnn"], "unknown --model"),
             (["--data-root", root, "--weights", str(tiny_root / "none")], "not found"),
             (["--data-root", root, "--model", "bicubic", "--tile", "8"], "at least 64"),
             (["--data-root", root, "--model", "bicubic", "--json", str(tiny_root)], "is a folder"),
             (["--data-root", root, "--model", "bicubic", "--csv",
               str(tiny_root / "Tiny" / "bird.png" / "sub" / "r.csv")], "cannot create the folder")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_unreadable_image_is_left_out_and_results_kept(tmp_path, tiny_root, capsys):
    """A truncated PNG in a later set: a one-line warning, the set marked incomplete in the
    table, and the JSON/CSV/markdown of everything computed still written."""
    broken, bad = tiny_root / "Broken", tiny_root / "AllBad"
    broken.mkdir()
    bad.mkdir()
    (tiny_root / "Tiny" / "head.png").replace(broken / "head.png")
    data = (tiny_root / "Tiny" / "bird.png").read_bytes()
    (broken / "cut.png").write_bytes(data[: len(data) // 2])
    (bad / "cut.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "results"
    rows = bench.main(["--model", "bicubic", "--scales", "2", "--data-root", str(tiny_root),
                       "--datasets", "Tiny", "Broken", "AllBad", "--no-lpips",
                       "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
                       "--md", str(out / "r.md")])
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "Traceback" not in captured.err
    assert "cut.png" in warnings[0] and "left out of Broken" in warnings[0]
    assert [(r["dataset"], r["images"], r["unreadable"]) for r in rows] == [
        ("Tiny", 1, 0), ("Broken", 1, 1)]
    data = json.loads((out / "r.json").read_text())
    assert [r["dataset"] for r in data["results"]] == ["Tiny", "Broken"]
    assert data["unreadable"] == {"Broken": ["cut.png"], "AllBad": ["cut.png"]}
    with open(out / "r.csv") as f:
        assert [r["unreadable"] for r in csv.DictReader(f)] == ["0", "1"]
    for text in (captured.out, (out / "r.md").read_text()):
        assert "| Tiny | Broken* | AllBad* |" in text
        assert "Broken*: incomplete, 1 of 2 images could not be read" in text
        assert "AllBad*: incomplete, 1 of 1 images" in text
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp files
