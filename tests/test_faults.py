"""Faults: signals, SIGKILL during saves, divergence, hostile files, unwritable output, fuzzed flags.
Real processes and real signals."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
import evaluate
import train
from conftest import ROOT, as_from_a_terminal, write_cifar10
from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # real processes, signals and runs: python -m pytest -m 'not slow' skips them


def start(argv, **kw):
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal, **kw)


def wait_for_line(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}; stderr: {proc.stderr.read()}")


def test_ctrl_c_saves_a_mid_epoch_checkpoint_that_resumes_exactly(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", n_per_batch=400, n_test=50)
    flags = ["--data-dir", str(data_dir), "--epochs", "2", "--batch-size", "8", "--augment", "--color-jitter", "0.2",
             "--scheduler", "cosine", "--device", "cpu"]  # (every augmentation: each resumes exactly)
    straight = train.main([*flags, "--out-dir", str(tmp_path / "straight")])

    out = tmp_path / "stopped"
    proc = start([*flags, "--out-dir", str(out), "--log-interval", "1"])  # (a line after every step)
    wait_for_line(proc, "epoch 2/2  step")  # a step of epoch 2 done, however loaded the machine (of about 250)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["state"]["epoch"] == 1 and 0 < ckpt["partial_epoch"]["step"] < 250
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith(f"{cli.python()} train.py ") and command.endswith(f"--resume {out / 'last.pth'}")

    resumed = train.main(shlex.split(command)[2:])  # the printed command, run as given
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(out / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == straight["test_accuracy"]


def test_sigterm_stops_cleanly_too(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", n_per_batch=400, n_test=50)
    out = tmp_path / "run"
    proc = start(["--data-dir", str(data_dir), "--epochs", "3", "--batch-size", "8", "--device", "cpu",
                  "--out-dir", str(out)])
    wait_for_line(proc, "epoch 1/3")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and "Resume with:" in err
    assert load_checkpoint(out / "last.pth")["state"]["epoch"] >= 1


def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    data_dir = write_cifar10(tmp_path / "data", n_per_batch=20, n_test=20)
    out = tmp_path / "run"
    flags = ["--data-dir", str(data_dir), "--epochs", "400", "--device", "cpu", "--out-dir", str(out)]
    proc = start(flags)
    wait_for_line(proc, "epoch ")  # from here on it saves last.pth about every 30 ms
    epochs = []
    for delay in (0.05, 0.37, 0.61):
        time.sleep(delay)
        proc.kill()
        proc.wait()
        epochs.append(load_checkpoint(out / "last.pth")["state"]["epoch"])  # loads: never half written
        proc = start([*flags, "--resume", str(out / "last.pth")])
        wait_for_line(proc, "resumed from")
    proc.kill()
    proc.wait()
    assert epochs == sorted(epochs) and epochs[-1] > 1


def test_divergence_stops_with_a_clear_error_and_saves_nothing(tmp_path, cifar_dir):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        train.main(["--data-dir", str(cifar_dir), "--optimizer", "sgd", "--lr", "1e30", "--out-dir", str(out),
                    "--device", "cpu"])
    assert "train.py: error: the training loss became nan" in str(exc.value.code) or \
        "are no longer finite" in str(exc.value.code)
    assert not (out / "last.pth").exists() and not (out / "best.pth").exists()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = "/tmp/pytest-pwned-marker"


def test_a_checkpoint_with_a_pickle_payload_is_refused_by_every_reader(tmp_path, cifar_dir):
    if os.path.exists(PWNED):
        os.remove(PWNED)
    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload(), "model_name": "simplecnn"}, evil)
    with pytest.raises(SystemExit) as exc:
        train.main(["--data-dir", str(cifar_dir), "--resume", str(evil), "--device", "cpu"])
    assert "cannot read checkpoint" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(evil)])
    assert "cannot read checkpoint" in str(exc.value.code)
    proc = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(evil), str(evil)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "refusing to load it" in proc.stderr
    assert not os.path.exists(PWNED)


def test_an_unwritable_output_dir_fails_before_training(tmp_path, cifar_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        train.main(["--data-dir", str(cifar_dir), "--out-dir", str(blocker / "run"), "--device", "cpu"])
    assert exc.value.code == (f"train.py: error: --out-dir {blocker / 'run'}: {blocker} is a file, not a folder; give "
                              f"--out-dir a new folder")
    assert blocker.read_text() == "not a folder"


FLAG_VALUES = {
    "--epochs": st.integers(-2, 2), "--batch-size": st.integers(-1, 300), "--accum-steps": st.integers(-1, 3),
    "--lr": st.sampled_from(["0", "-1", "1e-3", "nan", "inf", "abc", "1e400"]),
    "--grad-clip": st.sampled_from(["0", "-1", "1", "nan"]), "--patience": st.integers(-1, 2),
    "--val-split": st.sampled_from(["0", "0.5", "1", "-0.1", "0.999"]),
    "--model": st.sampled_from(["simplecnn", "resnet9", "x"]),
    "--widths": st.sampled_from(["1,2,3,4", "0,1,1,1", "8", "a,b,c,d"]),
    "--optimizer": st.sampled_from(["sgd", "adam", "adamw", "muon", "lion"]),
    "--ema": st.sampled_from(["0", "0.5", "1"]), "--muon-lr": st.sampled_from(["0.2", "0", "inf"]),
    "--warmup-epochs": st.sampled_from(["0", "0.5", "5"]), "--label-smoothing": st.sampled_from(["0", "0.2", "1"]),
    "--scheduler": st.sampled_from(["none", "cosine", "linear", "step", "exp"]),
    "--amp": st.sampled_from(["off", "bf16", "fp16"]), "--seed": st.integers(-1, 3),
    "--momentum": st.sampled_from(["0", "0.9", "1"]), "--min-delta": st.sampled_from(["0", "-1"]),
    "--image-size": st.integers(0, 40),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.just(None), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: FLAG_VALUES[k] for k in keys})), st.booleans())
def test_fuzzed_train_flags_run_or_fail_with_one_line(tmp_path_factory, cifar_dir, flags, nesterov):
    argv = ["--data-dir", str(cifar_dir), "--device", "cpu", "--out-dir", str(tmp_path_factory.mktemp("run"))]
    for k, v in flags.items():
        argv += [k, str(v)]
    argv += ["--nesterov"] if nesterov else []
    try:
        results = train.main(argv)
        assert 0 <= results["test_accuracy"] <= 100
    except SystemExit as e:
        message = str(e.code)
        assert message.startswith("train.py: error: ") and "\n" not in message, message


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["--checkpoint", "--data-dir", "--device", "--json", "--tta", "cpu", "cuda",
                                 "/nonexistent", "", "x.pth", "--bogus"]), max_size=5))
def test_fuzzed_evaluate_flags_fail_with_one_line(argv):
    try:
        evaluate.main(argv)
        raise AssertionError("no valid checkpoint was given, so evaluate.py cannot succeed")
    except SystemExit as e:
        message = str(e.code)
        assert message.startswith("evaluate.py: error: ") and "\n" not in message, message
