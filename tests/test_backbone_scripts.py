"""benchmarks/diverge.py (first-step norms) and benchmarks/backbones.py (adder vs CNN twin of
each backbone): tiny real runs of both."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diverge_records_each_kind_of_parameter_and_stops_at_nan(tiny_data):
    diverge = _script("diverge")
    from addersr.data.patches import load_training_images
    images, _ = load_training_images(tiny_data / "train", ["T91"])
    small = "--model vdsr --scale 2 --arch depth=4 n_feats=8 --batch 2"
    _, records = diverge.run_case(small, tiny_data / "train", images, steps=3)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]["grad"]) == {"head", "adder", "bn", "power", "tail"}
    assert all(math.isfinite(v) and v > 0 for v in records[0]["grad"].values())
    assert records[0]["update"]["adder"] > 0 and records[0]["alpha_max"] > 0
    deep = "--model vdsr --scale 2 --arch n_feats=8 --batch 4 --optimizer sgd --lr 0.08 --bn-init 1"  # the old recipe
    _, records = diverge.run_case(deep, tiny_data / "train", images, steps=12)
    assert not math.isfinite(records[-1]["loss"]) and len(records) < 12  # stopped at the first NaN
    assert "diverged at step" in diverge.report([("x", {"optimizer": "sgd", "lr": 1e6, "batch": 2, "patch": 21},
                                                   records)], "cpu", 12)


def test_backbones_tiny_run_writes_table_json_plot_and_skips_measured(tiny_data, tmp_path, monkeypatch, capsys):
    backbones = _script("backbones")
    out = tmp_path / "out"
    argv = ["--data", str(tiny_data), "--steps", "4", "--only", "vdsr-10x32", "--results",
            str(out / "b.json"), "--plot", str(out / "b.png"), "--workdir", str(tmp_path / "w")]
    backbones.main(argv)
    doc = json.loads((out / "b.json").read_text())
    assert set(doc["runs"]) == {"vdsr-10x32-adder", "vdsr-10x32-conv"}
    assert doc["runs"]["vdsr-10x32-adder"]["defaults"]["optimizer"] == "sgd+adam"
    assert doc["runs"]["vdsr-10x32-conv"]["defaults"]["optimizer"] == "adam"
    for run in doc["runs"].values():
        assert [p["iteration"] for p in run["curve"]] == [1, 2, 3, 4]
        assert run["machine"] == backbones._machine()  # each row names the machine that ran it
    table = (out / "b.md").read_text()
    assert table.count(f"| {backbones._machine()} |") == 2
    assert "| vdsr-10x32 | adder |" in table and "| bicubic |" in table and (out / "b.png").stat().st_size > 1000
    capsys.readouterr()

    def no_training(argv):
        raise AssertionError("measured runs must not be trained again")

    monkeypatch.setattr(backbones, "run_variant", no_training)
    backbones.main(argv)
    assert "| vdsr-10x32 | conv |" in capsys.readouterr().out
