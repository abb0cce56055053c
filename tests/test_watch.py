"""Watching a run: the --log-interval line, MLflow and TensorBoard tracking, curves.png, evaluate.py --show,
train.py --find-lr, and the optional packages they need. Real runs, a real MLflow store, real event files."""
import csv
import importlib.util
import json
import os
import re
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import config
import report
import runargs
import train
from checkpoint import METRICS, RUN_FILES, load_checkpoint
from conftest import ROOT, as_from_a_terminal, fails_with, write_cifar10

CPU = ["--device", "cpu"]
CPU_NO_VAL = [*CPU, "--val-split", "0"]  # (tiny data: no warning of a small validation split on stderr)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_rows(path: Path) -> list[dict]:
    """metrics.csv's numbers (its last column, `changed`, is text: left out)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if k != "changed"} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------------------
# --log-interval

def test_log_interval_prints_running_numbers_and_changes_no_weight(tmp_path, cifar_dir, capsys):
    base = ["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--augment"]
    train.main([*base, "--out-dir", str(tmp_path / "quiet"), "--log-interval", "0"])
    assert " step " not in capsys.readouterr().out
    train.main([*base, "--out-dir", str(tmp_path / "default")])  # a log, an epoch shorter than a minute: no line
    assert " step " not in capsys.readouterr().out
    train.main([*base, "--out-dir", str(tmp_path / "logged"), "--log-interval", "2"])
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out  # plain lines in a log
    steps = [line for line in out.splitlines() if " step " in line]
    # 180 training images in groups of 32: 6 steps per epoch, a line after steps 2, 4 and 6
    assert [line.split("  ")[:2] for line in steps] == [["epoch 1/1", f"step {s}/6"] for s in (2, 4, 6)]
    assert all("img/s  ETA 0:0" in line for line in steps)
    # the line after the last step shows the epoch's own train loss and accuracy, as the epoch line does
    row = metrics_rows(tmp_path / "logged" / "metrics.csv")[0]
    assert f"loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%" in steps[-1]
    for run in ("default", "logged"):  # the printing changes no number of the training
        for name, tensor in weights(tmp_path / "quiet" / "last.pth").items():
            assert torch.equal(tensor, weights(tmp_path / run / "last.pth")[name]), name


def test_in_a_log_by_default_a_line_comes_once_log_seconds_have_passed_since_the_last(tmp_path, cifar_dir, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr(report, "LOG_SECONDS", 0.0)  # (a minute: here every step's end is past it)
    train.main(["--data-dir", str(cifar_dir), *CPU, "--epochs", "2", "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out  # plain lines in a log
    steps = [line.split("  ")[:2] for line in out.splitlines() if " step " in line]
    assert steps == [[f"epoch {e}/2", f"step {s}/6"] for e in (1, 2) for s in range(1, 7)]
    monkeypatch.setattr(report, "LOG_SECONDS", 3600.0)  # longer than the epoch: none
    train.main(["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--out-dir", str(tmp_path / "quiet")])
    assert " step " not in capsys.readouterr().out


def test_on_a_terminal_the_progress_is_one_live_line_cleared_before_the_epoch_line(tmp_path, cifar_dir):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU, "--epochs", "1",
                             "--out-dir", str(tmp_path / "run")], cwd=ROOT, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    text = out.decode()
    # the default on a terminal: 20 updates per epoch, at most one per step: each of the 6 steps here
    assert text.count("\r\x1b[K") == 1 and text.count("step ") == 6
    before, rest = text.split("\r\x1b[K")
    live = before.rsplit("\n", 1)[1]  # all on one line, rewritten in place
    assert live.count("\r") == 6 and all(f"\repoch 1/1  step {s}/6  loss " in live for s in range(1, 7))
    assert rest.startswith("epoch 1/1  train loss")


def test_a_negative_log_interval_is_one_line(cifar_dir):
    fails_with(["--data-dir", str(cifar_dir), "--log-interval", "-1"], "--log-interval must be >= 0 (0 = off)")


# ---------------------------------------------------------------------------------------------------------------
# MLflow and TensorBoard

def test_ctrl_c_and_resume_make_one_mlflow_run_and_one_tensorboard_history(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="--mlflow needs the optional mlflow")
    pytest.importorskip("tensorboard", reason="--tensorboard is read back with the optional tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data = write_cifar10(tmp_path / "data", n_per_batch=200, n_test=50)
    out = tmp_path / "runs" / "run"
    flags = ["--data-dir", str(data), *CPU, "--epochs", "3", "--out-dir", str(out), "--mlflow", "--tensorboard",
             "--mlflow-log-checkpoints"]
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):  # the local default store
        monkeypatch.delenv(name, raising=False)
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    deadline = time.time() + 120
    while not (out / "last.pth").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    stopped = load_checkpoint(out / "last.pth")
    assert stopped["partial_epoch"] is not None or stopped["state"]["epoch"] < 3, "finished before the signal"
    run_id = stopped["mlflow_run_id"]
    if importlib.util.find_spec("matplotlib"):  # a run stopped by Ctrl-C draws the epochs it has done
        assert (out / "curves.png").is_file()

    client = mlflow.MlflowClient("sqlite:///" + str(tmp_path / "runs" / "mlflow.db"))  # next to the run folder
    assert client.get_run(run_id).info.status == "KILLED"
    train.main(["--resume", str(out / "last.pth")])  # --mlflow --tensorboard: the run's own flags
    assert load_checkpoint(out / "last.pth")["mlflow_run_id"] == run_id

    runs = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run, resumed
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    results = json.loads((out / "results.json").read_text())
    for name in ("test_accuracy", "test_loss"):  # results.json's numbers, at the last epoch
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, name)] == [(3, results[name])]
    # every flag of what the run is, as args.json has them (not where it is: --out-dir, --resume); a plain resume
    # changes none of them
    assert run.data.params == {k: str(v) for k, v in runargs.run_flags(config.parse_args(flags)).items()}
    assert not [tag for tag in run.data.tags if tag.startswith("changed_on_resume")], run.data.tags
    rows = metrics_rows(out / "metrics.csv")
    for column in METRICS[1:]:  # every metrics.csv column, per epoch (its step), once each
        history = client.get_metric_history(run_id, column)
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
            [(int(r["epoch"]), r[column]) for r in rows], column
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    expected = {"results.json", "metrics.csv", "best.pth", "last.pth"}
    assert artifacts - {"curves.png"} == expected
    local = Path(client.download_artifacts(run_id, "results.json", str(tmp_path)))
    assert json.loads(local.read_text()) == results
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # artifacts next to the store, not in the working dir

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for column in METRICS[1:]:  # per epoch, epochs 1-3 once each although two processes wrote them
        assert [(e.step, e.value) for e in events.Scalars(column)] == \
            [(int(r["epoch"]), pytest.approx(r[column], rel=1e-6)) for r in rows], column
    assert [(e.step, e.value) for e in events.Scalars("test_accuracy")] == \
        [(3, pytest.approx(results["test_accuracy"], rel=1e-6))]
    image = events.Images("train_images")[0]
    assert (image.width, image.height) == (8 * 32, 4 * 32) and image.step == 1  # 32 images, 8 a row


def test_mlflow_uses_the_tracking_uri_and_a_bad_store_is_one_line(tmp_path, cifar_dir, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="--mlflow needs the optional mlflow")
    uri = "sqlite:///" + str(tmp_path / "elsewhere.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--val-split", "0", "--out-dir", str(out),
                "--mlflow"])
    client = mlflow.MlflowClient(uri)
    run = client.get_run(load_checkpoint(out / "last.pth")["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert "val_loss" not in run.data.metrics and run.data.metrics["train_seconds"] > 0  # no validation: no nan
    assert not (tmp_path / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()  # next to the database
    other = "sqlite:///" + str(tmp_path / "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    fails_with(["--resume", str(out / "last.pth"), "--epochs", "2"],
               f"this run's MLflow run {run.info.run_id} is not in the tracking store {other} (was it recorded "
               f"with another MLFLOW_TRACKING_URI?)")

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "file" / "x.db"))  # under a file
    fails_with(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(tmp_path / "second"), "--mlflow"],
               "--mlflow: cannot use the tracking store sqlite:///")
    assert not (tmp_path / "second").exists()
    fails_with(["--data-dir", str(cifar_dir), "--mlflow-log-checkpoints"], "--mlflow-log-checkpoints needs --mlflow")


# ---------------------------------------------------------------------------------------------------------------
# Pictures: curves.png, evaluate.py --show, train.py --find-lr

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One run of 2 epochs; the tests below only read it (or check it is untouched)."""
    tmp = tmp_path_factory.mktemp("watched")
    data = write_cifar10(tmp / "data")
    out = tmp / "run"
    train.main(["--data-dir", str(data), *CPU, "--epochs", "2", "--out-dir", str(out)])
    return out


def assert_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def test_every_run_draws_its_curves(finished_run):
    pytest.importorskip("matplotlib", reason="curves.png is drawn when the optional matplotlib is there")
    assert assert_png(finished_run / "curves.png") == (1000, 400)


def test_show_draws_test_images_with_their_labels(finished_run, capsys):
    pytest.importorskip("matplotlib", reason="--show draws with the optional matplotlib")
    show = finished_run.parent / "show.png"
    evaluate.main(["--checkpoint", str(finished_run / "best.pth"), "--show", str(show), "--show-count", "12"])
    assert "12 test images with their predictions drawn to" in capsys.readouterr().out
    # 8 columns of 1.75 in (a 1.6 in image and its margins), 2 rows of 2.3 in + the title's 0.38 in, at 80 dpi
    assert assert_png(show) == (1120, 399)


@pytest.mark.parametrize("flags, message", [
    (["--show-count", "0"], "--show-count must be in [1, 256]"),
    (["--show", "{run}"], "is a folder; give the path of a file in it"),
    (["--show", "{run}/nowhere/show.png"], "nowhere is not a folder"),
    (["--show", "{run}/best.pth"], "is also an input"),
    (["--show", "{run}/a.png", "--plot", "{run}/a.png"], "--plot and --show both name"),
])
def test_show_refuses_bad_outputs_in_one_line(finished_run, flags, message):
    pytest.importorskip("matplotlib", reason="--show draws with the optional matplotlib")
    before = snapshot(finished_run)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(finished_run / "best.pth"), "--show", str(finished_run / "x.png"),
                       *[f.format(run=finished_run) for f in flags]])
    assert str(exc.value.code).startswith("evaluate.py: error: ") and message in str(exc.value.code)
    assert snapshot(finished_run) == before


def test_find_lr_draws_into_a_runs_folder_and_leaves_the_run_alone(finished_run, capsys):
    pytest.importorskip("matplotlib", reason="--find-lr draws with the optional matplotlib")
    before = snapshot(finished_run)
    data = load_checkpoint(finished_run / "last.pth")["args"]["data_dir"]
    suggested = train.main(["--data-dir", data, *CPU, "--out-dir", str(finished_run), "--find-lr",
                            "--find-lr-steps", "20", "--optimizer", "sgd"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last) == suggested > 0
    assert assert_png(finished_run / "find-lr.png") == (700, 400)
    assert snapshot(finished_run) == {**before, Path("find-lr.png"): (finished_run / "find-lr.png").read_bytes()}

    fresh = finished_run.parent / "fresh"
    train.main(["--data-dir", data, *CPU, "--out-dir", str(fresh), "--find-lr", "--find-lr-steps", "10"])
    assert sorted(p.name for p in fresh.iterdir()) == ["find-lr.png"]  # nothing --resume could mistake for a run
    assert not any((fresh / name).exists() for name in RUN_FILES)


def test_find_lr_without_out_dir_draws_into_runs_and_makes_no_run_folder(finished_run, tmp_path, monkeypatch,
                                                                          capsys):
    pytest.importorskip("matplotlib", reason="find_lr.py draws with the optional matplotlib")
    import find_lr
    data = load_checkpoint(finished_run / "last.pth")["args"]["data_dir"]
    monkeypatch.chdir(tmp_path)
    find_lr.main(["--data-dir", data, *CPU, "--find-lr-steps", "10"])
    [picture] = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"find-lr-cifar10-simplecnn-\d{8}-\d{6}\.png", picture.name) and picture.is_file()
    assert f"drawn to {Path('runs') / picture.name}\n" in capsys.readouterr().out


def test_find_lr_starts_from_the_runs_weights_and_gives_no_suggestion_without_a_valley(finished_run, tmp_path,
                                                                                      capsys):
    pytest.importorskip("matplotlib", reason="find_lr.py draws with the optional matplotlib")
    import find_lr
    data = load_checkpoint(finished_run / "last.pth")["args"]["data_dir"]
    base = ["--data-dir", data, *CPU, "--find-lr-steps", "10"]
    with pytest.raises(SystemExit, match=r"^find_lr.py: error: checkpoint not found: .*none.pth$"):
        find_lr.main([*base, "--init-from", str(tmp_path / "none.pth"), "--out-dir", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    out = tmp_path / "c"  # from the run's weights, an lr that blows the loss up at once: no valley, no suggestion
    with pytest.raises(SystemExit, match=r"^find_lr.py: error: no suggestion: the loss diverged from the first lr on "
                                         r"\(lr 1e\+03 to .*; drawn to .*find-lr.png\); try a lower --find-lr-start$"):
        find_lr.main([*base, "--init-from", str(finished_run / "best.pth"), "--optimizer", "sgd", "--find-lr-start",
                      "1e3", "--find-lr-end", "1e6", "--out-dir", str(out)])
    assert f"starting from {finished_run / 'best.pth'} (simplecnn after epoch" in capsys.readouterr().out
    assert assert_png(out / "find-lr.png") == (700, 400)


@pytest.mark.parametrize("flags, message", [
    (["--resume", "x.pth"], "the lr range test cannot --resume a run: give --init-from the checkpoint to start "
                            "from its weights"),
    (["--mlflow"], "--find-lr runs in one process and records nothing: not with --mlflow"),
    (["--find-lr-start", "1", "--find-lr-end", "0.1"], "the start below the end"),
    (["--find-lr-steps", "5"], "--find-lr-steps must be in [10, 10000]"),
])
def test_find_lr_refuses_what_it_cannot_do(cifar_dir, flags, message):
    fails_with(["--data-dir", str(cifar_dir), "--find-lr", *flags], message)


# ---------------------------------------------------------------------------------------------------------------
# Optional packages: needed only by their flags, never imported without them

@pytest.fixture
def without(tmp_path):
    """An environment in which the named packages cannot be imported, as if not installed: a folder first on
    PYTHONPATH holds a package of that name whose import raises ImportError."""
    def env(*packages: str) -> dict:
        for name in packages:
            (tmp_path / "absent" / name).mkdir(parents=True)
            (tmp_path / "absent" / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
        return {**os.environ, "PYTHONPATH": str(tmp_path / "absent")}
    return env


@pytest.mark.parametrize("command, package", [
    (["train.py", "--mlflow", "--data-dir", "{tmp}/no-data", "--out-dir", "{tmp}/run"], "mlflow"),
    (["train.py", "--tensorboard", "--data-dir", "{tmp}/no-data", "--out-dir", "{tmp}/run"], "tensorboard"),
    (["train.py", "--find-lr", "--data-dir", "{tmp}/no-data", "--out-dir", "{tmp}/run"], "matplotlib"),
    (["evaluate.py", "--checkpoint", "{tmp}/no.pth", "--show", "{tmp}/run/x.png"], "matplotlib"),
])
def test_a_missing_package_is_one_line_before_any_work(tmp_path, without, command, package):
    result = subprocess.run([sys.executable, *[c.format(tmp=tmp_path) for c in command]], cwd=ROOT,
                            env=without(package), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"pip install {package}" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "no-data").exists()


@pytest.mark.slow
def test_training_imports_no_tracking_package_and_runs_without_matplotlib(tmp_path, cifar_dir, without):
    out = tmp_path / "run"
    code = ("import sys, train; train.main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard', 'matplotlib') "
            "or m == 'torch.utils.tensorboard'))")
    result = subprocess.run([sys.executable, "-c", code, "--data-dir", str(cifar_dir), *CPU_NO_VAL, "--epochs", "1",
                             "--out-dir", str(out)], cwd=ROOT, env=without("matplotlib"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[-1] == "[]"  # (matplotlib: its import was tried, for curves.png, and failed)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "best.pth", "last.pth", "metrics.csv",
                                                     "results.json"]
