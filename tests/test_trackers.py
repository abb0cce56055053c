"""--mlflow and --tensorboard when their store fails: a store that cannot be opened is one line at once; one that
fails mid-run (a full disk) is one warning line per failure, whatever the library logs or its threads print; a
signal while the run's end is recorded still marks the MLflow run KILLED. Real stores, real full disks (tmpfs),
real processes and signals."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, as_from_a_terminal, write_cifar10

import train
from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # real processes, signals and runs: python -m pytest -m 'not slow' skips them

CPU = ["--device", "cpu"]
CPU_NO_VAL = [*CPU, "--val-split", "0"]  # (tiny data: no warning of a small validation split on stderr)
mlflow = pytest.importorskip("mlflow", reason="--mlflow needs the optional mlflow")


def fill(folder: Path) -> None:
    """Write to folder until its disk is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for size in (65536, 4096, 1):  # to the last byte
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def test_a_store_that_cannot_be_opened_is_one_line_at_once(tmp_path, cifar_dir, mounts):
    mounts(tmp_path / "read-only", "1m", read_only=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/read-only/mlflow.db"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU_NO_VAL, "--out-dir",
                             str(tmp_path / "run"), "--mlflow"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert time.monotonic() - started < 60  # (MLflow alone: 108 s of retries, 37 warning lines)
    assert result.returncode == 1 and result.stderr == (
        f"train.py: error: --mlflow: cannot use the tracking store sqlite:///{tmp_path}/read-only/mlflow.db: unable "
        f"to open database file; set MLFLOW_TRACKING_URI to a store that can be written\n")
    assert not (tmp_path / "run").exists()


def test_a_server_that_does_not_answer_is_one_line_at_once(tmp_path, cifar_dir):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # (the discard port: nothing listens)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU_NO_VAL, "--out-dir",
                             str(tmp_path / "run"), "--mlflow"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert time.monotonic() - started < 60  # (MLflow alone: minutes of retries)
    assert result.returncode == 1 and result.stderr == (
        "train.py: error: --mlflow: cannot use the tracking store http://127.0.0.1:9: [Errno 111] Connection refused; "
        "set MLFLOW_TRACKING_URI to a store that can be written\n")


def test_a_disk_that_fills_mid_run_is_one_warning_line_per_failure(tmp_path, mounts):
    data = write_cifar10(tmp_path / "data", n_per_batch=200, n_test=50)
    out = tmp_path / "run"
    mounts(tmp_path / "store", "2m")
    mounts(out / "tensorboard", "1m")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/store/mlflow.db"}
    proc = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(data), *CPU, "--epochs", "20",
                             "--val-split", "0.2", "--out-dir", str(out), "--mlflow", "--tensorboard"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch  1/20"):  # both trackers started, and logged epoch 1
            break
    fill(tmp_path / "store")
    fill(out / "tensorboard")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err  # the training goes on: the run's own files are elsewhere
    lines = err.splitlines()
    assert all(line.startswith(("warning: --mlflow: ", "warning: --tensorboard: ")) for line in lines), err
    ends = ["warning: --mlflow: cannot record the end of the run: (sqlite3.OperationalError) database or disk is full",
            "warning: --tensorboard: cannot record the end of the run: [Errno 28] No space left on device"]
    assert lines[-2:] == ends, err
    assert len(lines) <= 4  # and before: each tracker's failure once, not once an epoch
    assert (out / "results.json").is_file()


def ctrl_c_while_slow(tmp_path: Path, cifar_dir: Path, patch: str, said: str) -> tuple[str, str, str]:
    """A one-epoch --mlflow run with a sitecustomize that makes one of its last steps take 30 s (`patch`, which
    prints `said` as it starts), and Ctrl-C once it has: the stop is one line, status 130. Returns (stdout, the
    store's URI, the MLflow run id)."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(patch)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(slow)}
    proc = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU_NO_VAL, "--epochs", "1",
                             "--out-dir", str(tmp_path / "run"), "--mlflow"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)  # noqa: PLW1509
    for line in proc.stdout:
        if line == f"{said}\n":
            break
    proc.send_signal(2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "train.py: stopped by SIGINT\n", err
    return out, uri, load_checkpoint(tmp_path / "run" / "last.pth")["mlflow_run_id"]


def test_ctrl_c_while_the_end_is_recorded_marks_the_run_killed(tmp_path, cifar_dir):
    """A store slow to take the run's files (each upload takes 30 s): Ctrl-C during it."""
    out, uri, run_id = ctrl_c_while_slow(tmp_path, cifar_dir, (
        "import sys, time\n"
        "import mlflow.tracking.client as c\n"
        "def log_artifact(self, *args, **kwargs):\n"
        "    print('uploading', flush=True)\n"
        "    time.sleep(30)\n"
        "c.MlflowClient.log_artifact = log_artifact\n"), "uploading")
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    assert f"--mlflow: MLflow run {run_id} recorded (KILLED) in {uri}; to see it: mlflow ui --backend-store-uri " \
           f"{uri}, then open http://127.0.0.1:5000/#/experiments/" in out


def test_ctrl_c_while_the_curves_are_drawn_still_ends_the_mlflow_run_as_killed(tmp_path, cifar_dir):
    """After the test line, curves.png is drawn before the trackers record the end: Ctrl-C then (the drawing takes
    30 s) left the MLflow run RUNNING for good. It ends KILLED, with the test's numbers."""
    pytest.importorskip("matplotlib")
    _, uri, run_id = ctrl_c_while_slow(tmp_path, cifar_dir, (
        "import time\n"
        "import matplotlib.figure as f\n"
        "def savefig(self, *args, **kwargs):\n"
        "    print('drawing', flush=True)\n"
        "    time.sleep(30)\n"
        "f.Figure.savefig = savefig\n"), "drawing")
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED" and "test_accuracy" in run.data.metrics
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs_completed"] == 1


def test_the_run_says_where_it_is_recorded_and_epoch_is_the_step_only(tmp_path, cifar_dir, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    train.main(["--data-dir", str(cifar_dir), *CPU, "--epochs", "2", "--out-dir", str(tmp_path / "run"), "--mlflow"])
    run_id = load_checkpoint(tmp_path / "run" / "last.pth")["mlflow_run_id"]
    out = capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    see = (f"to see it: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/#/experiments/"
           f"{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning\n")
    assert f"--mlflow: recording MLflow run {run_id} (run) in {uri}; {see}" in out
    assert f"--mlflow: MLflow run {run_id} recorded (FINISHED) in {uri}; {see}" in out
    assert "epoch" not in run.data.metrics  # the step of every metric, not a metric of its own
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs


def test_a_read_only_tensorboard_folder_is_one_line_without_the_writer_threads_traceback(tmp_path, cifar_dir,
                                                                                          mounts):
    pytest.importorskip("tensorboard", reason="--tensorboard needs the optional tensorboard")
    out = tmp_path / "run"
    mounts(out / "tensorboard", "1m", read_only=True)
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU_NO_VAL, "--out-dir",
                             str(out), "--tensorboard"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 1 and result.stderr == (f"train.py: error: --tensorboard: cannot write to "
                                                        f"{out / 'tensorboard'}: Read-only file system\n")
    assert sorted(p.name for p in out.iterdir()) == ["tensorboard"]
