"""Data-parallel training: real 2-process gloo runs on the CPU through torchrun."""
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import train
from conftest import ROOT, as_from_a_terminal, write_cifar10

pytestmark = pytest.mark.slow  # real processes, signals and runs: python -m pytest -m 'not slow' skips them


# How the processes' printed commands name torchrun: with PATH=/usr/bin:/bin, as the tests start them, this
# interpreter's `torchrun` is not on PATH, so they name this interpreter and torch's module
LAUNCHER = f"{sys.executable} -m torch.distributed.run"


def test_a_printed_torchrun_command_names_a_torchrun_that_is_this_interpreters(monkeypatch):
    """`torchrun` where PATH finds this environment's own; else this interpreter with torch's module, which runs
    from a shell where the environment is not active (a bare `torchrun` there: command not found)."""
    import cli
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}:/usr/bin:/bin")
    assert cli.torchrun() == ["torchrun"]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert cli.torchrun() == [cli.python(), "-m", "torch.distributed.run"] and cli.python() == sys.executable


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           "--device", "cpu", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # kill the workers too, not only the launcher
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("optimizer", ["sgd", "muon", "sgd --cutmix-alpha 1.0"])  # (cutmix: pairs across processes)
def test_two_processes_take_the_same_first_step_as_one(tmp_path, optimizer):
    # 40 images, val split 0.2: exactly 32 train, so one epoch is one optimizer step of batch 32
    data = write_cifar10(tmp_path / "data", n_per_batch=8, n_test=21)
    flags = ["--data-dir", str(data), "--epochs", "1", "--batch-size", "32", "--val-split", "0.2",
             "--optimizer", *optimizer.split(), "--lr", "0.1", "--no-channels-last"]
    train.main([*flags, "--device", "cpu", "--out-dir", str(tmp_path / "one")])
    torchrun(*flags, "--out-dir", str(tmp_path / "two"))  # 2 processes x 16 images
    one, two = weights(tmp_path / "one" / "last.pth"), weights(tmp_path / "two" / "last.pth")
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k
    assert json.loads((tmp_path / "two" / "results.json").read_text())["test_accuracy"] == \
        json.loads((tmp_path / "one" / "results.json").read_text())["test_accuracy"]


def test_ddp_run_metrics_are_exact_and_files_are_written_once(tmp_path, capsys):
    data = write_cifar10(tmp_path / "data", n_per_batch=41, n_test=51)  # 205 train images, 51 test: odd sizes
    out = tmp_path / "run"
    proc = torchrun("--data-dir", str(data), "--epochs", "2", "--batch-size", "16", "--accum-steps", "2",
                    "--augment", "--val-split", "0.1", "--out-dir", str(out))
    assert proc.stdout.count("epoch 1/2") == 1 and "x 2;" in proc.stdout  # only rank 0 prints
    # warnings too (each process holds the same split), each a whole line: 20 images held out for 10 classes
    warned = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].count("warning") == 1 and \
        warned[0].startswith("warning: --val-split 0.1 holds out 20 images for 10 classes, "), proc.stderr
    assert (out / "metrics.csv").read_text().count("\n") == 3
    results = json.loads((out / "results.json").read_text())
    ckpt = torch.load(out / "best.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # one process, the whole test set, the same checkpoint: the same accuracy and loss
    single = evaluate.main(["--checkpoint", str(out / "best.pth")])
    assert single["accuracy"] == results["test_accuracy"]
    assert single["loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    capsys.readouterr()

    # --resume under torchrun, from a checkpoint a DDP run wrote
    proc = torchrun("--data-dir", str(data), "--epochs", "3", "--batch-size", "16", "--accum-steps", "2",
                    "--augment", "--val-split", "0.1", "--out-dir", str(out), "--resume", str(out / "last.pth"))
    assert "resumed from" in proc.stdout and "epoch 3/3" in proc.stdout
    assert json.loads((out / "results.json").read_text())["epochs_completed"] == 3


def test_a_signal_to_one_process_stops_all_at_the_same_step_and_resumes_exactly(tmp_path):
    data = write_cifar10(tmp_path / "data", n_per_batch=120, n_test=50)  # 67 steps an epoch
    flags = ["--data-dir", str(data), "--epochs", "2", "--batch-size", "8", "--augment"]
    torchrun(*flags, "--out-dir", str(tmp_path / "straight"))

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--device", "cpu", *flags, "--out-dir", str(out), "--log-interval", "1"]  # (a line after every step)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, preexec_fn=as_from_a_terminal)
    for line in proc.stdout:  # a step of epoch 2 done, however loaded the machine: the stop is mid-epoch
        if line.startswith("epoch 2/2  step"):
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGTERM)  # one process only: the other must stop with it, not hang
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err.split("stopping after this optimizer step")[0]
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["state"]["epoch"] == 1 and ckpt["partial_epoch"]["step"] > 0
    command = next(line for line in err.splitlines() if line.strip().startswith(f"{LAUNCHER} "))
    assert command.strip().startswith(f"{LAUNCHER} --nproc_per_node=2 train.py ")
    torchrun(*shlex.split(command)[5:])  # the printed command, minus the launcher and the --device we add

    a, b = weights(tmp_path / "straight" / "last.pth"), weights(out / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_when_rank_0_refuses_every_process_leaves_with_one_line(tmp_path):
    """The run folder holds another run's files: rank 0 refuses to claim it, and rank 1 learns of it at once and
    leaves with the same line, instead of a gloo "Connection closed by peer" traceback."""
    data = write_cifar10(tmp_path / "data", n_per_batch=8, n_test=21)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("someone else's\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--device", "cpu", "--data-dir", str(data), "--epochs", "1", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert len(ours) == 2 and len(set(ours)) == 1 and "already holds run files (metrics.csv)" in ours[0], proc.stderr
    assert "Connection closed by peer" not in proc.stderr and "gloo" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert (out / "metrics.csv").read_text() == "someone else's\n"


# ---------------------------------------------------------------------------------------------------------------
# A torchrun environment whose other processes never come

def lonely_rank(tmp_path: Path, data: Path, timeout: str = "60") -> subprocess.Popen:
    """train.py as rank 0 of 2, the second process never started."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "DIST_JOIN_TIMEOUT": timeout}
    return subprocess.Popen([sys.executable, "train.py", "--data-dir", str(data), "--device", "cpu", "--out-dir",
                             str(tmp_path / "run")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_waiting_for_a_missing_peer_says_so_and_a_signal_ends_it(tmp_path, cifar_dir, signum):
    proc = lonely_rank(tmp_path, cifar_dir)
    waiting = proc.stderr.readline()
    assert waiting.startswith("train.py: rank 0 of WORLD_SIZE=2: waiting up to 60 s (DIST_JOIN_TIMEOUT) for the "
                              "other processes at 127.0.0.1:"), waiting
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=50)  # (within the 60 s wait; the exit code tells the signal ended it)
    assert proc.returncode == 128 + signum and out == ""
    assert err == f"train.py: stopped by {signal.Signals(signum).name}\n"
    assert not (tmp_path / "run").exists()


def test_a_peer_that_never_comes_is_one_line_after_the_timeout(tmp_path, cifar_dir):
    proc = lonely_rank(tmp_path, cifar_dir, timeout="3")
    out, err = proc.communicate(timeout=60)
    lines = err.splitlines()
    assert proc.returncode == 1 and out == "" and lines[0].startswith("train.py: rank 0 of WORLD_SIZE=2: waiting")
    assert len(lines) == 2 and lines[1].startswith("train.py: error: the processes of WORLD_SIZE=2 did not all join "
                                                   "at 127.0.0.1:") and "within 3 s" in lines[1], err
    assert lines[1].endswith("start every one with torchrun (or raise DIST_JOIN_TIMEOUT)")


# ---------------------------------------------------------------------------------------------------------------
# A peer stopped or killed mid-run: the others end within DIST_TIMEOUT, each with one line

def workers(launcher: subprocess.Popen, count: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, read from their environment, once all have started."""
    deadline = time.time() + 60
    while time.time() < deadline:
        found = {}
        for pid in map(int, Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()):
            environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            if "RANK" in environ:
                found[int(environ["RANK"])] = pid
        if len(found) == count:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun's workers did not start")


def alive(pid: int) -> bool:
    """Whether process `pid` runs (not ended, nor a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_group(tmp_path: Path, nproc: int, dist_timeout: int) -> tuple[subprocess.Popen, Path]:
    """A torchrun group of `nproc` CPU processes training for long, in a session of its own, and its data."""
    data = write_cifar10(tmp_path / "data", n_per_batch=8, n_test=10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           "--device", "cpu", "--data-dir", str(data), "--epochs", "2000", "--out-dir", str(tmp_path / "run")]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "DIST_TIMEOUT": str(dist_timeout)},
                            start_new_session=True), data


def in_epoch_2(launcher: subprocess.Popen, nproc: int) -> dict[int, int]:
    """{rank: pid} of the group's processes, once epoch 1 has ended."""
    for line in launcher.stdout:
        if line.startswith("epoch    2/2000"):
            break
    return workers(launcher, nproc)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the processes from /proc")
@pytest.mark.parametrize("signum, nproc, what", [
    (signal.SIGSTOP, 2, "did not answer for 5 s (DIST_TIMEOUT; stopped or hung?)"),
    (signal.SIGKILL, 3, "has ended (killed or failed)")])
def test_a_stopped_or_killed_peer_ends_the_group_with_one_line_from_each_survivor(tmp_path, signum, nproc, what):
    launcher, data = start_group(tmp_path, nproc, 5)
    pids = {}
    try:
        pids.update(in_epoch_2(launcher, nproc))
        os.kill(pids[nproc - 1], signum)
        deadline = time.time() + 120
        while any(alive(pids[rank]) for rank in range(nproc - 1)):  # the survivors end
            assert time.time() < deadline, "the other processes are still waiting"
            time.sleep(0.2)
    finally:  # (torchrun itself kills a stopped worker 30 s after the others end: not waited for here)
        for pid in [*pids.values(), launcher.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _, err = launcher.communicate(timeout=60)
    ours = [line for line in err.splitlines() if line.startswith("train.py: ")]
    resume = f"{LAUNCHER} --nproc_per_node={nproc} train.py --device cpu --data-dir {data} --epochs 2000 --out-dir " \
             f"{tmp_path / 'run'} --resume {tmp_path / 'run' / 'last.pth'}"
    lost = [f"train.py: error: rank {rank} of {nproc}: another process of the group {what}; this one stops too: "
            f"resume from the last completed epoch with: {resume}" for rank in range(nproc - 1)]
    # one line from each survivor: the first to notice says why; one that torchrun ends meanwhile says so
    assert len(ours) == nproc - 1 and set(ours) & set(lost) and set(ours) <= {*lost, "train.py: stopped by SIGTERM"}, \
        ours
    assert "gloo" not in err and "pair.cc" not in err and "unbound_buffer" not in err, err[-3000:]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the processes from /proc")
def test_sigterm_to_torchrun_ends_every_process_even_with_a_stopped_peer(tmp_path):
    launcher, _ = start_group(tmp_path, 2, 2)
    pids = {}
    try:
        pids.update(in_epoch_2(launcher, 2))
        os.kill(pids[1], signal.SIGSTOP)
        launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both
        deadline = time.time() + 60
        while alive(pids[0]):  # the running one ends by itself: its peer does not answer for DIST_TIMEOUT
            assert time.time() < deadline, "rank 0 is still waiting for its stopped peer"
            time.sleep(0.2)
        # the stopped one, continued, meets the SIGTERM waiting for it and ends too (torchrun would otherwise
        # SIGKILL it after 30 s of its own)
        os.kill(pids[1], signal.SIGCONT)
        _, err = launcher.communicate(timeout=20)
        assert not any(alive(pid) for pid in pids.values())
    finally:
        for pid in [*pids.values(), launcher.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert "train.py: error: rank 0 of 2: another process of the group did not answer for 2 s" in err, err[-3000:]
