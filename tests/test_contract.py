"""The run-folder and resume contract, tried as a careless user would: every failure is one line and a non-zero
exit, and nothing on disk is lost. Real processes, real signals, a real full disk (tmpfs), real concurrent runs."""
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import config
import runargs
import train
from checkpoint import load_checkpoint
from conftest import ROOT, as_from_a_terminal, fails_with, write_cifar10

CPU = ["--device", "cpu"]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def start(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=as_from_a_terminal)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}; stderr: {proc.stderr.read()}")


def one_error_line(proc: subprocess.Popen | subprocess.CompletedProcess, prog: str = "train.py") -> str:
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.read()
    lines = err.strip().splitlines()
    assert proc.returncode not in (0, None) and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture
def two_runs(tmp_path, cifar_dir):
    """Two finished one-epoch runs, A and B, of the same data."""
    base = ["--data-dir", str(cifar_dir), *CPU, "--epochs", "1"]
    train.main([*base, "--out-dir", str(tmp_path / "A")])
    train.main([*base, "--out-dir", str(tmp_path / "B"), "--seed", "1"])
    return tmp_path / "A", tmp_path / "B", base


# ---------------------------------------------------------------------------------------------------------------
# The run folder is owned

def test_resume_never_writes_over_another_run(two_runs):
    a, b, base = two_runs
    before = snapshot(b)
    fails_with([*base, "--epochs", "2", "--resume", str(a / "last.pth"), "--out-dir", str(b)],
               "already holds run files")
    (b / "last.pth").unlink()  # what is left of B still belongs to B
    del before["last.pth"]
    fails_with([*base, "--epochs", "2", "--resume", str(a / "last.pth"), "--out-dir", str(b)],
               "already holds run files")
    assert snapshot(b) == before


def test_a_folder_with_any_run_file_is_not_started_over(two_runs):
    a, _, base = two_runs
    (a / "last.pth").unlink()
    before = snapshot(a)
    # (and curves.png, where matplotlib drew it)
    fails_with([*base, "--out-dir", str(a)], "already holds run files (best.pth, metrics.csv, results.json")
    assert snapshot(a) == before


def test_resume_into_a_new_folder_copies_the_history_and_leaves_the_old_one(two_runs):
    a, _, base = two_runs
    before = snapshot(a)
    new = a.parent / "A2"
    results = train.main([*base, "--epochs", "2", "--resume", str(a / "last.pth"), "--out-dir", str(new)])
    assert results["epochs_completed"] == 2 and snapshot(a) == before
    assert [line.split(",")[0] for line in (new / "metrics.csv").read_text().splitlines()] == ["epoch", "1", "2"]
    assert load_checkpoint(new / "last.pth")["run_id"] == load_checkpoint(a / "last.pth")["run_id"]


def test_resuming_an_older_checkpoint_would_rewind_the_run_and_is_refused(tmp_path, cifar_dir):
    out = tmp_path / "run"
    base = ["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out)]
    train.main([*base, "--epochs", "1"])
    (out / "epoch1.pth").write_bytes((out / "last.pth").read_bytes())  # kept while the run goes on to epoch 2
    train.main([*base, "--epochs", "2", "--resume", str(out / "last.pth")])
    before = snapshot(out)
    fails_with([*base, "--epochs", "3", "--resume", str(out / "epoch1.pth")], "would rewind the run")
    assert snapshot(out) == before


def test_best_pth_holds_no_optimizer_state_and_resuming_it_points_to_last_pth(tmp_path, cifar_dir):
    out = tmp_path / "run"
    base = ["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), "--optimizer", "adam", "--val-split", "0"]
    train.main([*base, "--epochs", "1"])
    best, last = load_checkpoint(out / "best.pth"), load_checkpoint(out / "last.pth")
    assert set(last) - set(best) == {"optimizer", "scaler", "rng"} and set(best) < set(last)
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert (out / "best.pth").stat().st_size < (out / "last.pth").stat().st_size / 2  # (Adam: two moments a weight)
    before = snapshot(out)
    fails_with([*base, "--epochs", "2", "--resume", str(out / "best.pth")],
               f"{out / 'best.pth'} cannot be resumed: it holds the best weights, for evaluate.py, predict.py, "
               f"export.py and --init-from, without the optimizer's state; resume from the run's last.pth "
               f"({out / 'last.pth'})")
    assert snapshot(out) == before


def with_sigint_ignored() -> None:
    """Popen's preexec_fn: a background job of a shell, or nohup's child: SIGINT ignored, SIGTERM as it comes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.slow
def test_a_run_started_with_sigint_ignored_stops_cleanly_on_sigterm(tmp_path):
    """Ctrl-C cannot reach a background job (SIGINT ignored, as Python keeps it): SIGTERM, as the pages say, stops it
    at a step boundary with a last.pth that resumes."""
    data = write_cifar10(tmp_path / "data", n_per_batch=100, n_test=20)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(data), *CPU, "--epochs", "50",
                             "--out-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=with_sigint_ignored)  # noqa: PLW1509
    wait_for_line(proc, "epoch  1/50")
    proc.send_signal(signal.SIGINT)  # ignored, as in a background job
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert f"Resume with:\n  {cli.python()} train.py " in err and not (out / ".lock").exists()
    assert load_checkpoint(out / "last.pth")["state"]["epoch"] >= 1


@pytest.mark.slow
def test_two_runs_into_one_folder_at_once_one_refuses_at_once(tmp_path):
    data = write_cifar10(tmp_path / "data", n_per_batch=100, n_test=50)
    out = tmp_path / "run"
    flags = ["--data-dir", str(data), *CPU, "--epochs", "50", "--out-dir", str(out)]
    first, second = start(*flags), start(*flags)  # started together: both reach the check at about once
    deadline = time.time() + 60
    while first.poll() is None and second.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    loser, winner = (first, second) if first.poll() is not None else (second, first)
    refusal = one_error_line(loser)  # (the process id only once the winner has written it to .lock)
    assert "is in use by another run" in refusal or "already holds run files" in refusal, refusal
    wait_for_line(winner, "epoch  1/50")  # the winner trains on, undisturbed
    third = start(*flags)
    third.wait(timeout=60)
    assert f"is in use by another run (process {winner.pid})" in one_error_line(third)
    winner.send_signal(signal.SIGKILL)  # a killed run leaves its .lock file, but not its lock
    winner.wait()
    assert (out / ".lock").exists()
    resumed = start(*flags, "--resume", str(out / "last.pth"), "--epochs", "50")
    wait_for_line(resumed, "resumed from")
    resumed.send_signal(signal.SIGINT)
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 130 and "Traceback" not in err and not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# The resume contract

@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adam"], "trained with --optimizer sgd, not adam; that would be another run: start a new run "
                              "from its weights: {python} train.py --epochs 2 --lr 0.05 --data-dir {data} --device cpu "
                              "--optimizer adam --init-from {out}/last.pth"),
    (["--batch-size", "16"], "trained with --batch-size 32, not 16; that would be another run"),
    (["--augment"], "trained with --no-augment, not --augment; that would be another run"),
    (["--scheduler", "cosine"], "trained with --scheduler none, not cosine"),
    (["--model", "resnet9"], "trained with --model simplecnn, not resnet9; that would be another run: start a new "
                             "run without --resume: {python} train.py"),
    (["--epochs", "1"], "has already done 2 epochs; --epochs 1 is fewer"),
])
def test_resume_refuses_a_flag_that_must_not_change_naming_both_values(tmp_path, cifar_dir, flags, message):
    out = tmp_path / "run"
    base = ["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out)]
    train.main([*base, "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05"])
    before = snapshot(out)
    fails_with([*base, "--resume", str(out / "last.pth"), *flags],
               message.format(data=cifar_dir, out=out, python=cli.python()))
    assert snapshot(out) == before


def test_resume_takes_the_runs_own_flags_and_uses_the_ones_that_may_change(tmp_path, cifar_dir):
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), "--epochs", "1", "--optimizer", "sgd",
                "--lr", "0.05", "--scheduler", "cosine"])
    # only --resume and what changes: the optimizer, lr and schedule come from the checkpoint
    results = train.main(["--resume", str(out / "last.pth"), "--epochs", "3", "--patience", "1", "--min-delta",
                          "1000", "--no-channels-last"])
    ckpt = load_checkpoint(out / "last.pth")
    assert (ckpt["args"]["optimizer"], ckpt["args"]["lr"], ckpt["args"]["scheduler"]) == ("sgd", 0.05, "cosine")
    assert (ckpt["args"]["epochs"], ckpt["args"]["patience"], ckpt["args"]["channels_last"]) == (3, 1, False)
    assert results["stopped_early"] is True and results["epochs_completed"] == 2  # --patience 1 was used


def test_the_run_folders_args_json_makes_the_same_run_again_with_config(tmp_path, cifar_dir):
    """args.json holds the run's resolved flags; --config takes it (a flag given wins over it), and the run it
    makes ends at the same weights."""
    flags = ["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05", "--nesterov",
             "--augment", "--no-channels-last", "--widths", "8,8,8", "--model", "airnet", "--val-split", "0"]
    train.main([*flags, "--out-dir", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "args.json").read_text())
    assert saved == json.loads(json.dumps(runargs.run_flags(config.parse_args(flags)))) and saved["widths"] == [8, 8, 8]
    assert "out_dir" not in saved and saved["data_dir"] == str(cifar_dir.resolve())
    train.main(["--config", str(tmp_path / "a" / "args.json"), "--out-dir", str(tmp_path / "b")])
    a, b = load_checkpoint(tmp_path / "a" / "last.pth"), load_checkpoint(tmp_path / "b" / "last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert {**a["args"], "out_dir": None} == {**b["args"], "out_dir": None}
    assert b["argv"][-2:] == ["--out-dir", str(tmp_path / "b")] and "--config" not in b["argv"]  # resumable as is
    # a flag given wins over the file's
    assert runargs.parse_run_args(["--config", str(tmp_path / "a" / "args.json"), "--lr", "0.1"])[0].lr == 0.1


@pytest.mark.parametrize("content, message", [
    (None, "--config {path}: No such file or directory"),
    ("{'lr': 0.1}", "--config {path}: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                    "(char 1)); give a file like a run's args.json"),
    ("[1, 2]", "--config {path}: not a JSON object of flags (under 1 MB), like a run's args.json"),
    ('{"learning_rate": 0.1}', "--config {path}: 'learning_rate' is not a flag it may set (the keys are "
                               "train.py's flags as args.json spells them, with _ for -)"),
    ('{"augment": "yes"}', "--config {path}: 'augment' is a switch: give true or false, not \"yes\""),
    ('{"lr": "fast"}', "--config {path}: argument --lr: invalid float value: 'fast'"),
    ('{"optimizer": "lion"}', "--config {path}: argument --optimizer: invalid choice: 'lion'"),
])
def test_a_bad_config_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "flags.json"
    if content is not None:
        path.write_text(content)
    fails_with(["--config", str(path), "--out-dir", str(tmp_path / "run")], message.format(path=path))
    assert not (tmp_path / "run").exists()


def test_resumes_from_another_folder_find_the_data_and_do_not_pile_up_flags(tmp_path, cifar_dir, monkeypatch):
    """A run started with a relative --data-dir, resumed twice from another working folder with flags that change:
    the data is the checkpoint's (resolved), and the saved command line holds each flag once, with its last value,
    as does the command a refusal offers."""
    monkeypatch.chdir(cifar_dir.parent)
    train.main(["--data-dir", cifar_dir.name, *CPU, "--out-dir", "run", "--epochs", "1", "--lr", "0.001"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    last = str(cifar_dir.parent / "run" / "last.pth")
    train.main(["--resume", last, "--epochs", "2", "--lr", "0.002", "--no-channels-last"])
    train.main(["--resume", last, "--epochs", "3", "--lr", "0.003", "--channels-last"])
    argv = load_checkpoint(last)["argv"]
    assert argv == ["--data-dir", "cifar", "--device", "cpu", "--out-dir", "run", "--epochs", "3", "--lr", "0.003",
                    "--channels-last"], argv
    error = fails_with(["--resume", last, "--batch-size", "16"], "that would be another run")
    assert error.endswith(f"{cli.python()} {ROOT / 'train.py'} --data-dir cifar --device cpu --epochs 3 --lr 0.003 "
                          f"--channels-last --batch-size 16 --init-from {last}"), error
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_resuming_a_finished_run_trains_nothing_says_why_and_how_to_train_on(tmp_path, cifar_dir, capsys):
    """The FAQ's resume command on a run that has done all its epochs, or that early stopping ended: refused in one
    line that gives the command that trains on; nothing is tested again, no file is rewritten."""
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), "--epochs", "1"])
    before, last = snapshot(out), str(out / "last.pth")
    capsys.readouterr()
    fails_with(["--resume", last, "--lr", "1e-4", "--grad-clip", "1.0"],
               f"--resume: the run has done all its 1 epochs, so nothing is left to train (its test: {cli.python()} "
               f"evaluate.py --checkpoint {out / 'best.pth'}); to train on, give a larger --epochs: {cli.python()} "
               f"train.py --resume {last} --lr 1e-4 --grad-clip 1.0 --epochs 2")
    assert capsys.readouterr().out == "" and snapshot(out) == before

    stopped = tmp_path / "stopped"
    results = train.main(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(stopped), "--epochs", "5",
                          "--patience", "1", "--min-delta", "1000"])
    assert results["stopped_early"] and results["epochs_completed"] == 2
    before, last = snapshot(stopped), str(stopped / "last.pth")
    fails_with(["--resume", last, "--epochs", "4"],
               f"--resume: early stopping ended the run after epoch 2 (1 epochs without improvement, --patience 1), "
               f"so nothing is left to train; to train on, give a larger --patience (0 = off): {cli.python()} train.py "
               f"--resume {last} --epochs 4 --patience 0")
    assert snapshot(stopped) == before
    results = train.main(["--resume", last, "--epochs", "3", "--patience", "0"])  # the way forward works
    assert results["epochs_completed"] == 3 and not results["stopped_early"]


def test_simplecnns_weights_are_offered_only_at_the_size_they_fit(tmp_path, cifar_dir):
    """SimpleCNN's fc1 follows --image-size: a resume at another size is offered a new run without --init-from (with
    it, the weights would not load), --init-from at another size is one line naming the size they fit, and a
    flag the run did not give is shown as not given (not as None)."""
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), "--epochs", "1"])
    last = str(out / "last.pth")
    error = fails_with(["--resume", last, "--image-size", "48"], "the run was trained with --image-size 32, not 48")
    assert error.endswith(f"start a new run without --resume: {cli.python()} {cli.script('train.py')} --data-dir "
                          f"{cifar_dir} --device cpu --epochs 1 --image-size 48"), error
    fails_with(["--data-dir", str(cifar_dir), *CPU, "--image-size", "48", "--init-from", last, "--out-dir",
                str(tmp_path / "other")],
               f"--init-from {last}: simplecnn's weights fit the --image-size they were trained at (32) alone, not 48: "
               f"give --image-size 32, or leave out --init-from")
    assert not (tmp_path / "other").exists()
    fails_with(["--resume", last, "--widths", "8,16"], "the run was trained with no --widths, not 8,16; ")


def test_an_out_dir_that_is_a_file_or_lies_under_one_is_one_line_naming_the_file(tmp_path, cifar_dir):
    (tmp_path / "notes.txt").write_text("mine\n")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        fails_with(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out)],
                   f"--out-dir {out}: {tmp_path / 'notes.txt'} is a file, not a folder; give --out-dir a new folder")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_the_way_forward_printed_from_another_folder_runs_there(tmp_path, cifar_dir):
    """train.py run by its full path from another folder: the command its refusal prints names train.py (and
    evaluate.py) by a path that works from that folder, and it runs there."""
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run("--data-dir", str(cifar_dir), *CPU, "--out-dir", "run", "--epochs", "1").returncode == 0
    refused = run("--resume", "run/last.pth")
    test, command = re.fullmatch(r"train.py: error: .*\(its test: (.*)\); to train on, give a larger --epochs: (.*)\n",
                                 refused.stderr).groups()
    assert shlex.split(test)[1] == str(ROOT / "evaluate.py") and shlex.split(command)[1] == str(ROOT / "train.py")
    again = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs_completed"] == 2


def test_the_faqs_way_out_of_a_diverged_run_works_and_is_recorded(tmp_path, cifar_dir, capsys):
    """The FAQ's answer to a loss that blows up: the run stops with one line that names last.pth, and resuming from
    it with a lower --lr and --grad-clip 1.0 (the FAQ's exact command) goes on; the change takes effect from that
    step on, and the checkpoint and metrics.csv record it."""
    out = tmp_path / "run"
    base = ["--data-dir", str(cifar_dir), *CPU]
    train.main([*base, "--out-dir", str(out), "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05"])
    before = snapshot(out)
    # the same run, on with a far too large lr (now allowed on resume): it diverges in epoch 2
    error = fails_with(["--resume", str(out / "last.pth"), "--epochs", "3", "--lr", "1e12"], " in epoch 2; ")
    assert re.fullmatch(r"train.py: error: the training loss became \S+ in epoch 2; \S+last.pth holds the weights "
                        r"before it: go on from there with a lower lr and clipping: " + re.escape(cli.python()) +
                        r" train.py --resume \S+last.pth --lr 1e\+11 --grad-clip 1.0", error), error
    assert "Traceback" not in error and snapshot(out) == before  # nothing saved from the diverged epoch
    capsys.readouterr()
    results = train.main(["--resume", str(out / "last.pth"), "--epochs", "3", "--lr", "0.01", "--grad-clip", "1.0"])
    assert "changed from here on: --grad-clip 0.0 -> 1.0; --lr 0.05 -> 0.01" in capsys.readouterr().out
    assert results["epochs_completed"] == 3
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["changes"] == [{"epoch": 2, "step": 0, "flags": "--grad-clip 0.0 -> 1.0; --lr 0.05 -> 0.01"}]
    assert (ckpt["args"]["lr"], ckpt["args"]["grad_clip"]) == (0.01, 1.0)
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.01]  # the new peak, in the optimizer
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",lr,train_seconds,images_per_s,val_top5,changed")
    assert [r.split(",")[-1] for r in rows[1:]] == ["", "--grad-clip 0.0 -> 1.0; --lr 0.05 -> 0.01 from step 0", ""]
    assert [float(r.split(",")[5]) for r in rows[1:]] == [0.05, 0.01, 0.01]  # the lr column (no schedule)


def test_a_loss_that_diverges_but_stays_finite_is_caught(tmp_path, cifar_dir):
    """A training loss far above chance level (ln 10 = 2.3 here) stops the run, finite or not."""
    out = tmp_path / "run"
    error = fails_with(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), "--optimizer", "adam", "--lr", "1",
                        "--epochs", "3"], "in epoch 1; start again with a lower --lr (e.g. --lr 0.1) or --grad-clip 1")
    loss = float(re.search(r"the training loss became (\S+) in epoch 1", error)[1])
    assert 23 < loss < math.inf, error  # finite, and caught
    assert not (out / "last.pth").exists()


def test_a_damaged_metrics_csv_is_rebuilt_from_the_checkpoint_on_resume(tmp_path, cifar_dir):
    out = tmp_path / "run"
    base = ["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out)]
    train.main([*base, "--epochs", "2"])
    good = (out / "metrics.csv").read_text().splitlines()
    (out / "metrics.csv").write_bytes(b"epoch,train_loss\n\xff\xfe garbage,,\n")
    train.main([*base, "--epochs", "3", "--resume", str(out / "last.pth")])
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[:3] == good and rows[3].startswith("3,")


# ---------------------------------------------------------------------------------------------------------------
# Signals at start-up and during the final test

@pytest.mark.slow
def test_ctrl_c_while_torch_is_still_importing_exits_130_without_a_traceback(tmp_path, cifar_dir):
    proc = start("--data-dir", str(cifar_dir), *CPU, "--out-dir", str(tmp_path / "run"))
    time.sleep(0.2)  # torch takes 0.5 to 1.5 s to import
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and out == "", err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_during_the_final_test_stops_at_once_and_says_how_to_rerun_it(tmp_path):
    data = write_cifar10(tmp_path / "data", n_per_batch=8, n_test=4000)  # a long final test
    out = tmp_path / "run"
    proc = start("--data-dir", str(data), *CPU, "--out-dir", str(out), "--epochs", "1", "--model", "resnet9",
                 "--widths", "16,32,64,128", "--tta", "shifts")
    wait_for_line(proc, "epoch 1/1")
    proc.send_signal(signal.SIGINT)
    started = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and time.time() - started < 10, err
    assert "training finished (1 epochs" in err and f"{cli.python()} evaluate.py --checkpoint {out / 'best.pth'}" in err
    assert not (out / "results.json").exists() and load_checkpoint(out / "best.pth")["state"]["epoch"] == 1


# ---------------------------------------------------------------------------------------------------------------
# A real full disk

@pytest.fixture
def small_disk(tmp_path, mounts):
    """A 12 MiB tmpfs mounted for the test (needs root and a kernel that lets it mount)."""
    mounts(tmp_path / "disk", "12m")
    return tmp_path / "disk"


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(small_disk, cifar_dir):
    # ResNet-9's 6.6M parameters: ~105 MB for weights + Adam's two moments, x3 at the peak of a save
    fails_with(["--data-dir", str(cifar_dir), *CPU, "--model", "resnet9", "--out-dir", str(small_disk / "run")],
               "not enough free space")
    assert list(small_disk.iterdir()) == []


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_run_is_one_line_and_last_pth_survives(small_disk, tmp_path):
    data = write_cifar10(tmp_path / "data", n_per_batch=40, n_test=20)
    out = small_disk / "run"
    proc = start("--data-dir", str(data), *CPU, "--out-dir", str(out), "--epochs", "500", "--val-split", "0")
    wait_for_line(proc, "epoch   2/500")
    with open(small_disk / "filler", "wb") as f:  # take every byte that is left
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    proc.wait(timeout=60)
    line = one_error_line(proc)
    assert "No space left on device" in line and "is intact" in line
    # no .tmp, no .lock; curves.png is drawn after the error when the failed write freed room for it, and is
    # then whole (written atomically)
    left = sorted(p.name for p in out.iterdir())
    assert [name for name in left if name != "curves.png"] == ["args.json", "best.pth", "last.pth", "metrics.csv"]
    if "curves.png" in left:
        png = (out / "curves.png").read_bytes()
        assert png.startswith(b"\x89PNG") and png[-8:-4] == b"IEND"
    epochs = load_checkpoint(out / "last.pth")["state"]["epoch"]
    (small_disk / "filler").unlink()
    resumed = train.main(["--resume", str(out / "last.pth"), "--epochs", str(epochs + 1)])
    assert resumed["epochs_completed"] == epochs + 1


# ---------------------------------------------------------------------------------------------------------------
# Environment and paths

def test_world_size_without_torchrun_is_one_line(tmp_path, cifar_dir):
    proc = subprocess.run([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU, "--out-dir",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WORLD_SIZE": "2"})
    assert "start with torchrun, or unset WORLD_SIZE" in one_error_line(proc)


def test_a_path_component_over_255_bytes_is_one_line(tmp_path, cifar_dir):
    fails_with(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(tmp_path / ("x" * 300))], "File name too long")
    assert list(tmp_path.iterdir()) == [tmp_path / "cifar"]


def readers() -> list[str]:
    have_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    return ["evaluate.py", "predict.py"] + (["export.py"] if have_onnx else [])


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.update(model=torch.zeros(3)), "model must map names to tensors"),
    (lambda c: c.update(num_classes="10"), "num_classes must be an integer"),
    (lambda c: c.update(classes=c["classes"][:9]), "classes must be num_classes names"),
    (lambda c: c.update(mean=[0.5] * 5), "mean must be 3 finite numbers"),
    (lambda c: c.update(std=[0.0, 1.0, 1.0]), "std in [1e-3, 1]"),
    (lambda c: c.update(mean=[1e300] * 3), "mean must be in [0, 1]"),
    (lambda c: c.update(model_name="os.system"), "model_name 'os.system' is neither one of our models nor a"),
    (lambda c: c["model"].update({"fc3.weight": torch.zeros(2, 2)}), "checkpoint does not match its model"),
    (lambda c: c["model"]["fc3.weight"].view(-1)[0].fill_(math.nan), "holds non-finite weights (model: fc3.weight)"),
    (lambda c: c.update(image_size=2**40), "image_size must be an integer in [8, 1024]"),
])
def test_checkpoints_holding_nonsense_are_refused_in_one_line(tmp_path, cifar_dir, damage, message):
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), "--epochs", "1"])
    ckpt = torch.load(out / "last.pth", weights_only=True)  # (every reader's, and --resume's: best.pth does not resume)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "bad.pth")
    for script in readers():
        module = importlib.import_module(script[:-3])
        images = [str(out / "best.pth")] if script == "predict.py" else []
        with pytest.raises(SystemExit) as exc:
            module.main(["--checkpoint", str(tmp_path / "bad.pth"), *images])
        assert str(exc.value.code).startswith(f"{script}: error: ") and message in str(exc.value.code)
    before = snapshot(tmp_path)
    fails_with(["--resume", str(tmp_path / "bad.pth"), "--out-dir", str(tmp_path), "--epochs", "2"], message)
    assert snapshot(tmp_path) == before


def test_an_output_that_names_an_input_is_refused(tmp_path, cifar_dir):
    import export
    import plot
    out = tmp_path / "run"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), "--epochs", "1"])
    before = snapshot(out)
    for main, argv in ((export.main, ["--checkpoint", str(out / "best.pth"), "--output", str(out / "best.pth")]),
                       (plot.main, [str(out / "metrics.csv"), "--output", str(out / "metrics.csv")])):
        if main is export.main and "export.py" not in readers() or main is plot.main and not \
                importlib.util.find_spec("matplotlib"):
            continue
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert "is also an input" in str(exc.value.code)
    assert snapshot(out) == before


def test_an_exceptions_text_is_quoted_on_one_short_line():
    error = RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for head.weight: " + "x" * 1000)
    line = cli.one_line(error)
    assert line.startswith("Error(s) in loading state_dict: size mismatch for head.weight: xxx")
    assert len(line) == 200 and line.endswith("…") and "\n" not in line and "\t" not in line
    assert cli.one_line(ValueError("short\n  one")) == "short one"
