"""benchmarks/arch.py: a tiny end-to-end run that calibrates the steps to the budget, writes
the table and the JSON, and skips what it already measured."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

_SPEC = importlib.util.spec_from_file_location(
    "arch", Path(__file__).resolve().parents[1] / "benchmarks" / "arch.py")
arch = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(arch)


def test_tiny_run_fits_the_budget_writes_table_and_skips_measured(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out" / "arch.json"
    argv = ["--data", str(tmp_path), "--train-sets", "T91", "--budget", "1.5", "--only", "edsr-2x32",
            "--results", str(out), "--workdir", str(tmp_path / "w")]
    arch.main(argv)
    doc = json.loads(out.read_text())
    assert set(doc["candidates"]) == {"edsr-2x32"} and doc["train_sets"] == ["T91"]
    r = doc["candidates"]["edsr-2x32"]
    assert r["steps"] % 4 == 0 and r["steps"] == max(4, int(1.5 / r["seconds_per_step"]) // 4 * 4)
    assert r["arch"] == {"n_blocks": 2, "n_feats": 32} and r["params"] > 0 and np.isfinite(r["psnr"])
    table = (out.with_suffix(".md")).read_text()
    assert "| edsr-2x32 |" in table and "T91" in table and "| edsr-4x32 |" not in table
    capsys.readouterr()

    def no_training(argv):
        raise AssertionError("measured sizes must not be trained again")

    monkeypatch.setattr(arch.train, "main", no_training)
    arch.main(argv)
    assert "| edsr-2x32 |" in capsys.readouterr().out


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        arch.main(["--data", str(tmp_path)])
    assert "train/" in capsys.readouterr().err
    (tmp_path / "train" / "T91").mkdir(parents=True)
    for bad, message in ((["--only", "nope"], "unknown size"), (["--budget", "0"], "positive")):
        with pytest.raises(SystemExit):
            arch.main(["--data", str(tmp_path)] + bad)
        assert message in capsys.readouterr().err
