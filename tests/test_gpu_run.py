"""The prepared GPU session script, end to end in its dry run (CPU, tiny shapes, Triton interpreter)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_report_weights_and_logs(tiny_data, tmp_path):
    from addersr.models import load
    from addersr.ops.triton_kernels import VARIANTS

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), str(out), "--dry-run",
                           "--minutes", "1", "--data-root", str(tiny_data / "train")],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert 0 < len(files) <= 8 and all(p.stat().st_size <= 16 * 2 ** 20 for p in files)
    assert all(p.parent == out for p in files)
    report = (out / "report.md").read_text()
    assert "pytest exit 0" in report and "2 passed" in report
    timings = json.loads((out / "kernels.json").read_text())
    assert set(VARIANTS) <= set(timings["variants"])
    for name in VARIANTS:
        for kind in ("forward", "grad_input"):
            assert timings["variants"][name][kind]["s"] > 0 and f"| {name} |" in report
    assert {"CNN", "adder fused", "adder eager"} == set(timings["steps"])
    init = load("edsr-small-x2-adder-cpu").meta["iterations"]
    exported = load(out / "edsr-small-x2-adder-cpu-gpu")
    assert exported.meta["iterations"] > init  # training continued from the shipped weights
    assert "Training chunk: exit 0" in report
