"""benchmarks/recipe.py: the active-fraction diagnostic, and a tiny end-to-end run that
writes the table, the JSON and the plot, and skips what it already measured."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from addersr.nn import Adder2d

pytestmark = pytest.mark.usefixtures("one_thread")

_SPEC = importlib.util.spec_from_file_location(
    "recipe", Path(__file__).resolve().parents[1] / "benchmarks" / "recipe.py")
recipe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(recipe)


@pytest.mark.parametrize("value, expected", [(5.0, 0.0), (-5.0, 0.0), (0.5, 1.0)])
def test_active_fraction_tells_weights_inside_the_data_from_outside(value, expected):
    layer = Adder2d(3, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight.fill_(value)
    x = torch.rand(2, 3, 16, 16)  # uniform in [0, 1): 0.5 splits it, +-5 never does
    assert recipe.active_fraction(torch.nn.Sequential(layer), x) == expected
    assert recipe.active_fraction(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), x) is None


def test_tiny_run_writes_table_json_plot_and_skips_measured(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path), "--steps", "4", "--only", "paper", "sgd-distill",
            "--results", str(out / "recipe.json"), "--plot", str(out / "recipe.png"), "--workdir", str(tmp_path / "w")]
    recipe.main(argv)
    doc = json.loads((out / "recipe.json").read_text())
    assert doc["steps"] == 4 and set(doc["variants"]) == {"cnn", "paper", "sgd-distill"}  # cnn: the teacher
    for name, r in doc["variants"].items():
        assert [p["iteration"] for p in r["curve"]] == [1, 2, 3, 4]
        assert all(np.isfinite(p["psnr"]) for p in r["curve"])
        assert (r["active"] is None) == (name == "cnn")
    assert "--teacher" in doc["variants"]["sgd-distill"]["argv"]
    table = (out / "recipe.md").read_text()
    assert "| paper |" in table and "| cnn |" in table and "| bicubic |" in table
    assert Image.open(out / "recipe.png").size[0] > 500
    capsys.readouterr()

    def no_training(argv):
        raise AssertionError("measured variants must not be trained again")

    monkeypatch.setattr(recipe.train, "main", no_training)
    recipe.main(argv)
    assert "| sgd-distill |" in capsys.readouterr().out


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["--data", str(tmp_path), "--steps", "4"])
    assert "train/T91" in capsys.readouterr().err
    (tmp_path / "train" / "T91").mkdir(parents=True)
    with pytest.raises(SystemExit):
        recipe.main(["--data", str(tmp_path), "--only", "nope"])
    assert "unknown variant" in capsys.readouterr().err
