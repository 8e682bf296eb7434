"""Faults of issue 22, injected for real: signals sent to running processes, dangling links,
NaN weights, empty folders, tiny and animated images, a second run on the same folder, a
diverging learning rate. Each must end in a one-line message, the right exit status, and
nothing lost (docs/reliability.md lists every case)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from addersr import bench, energy, models, train, upscale
from addersr.demo import Refused, Upscaler
from addersr.demo.catalogue import Catalogue
from addersr.demo.checks import check_request
from addersr.eval import unscorable

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "edsr-small-x2-adder-cpu"
TINY = ["--model", "edsr-baseline", "--scale", "2", "--arch", "n_blocks=1", "n_feats=8",
        "--patch", "8", "--batch", "2", "--train-sets", "A", "--workers", "0", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/A (three images), val/ (two scorable images), tiny/ (one 12x12), empty/."""
    root = tmp_path_factory.mktemp("data")
    for i in range(3):
        _png(root / "train" / "A" / f"{i}.png", 40, 44, i)
    for i in range(2):
        _png(root / "val" / f"{i}.png", 24, 28, 10 + i)
    _png(root / "tiny" / "small.png", 12, 12)
    (root / "empty").mkdir()
    return root


def _argv(data, out, *extra, iters=4):
    return [*TINY, "--data-root", str(data / "train"), "--iters", str(iters), "--val-every", "0",
            "--out", str(out), *extra]


def _error(capsys, *argv):
    """Run train.main(argv), which must refuse with exit status 2 and one line."""
    with pytest.raises(SystemExit) as exc:
        train.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err
    return err


class Process:
    """A CLI run in a subprocess (its own session, like a job), stderr collected as it comes."""

    def __init__(self, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk.decode(errors="replace")

    def wait_for(self, pattern, timeout=90):
        """The first match of ``pattern`` on stderr (fails if the process ends first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.err)
            if found:
                return found
            assert self.proc.poll() is None, f"ended early ({self.proc.returncode}):\n{self.err}"
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"no {pattern!r} on stderr within {timeout} s:\n{self.err}")

    def iterations(self, at_least=2):
        """Wait until the training progress bar shows ``at_least`` iterations."""
        while True:
            done = max(int(n) for n in re.findall(r"\| *(\d+)/\d+ \[", self.err + "| 0/1 ["))
            if done >= at_least:
                return done
            self.wait_for(r"\| *\d+/\d+ \[")
            time.sleep(0.2)

    def signal(self, signum, group=False):
        (os.killpg if group else os.kill)(self.proc.pid, signum)

    def finish(self, timeout=90):
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _last_line(err):
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]


def _command(message):
    """The ``python -m addersr.train ...`` command quoted in a message, as argv after ``-m``."""
    command = re.search(r"`(python -m addersr\.train [^`]*)`", message).group(1)
    return shlex.split(command)[3:]


# --- 1, 5, 9: what training checks before its first step -----------------------------------------

def test_validation_data_is_checked_before_the_first_step(data, tmp_path, capsys):
    for folder, words in (("empty", "no images in"), ("tiny", "small.png: a 12x12 image keeps 8 pixels"),
                          ("missing", "validation folder not found")):
        out = tmp_path / folder
        err = _error(capsys, *_argv(data, out, "--val-every", "2", "--val-data", str(data / folder)))
        assert words in err
        assert not (out / "last.pt").exists()


def test_output_paths_are_checked_before_the_first_step(data, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert "--out: " in _error(capsys, *_argv(data, a_file))
    err = _error(capsys, *_argv(data, tmp_path / "run", "--export", str(a_file / "w")))
    assert err.endswith(f"--export: {a_file} exists and is not a folder")
    (tmp_path / "w.json").mkdir()
    assert "w.json is a folder" in _error(capsys, *_argv(data, tmp_path / "run2", "--export",
                                                         str(tmp_path / "w")))
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run2" / "last.pt").exists()


@pytest.mark.parametrize("arch, words", [("n_blocks=1.5", "n_blocks must be a whole number"),
                                         ("n_blocks=0", "n_blocks must be a whole number"),
                                         ("res_scale=-1", "res_scale must be a positive number")])
def test_bad_architecture_values_are_refused(data, tmp_path, capsys, arch, words):
    argv = _argv(data, tmp_path / "run")
    argv[argv.index("n_blocks=1")] = arch
    assert words in _error(capsys, *argv)


# --- 4, 3: SIGTERM and SIGINT stop after the step, checkpoint, export, say how to continue ----

def test_sigterm_checkpoints_exports_and_the_named_command_continues(data, tmp_path):
    out, export = tmp_path / "run", tmp_path / "weights" / "w"
    run = Process("addersr.train", *_argv(data, out, "--export", str(export), iters=100000))
    done = run.iterations(2)
    run.signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM
    message = _last_line(run.err)
    assert message.startswith("stopped by SIGTERM at iteration ") and "Traceback" not in run.err
    stopped = int(re.search(r"iteration (\d+)", message).group(1))
    assert stopped >= done
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["iteration"] == stopped
    assert models.load(export).meta["iterations"] == stopped
    assert not (out / "run.lock").exists()
    # the command of the message continues the run (two more steps here)
    trainer = train.main(_command(message) + ["--iters", str(stopped + 2)])
    assert trainer.iteration == stopped + 2


def test_ctrl_c_reaching_the_workers_still_checkpoints(data, tmp_path):
    """Ctrl-C in a terminal signals the whole process group, DataLoader workers included."""
    out = tmp_path / "run"
    argv = _argv(data, out, iters=100000)
    argv[argv.index("--workers") + 1] = "1"
    run = Process("addersr.train", *argv)
    run.iterations(2)
    run.signal(signal.SIGINT, group=True)
    assert run.finish() == 128 + signal.SIGINT
    message = _last_line(run.err)
    assert message.startswith("stopped by SIGINT") and "--resume --out" in message
    assert "Traceback" not in run.err
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] >= 2


def test_a_second_signal_stops_at_once_and_promises_only_what_exists(data, tmp_path):
    out = tmp_path / "run"
    argv = _argv(data, out, "--ckpt-every", "100000", iters=100000)
    argv[argv.index("--batch") + 1] = "64"  # a long step: the second signal comes within it
    run = Process("addersr.train", *argv)
    run.iterations(1)
    run.signal(signal.SIGINT)
    run.wait_for("SIGINT received: stopping after this step")
    run.signal(signal.SIGINT)
    rc = run.finish()
    message = _last_line(run.err)
    assert "Traceback" not in run.err
    if message.startswith("interrupted at iteration"):  # within the step: no checkpoint yet
        assert rc == 128 + signal.SIGINT
        assert message.endswith(f"no checkpoint was written to {out} (nothing to continue from)")
        assert not (out / "last.pt").exists()
    else:  # the step, its checkpoint and the exit were done before the second signal came
        assert rc in (128 + signal.SIGINT, -signal.SIGINT) and message.startswith("stopped by SIGINT")
        assert (out / "last.pt").exists()


# --- 3: a diverged run names what exists and a command that works -----------------------------

def test_divergence_advice_resumes_at_a_lower_rate(data, tmp_path, capsys):
    out = tmp_path / "run"
    # SGD at a rate rising (warm-up) to 20: finite at the checkpoint of iteration 10, NaN soon after
    argv = _argv(data, out, "--op", "conv", "--optimizer", "sgd", "--lr", "20", "--warmup", "100",
                 "--ckpt-every", "10", iters=200)
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    message = str(exc.value.code)
    assert message.startswith("error: loss became nan") or "became NaN" in message
    saved = torch.load(out / "last.pt", weights_only=True)
    assert f"{out / 'last.pt'} (iteration {saved['iteration']}), is kept" in message
    command = _command(message)
    assert command[-2:] == ["--lr", "2"]
    export = tmp_path / "w"
    trainer = train.main(command + ["--iters", str(saved["iteration"] + 10), "--export", str(export)])
    assert trainer.iteration == saved["iteration"] + 10  # finite: the loss is checked every 10
    assert models.load(export).meta["lr_changes"][0]["to"] == 2.0
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["lr"] == 2.0
    assert state["config"]["lr_changes"] == [{"option": "lr", "from": 20.0, "to": 2.0,
                                              "iteration": saved["iteration"]}]
    factor = train.lr_factor(state["config"], state["iteration"] - 1)
    assert all(g["lr"] == pytest.approx(2.0 * factor) for g in state["optimizer"]["param_groups"])
    # a higher rate is still refused
    assert "may be lowered" in _error(capsys, "--resume", "--out", str(out), "--lr", "30")


def test_divergence_before_any_checkpoint_says_so(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(_argv(data, out, "--op", "conv", "--optimizer", "sgd", "--lr", "1e4", iters=50))
    assert f"No checkpoint was written to {out}: start the run again" in str(exc.value.code)
    assert not (out / "last.pt").exists()


# --- 6: one run per --out -----------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused_and_stale_locks_are_replaced(data, tmp_path, capsys):
    out = tmp_path / "run"
    run = Process("addersr.train", *_argv(data, out, iters=100000))
    try:
        run.iterations(1)
        err = _error(capsys, *_argv(data, out))
        assert f"{out} is in use by process {run.proc.pid} on " in err
    finally:
        run.signal(signal.SIGTERM)
        assert run.finish() == 128 + signal.SIGTERM
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    before = run_iterations(out)
    trainer = train.main(_argv(data, out, "--resume", iters=before + 1))
    assert "removing the stale lock" in capsys.readouterr().err
    assert trainer.iteration == run_iterations(out) == before + 1
    assert not (out / "run.lock").exists()


def run_iterations(out):
    return torch.load(out / "last.pt", weights_only=True)["iteration"]


# --- 5: an export that fails at the end --------------------------------------------------------

def test_failed_export_names_the_command_that_recovers_the_weights(data, tmp_path):
    out, folder = tmp_path / "run", tmp_path / "weights"
    run = Process("addersr.train", *_argv(data, out, "--export", str(folder / "w"), iters=100000))
    run.iterations(1)
    folder.rmdir()
    folder.write_text("the export folder became a file")  # the disk changed under the run
    run.signal(signal.SIGTERM)
    assert run.finish() == 1
    message = _last_line(run.err)
    assert message.startswith(f"error: cannot export the weights to {folder / 'w'}: ")
    assert "Traceback" not in run.err
    command = [tmp_path / "w2" if arg == "PATH" else arg for arg in _command(message)]
    train.main([str(a) for a in command])
    assert models.load(tmp_path / "w2").meta["iterations"] == run_iterations(out)


# --- 2: bench skips what it cannot score and keeps what it scored --------------------------

def test_bench_skips_images_too_small_and_reports_them(tmp_path):
    root = tmp_path / "bench"
    _png(root / "Good" / "a.png", 40, 48)
    _png(root / "Small" / "dot.png", 3, 3)      # smaller than the scale x4
    _png(root / "Small" / "thin.png", 16, 40)   # 16 - 2 x 2 = 12 rows left at x2: scored; not at x3
    _png(root / "Small" / "ok.png", 40, 40)
    _png(root / "Tiny" / "dot.png", 5, 5)       # nothing of this set can be scored
    out = tmp_path / "out"
    rows = bench.main(["--model", "bicubic", "--data-root", str(root), "--scales", "2", "3", "4",
                       "--no-lpips", "--json", str(out / "r.json"), "--md", str(out / "r.md")])
    small = {r["scale"]: (r["images"], r["too_small"]) for r in rows if r["dataset"] == "Small"}
    assert small == {2: (2, 1), 3: (1, 2), 4: (1, 2)}
    assert not [r for r in rows if r["dataset"] == "Tiny"]
    data = json.loads((out / "r.json").read_text())
    assert set(data["too_small"]["Small"]) == {"dot", "thin"}
    assert data["too_small"]["Small"]["dot"].startswith("a 3x3 image keeps 0 pixels")
    assert unscorable((3, 3), 4) == "a 3x3 image is smaller than the scale 4"
    assert unscorable((16, 40), 2) is None and unscorable((15, 40), 2) is not None
    assert "Small*: 2 images too small to score" in (out / "r.md").read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_bench_signal_writes_the_finished_sets(tmp_path, signum):
    root = tmp_path / "bench"
    _png(root / "A" / "a.png", 32, 32)
    for i in range(3):
        _png(root / "B" / f"{i}.png", 320, 320, i)  # seconds per image for a full EDSR-baseline
    out = tmp_path / "out"
    run = Process("addersr.bench", "--model", "edsr-baseline", "--op", "conv", "--scales", "2",
                  "--device", "cpu", "--no-lpips", "--data-root", str(root), "--datasets", "A", "B",
                  "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--md", str(out / "r.md"))
    run.wait_for(r"B x2 edsr-baseline-conv", timeout=120)  # set A is finished
    run.signal(signum)
    assert run.finish() == 128 + signum
    assert _last_line(run.err).startswith(f"interrupted by {signal.Signals(signum).name}: the 1 "
                                          "finished runs are written to ")
    assert "Traceback" not in run.err
    data = json.loads((out / "r.json").read_text())
    assert [r["dataset"] for r in data["results"]] == ["A"]
    assert data["interrupted"] == signal.Signals(signum).name
    assert (out / "r.csv").read_text().count("\n") == 2
    assert "Interrupted by" in (out / "r.md").read_text()


def test_bench_names_an_empty_dataset_folder(tmp_path, capsys):
    _png(tmp_path / "Set" / "a.png", 40, 40)
    (tmp_path / "Empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", "bicubic", "--data-root", str(tmp_path), "--datasets", "Empty"])
    assert exc.value.code == 2
    assert "dataset folder(s) ['Empty'] in" in capsys.readouterr().err


# --- 7, 8: a weights folder with bad entries, weights with NaN --------------------------------

@pytest.fixture
def weights_folder(tmp_path):
    """Links to one shipped model, a dangling link, a folder named like a JSON file, and NaN weights."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        (folder / (SHIPPED + suffix)).symlink_to(models.weights_dir() / (SHIPPED + suffix))
    (folder / "gone.json").symlink_to(tmp_path / "deleted.json")
    (folder / "odd.json").mkdir()
    return folder


def _nan_weights(path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    source = models.weights_dir() / SHIPPED
    tensors = load_file(f"{source}.safetensors")
    with safe_open(f"{source}.safetensors", "pt") as f:
        header = f.metadata()
    tensors["tail.1.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, f"{path}.safetensors", metadata=header)
    Path(f"{path}.json").write_text(Path(f"{source}.json").read_text())
    return path


def test_bad_entries_in_the_weights_folder_are_skipped_with_a_warning(weights_folder, tmp_path,
                                                                      monkeypatch, capsys):
    with pytest.warns(UserWarning) as caught:
        found = models.list_weights(weights_folder)
    assert [p.name for p, _ in found] == [SHIPPED + ".safetensors"]
    assert {str(w.message) for w in caught} == {
        f"skipping {weights_folder / 'gone.json'}: a broken link",
        f"skipping {weights_folder / 'odd.json'}: Is a directory"}
    monkeypatch.setenv("ADDERSR_WEIGHTS", str(weights_folder))
    _png(tmp_path / "in" / "a.png", 20, 24)
    with pytest.warns(UserWarning):  # upscale's default model
        assert upscale.main([str(tmp_path / "in"), "-o", str(tmp_path / "up"), "--device", "cpu"]) == 0
    assert (tmp_path / "up" / "a_x2.png").is_file()
    _png(tmp_path / "bench" / "S" / "a.png", 40, 40)
    with pytest.warns(UserWarning):  # bench's default list
        rows = bench.main(["--data-root", str(tmp_path / "bench"), "--no-lpips", "--device", "cpu"])
    assert [r["weights"] for r in rows] == [SHIPPED]
    with pytest.warns(UserWarning):  # the app's catalogue
        assert list(Catalogue(weights_folder).weights) == [SHIPPED]


def test_the_app_starts_on_a_folder_with_a_dangling_link(weights_folder):
    sys.path.insert(0, str(ROOT))
    import app
    with pytest.warns(UserWarning, match="a broken link"):
        demo = app.build_demo(weights_dir=weights_folder, device="cpu")
    assert demo.upscaler.catalogue.default() == SHIPPED


def test_non_finite_weights_are_refused_when_loaded(data, tmp_path, capsys):
    path = _nan_weights(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in \[tail.1.weight\]"):
        models.load(path)
    with pytest.raises(ValueError, match="NaN or infinite"):
        models.read(path)
    _png(tmp_path / "in" / "a.png", 20, 24)
    assert upscale.main([str(tmp_path / "in"), "-o", str(tmp_path / "up"), "--weights", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: cannot load weights: ") and "NaN" in err
    assert not (tmp_path / "up" / "a_x2.png").exists()
    with pytest.raises(SystemExit) as exc:
        bench.main(["--weights", str(path), "--no-lpips"])
    assert exc.value.code == 2
    assert "NaN or infinite" in _error(capsys, *_argv(data, tmp_path / "run", "--init", str(path)))
    folder = tmp_path / "app"
    folder.mkdir()
    _nan_weights(folder / "nan")
    up = Upscaler(folder, device="cpu")
    with pytest.raises(Refused, match="cannot be used"):
        up.upscale(str(tmp_path / "in" / "a.png"), "nan")


# --- 9: the smaller ones ---------------------------------------------------------------------

def test_energy_refuses_an_empty_size(capsys):
    with pytest.raises(SystemExit) as exc:
        energy.main(["--size", "0x0"])
    assert exc.value.code == 2 and "--size must be at least 1x1" in capsys.readouterr().err


def test_ctrl_c_in_upscale_keeps_the_finished_files(tmp_path):
    for i in range(12):
        _png(tmp_path / "in" / f"{i:02d}.png", 200, 200, i)
    out = tmp_path / "up"
    run = Process("addersr.upscale", str(tmp_path / "in"), "-o", str(out), "--weights", SHIPPED,
                  "--device", "cpu")
    deadline = time.monotonic() + 120
    while not list(out.glob("*_x2.png")) and time.monotonic() < deadline:
        time.sleep(0.1)
    run.signal(signal.SIGINT)
    assert run.finish() == 128 + signal.SIGINT
    assert "Traceback" not in run.err
    assert re.search(r"interrupted by SIGINT: \d+ images not done", _last_line(run.err))
    written = sorted(out.iterdir())
    assert 1 <= len(written) < 12 and not [p for p in written if p.name.startswith(".")]
    for path in written:
        assert Image.open(path).size == (400, 400)


def test_animated_gif_is_refused_not_reduced_to_a_frame(tmp_path, capsys):
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert upscale.main([str(tmp_path / "anim.gif"), "-o", str(tmp_path / "up"), "--weights", SHIPPED]) == 1
    assert "an animated or multi-page image (2 frames)" in capsys.readouterr().err
    with pytest.raises(Refused, match="not an image this app can read"):
        check_request(Catalogue(), str(tmp_path / "anim.gif"))


def test_the_apps_size_limit_is_said_once(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (2100, 2100)).save(big)
    with pytest.raises(Refused) as exc:
        check_request(Catalogue(), str(big), SHIPPED)
    message = str(exc.value)
    assert message.count("the limit is") == 1 and "4200x4200" in message
