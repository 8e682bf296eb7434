"""benchmarks/twins.py: adder models paired with their CNN twins from the weights' JSONs."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from addersr import models

_SPEC = importlib.util.spec_from_file_location(
    "twins", Path(__file__).resolve().parents[1] / "benchmarks" / "twins.py")
twins = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(twins)

SMALL = {"n_blocks": 1, "n_feats": 8}


def _save(folder, stem, op, scale, psnr, seconds, parent=None, arch=SMALL):
    meta = {"iterations": 100, "seconds": seconds, "device": "cpu (test)",
            "metrics": {"Set5": {"psnr": psnr, "ssim": 0.9, "iteration": 100}},
            "validation": [{"iteration": i, "psnr": psnr - 1 + i / 100, "ssim": 0.9, "set": "Set5"}
                           for i in (50, 100)]}
    if parent:
        meta["parent"] = parent
    models.save(models.build("edsr-baseline", scale, op=op, **arch), folder / stem, meta)


def test_pairs_gaps_times_and_plot(tmp_path):
    w = tmp_path / "w"
    _save(w, "a2", "adder", 2, 35.0, 600)
    _save(w, "c2", "conv", 2, 35.4, 300)
    _save(w, "a4", "adder", 4, 29.0, 120, parent={"weights": "a2", "seconds": 600, "continued": False})
    _save(w, "other", "conv", 2, 36.0, 10, arch={"n_blocks": 2, "n_feats": 8})  # not a twin
    rows = twins.pairs(w)
    assert [(r[0], r[2]) for r in rows] == [("a2", "c2"), ("a4", None)]
    assert twins.total_seconds(rows[1][1], w) == 720  # its own 2 min and its parent's 10
    twins.main(["--weights-dir", str(w), "--md", str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png")])
    md = (tmp_path / "t.md").read_text()
    assert "| x2 | a2 | AdderSR | 100 | 10.0 | 35.00/0.9000 | +1.33 | -0.40 |" in md
    assert "| x2 | c2 | CNN |" in md and "| x4 | a4 | AdderSR | 100 | 12.0 |" in md and "other" not in md
    assert Image.open(tmp_path / "t.png").size[0] > 500


def test_no_adder_weights_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        twins.main(["--weights-dir", str(tmp_path), "--md", str(tmp_path / "t.md")])
    assert "no adder weights" in capsys.readouterr().err
