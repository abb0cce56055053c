"""Nothing wrong, nothing lost, as a user meets it: a run writes only into the folder it locked, temporary files are
created exclusively, what is opened for writing or locking is a regular file (never a FIFO to block on), the lock
works where the system has no flock (Windows), outputs (empty paths, picture formats, a reader gone, an --out-dir
among the images), a copied run is its own run, messages that name what the user needs, values too small to act.
(A stopped or killed torchrun peer: test_ddp.py.)"""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import checkpoint
import decode
import folders
import runfolder
from runfolder import RunFolder, RunFolderError
from conftest import ROOT, as_from_a_terminal, write_cifar10

CPU = ["--device", "cpu"]


def start(*argv: str, script: str = "train.py") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=as_from_a_terminal, env={**os.environ, "OMP_NUM_THREADS": "1"})


def error_line(err: str, prog: str = "train.py") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# A run writes only into the folder it locked

@pytest.mark.slow
def test_a_run_folder_moved_while_training_stops_the_run_and_another_run_in_its_old_name_is_untouched(tmp_path):
    data = write_cifar10(tmp_path / "data", n_per_batch=8)
    out, moved = tmp_path / "run", tmp_path / "moved"
    proc = start("--data-dir", str(data), *CPU, "--epochs", "500", "--val-split", "0", "--out-dir", str(out))
    for line in proc.stdout:
        if line.startswith("epoch   1/500"):
            break
    proc.send_signal(signal.SIGSTOP)  # between two saves: the move and the new run happen while it is held
    out.rename(moved)
    out.mkdir()  # another run, started in the freed name
    theirs = {"last.pth": b"another run's checkpoint", "metrics.csv": b"epoch\n1\n", ".lock": b"1"}
    for name, content in theirs.items():
        (out / name).write_bytes(content)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    line = error_line(err)
    assert f"the run folder {out} was moved" in line and f"its files are now in {moved}" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == theirs  # nothing written, nothing deleted
    assert {"last.pth", "best.pth", "metrics.csv"} <= {p.name for p in moved.iterdir()}
    assert checkpoint.load_checkpoint(moved / "last.pth")["state"]["epoch"] >= 1


def test_the_image_cache_never_writes_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("outside the data folder")
    root = tmp_path / "data"
    root.mkdir()
    cache = root / ".cache-train-32-0123456789abcdef.pt"
    planted = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # the name it once used: predictable
    planted.symlink_to(victim)
    data = {"images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "labels": torch.zeros(1, dtype=torch.int64),
            "skipped": []}
    folders._write_cache(cache, data)
    assert victim.read_text() == "outside the data folder"
    assert torch.equal(torch.load(cache, weights_only=True)["images"], data["images"])
    assert {p.name for p in root.iterdir()} == {cache.name, planted.name}  # (no temporary file left)


def test_a_run_file_is_never_written_through_a_symlink_or_fifo_planted_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth.tmp").symlink_to(victim)
    os.mkfifo(run / "metrics.csv.tmp")  # opened for writing, it would wait for a reader forever
    checkpoint.write_atomically(run / "last.pth", b"new")
    checkpoint.write_atomically(run / "metrics.csv", b"epoch\n")
    assert victim.read_text() == "keep"
    assert (run / "last.pth").read_bytes() == b"new" and (run / "metrics.csv").read_bytes() == b"epoch\n"
    assert sorted(p.name for p in run.iterdir()) == ["last.pth", "metrics.csv"]


# ---------------------------------------------------------------------------------------------------------------
# Files opened for writing or locking: regular files, checked without blocking

@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_a_fifo_at_the_lock_file_is_refused_at_once(tmp_path, cifar_dir, resume):
    out = tmp_path / "run"
    if resume:
        import train
        train.main(["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--out-dir", str(out)])
    else:
        out.mkdir()
    os.mkfifo(out / ".lock")
    argv = ["--resume", str(out / "last.pth"), "--epochs", "2"] if resume else \
        ["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--out-dir", str(out)]
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert error_line(proc.stderr) == f"train.py: error: {out / '.lock'} is a FIFO, not the run's lock file; delete " \
                                      f"it and try again"
    assert (out / ".lock").is_fifo()


@pytest.mark.slow
def test_a_fifo_where_a_script_reads_metrics_or_writes_its_mlflow_store_is_refused_at_once(tmp_path, cifar_dir):
    if importlib.util.find_spec("matplotlib"):  # (without it plot.py stops first, asking for it)
        os.mkfifo(tmp_path / "metrics.csv")
        proc = subprocess.run([sys.executable, "plot.py", str(tmp_path / "metrics.csv"), "--output",
                               str(tmp_path / "c.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert error_line(proc.stderr, "plot.py") == \
            f"plot.py: error: cannot read metrics file {tmp_path / 'metrics.csv'}: it is a FIFO; give a regular file"
    pytest.importorskip("mlflow")
    os.mkfifo(tmp_path / "mlflow.db")
    proc = subprocess.run([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--mlflow",
                           "--val-split", "0", "--out-dir", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert error_line(proc.stderr) == f"train.py: error: --mlflow: the tracking store {tmp_path / 'mlflow.db'} is a " \
        f"FIFO, not a database file; set MLFLOW_TRACKING_URI to a store that can be written"


# ---------------------------------------------------------------------------------------------------------------
# Without flock (Windows): an atomic lock file

WITHOUT_POSIX = """import os, runpy, sys
sys.modules["fcntl"] = None  # import fcntl fails, as on Windows
del os.O_DIRECTORY
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_train_evaluate_and_predict_run_without_fcntl_and_o_directory(tmp_path):
    from PIL import Image
    from image_files import make_image_folder
    data = make_image_folder(tmp_path / "photos")
    out = tmp_path / "run"

    def run(script: str, *argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-c", WITHOUT_POSIX, script, *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc
    run("train.py", "--dataset", "imagefolder", "--data-dir", str(data), "--image-size", "16", *CPU, "--epochs", "1",
        "--val-split", "0", "--out-dir", str(out))
    assert (out / "results.json").is_file() and not (out / ".lock").exists()
    assert "test loss" in run("evaluate.py", "--checkpoint", str(out / "best.pth"), *CPU).stdout
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "x.png")
    assert run("predict.py", "--checkpoint", str(out / "best.pth"), *CPU, str(tmp_path / "x.png")).stdout.startswith(
        f"{tmp_path / 'x.png'}: ")


def test_the_lock_file_locks_where_there_is_no_flock_and_a_dead_owners_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    out = tmp_path / "run"
    first = RunFolder(out, "a")
    first.lock()
    assert (out / ".lock").read_text() == str(os.getpid())
    with pytest.raises(RunFolderError, match=rf"is in use by another run \(process {os.getpid()}\)"):
        RunFolder(out, "b").lock()
    first.release()
    assert not out.exists()  # created by it, left empty: removed
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / ".lock").write_text(str(gone.pid))  # a killed run's
    second = RunFolder(out, "b")
    second.lock()
    assert (out / ".lock").read_text() == str(os.getpid())
    second.release()
    assert list(out.iterdir()) == []


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def race_in_threads(out: Path, starters: int) -> list[str]:
    """`starters` threads lock `out` at the same instant: "owner" or the refusal, from each."""
    start = threading.Barrier(starters)
    outcomes = []

    def one() -> None:
        start.wait()
        try:
            RunFolder(out, "run").lock()
            outcomes.append("owner")
        except RunFolderError as e:
            outcomes.append(str(e))
    threads = [threading.Thread(target=one) for _ in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def race_in_processes(out: Path, starters: int) -> list[str]:
    """The same with `starters` forked processes, each its own process id: each holds what it won until all
    have said ("1": owner, "0": refused, "E": anything else)."""
    go, said, hold = os.pipe(), os.pipe(), os.pipe()
    pids = []
    for _ in range(starters):
        pid = os.fork()
        if pid == 0:  # (the child: one byte, then wait to be let go, then leave without a word)
            outcome = b"E"
            try:
                os.close(go[1])
                os.close(hold[1])
                os.read(go[0], 1)
                RunFolder(out, "run").lock()
                outcome = b"1"
            except RunFolderError:
                outcome = b"0"
            finally:
                os.write(said[1], outcome)
                os.read(hold[0], 1)
                os._exit(0)
        pids.append(pid)
    os.close(go[1])  # all start at once: each read ends
    outcomes = b""
    while len(outcomes) < starters:
        outcomes += os.read(said[0], starters)
    os.close(hold[1])
    for pid in pids:
        os.waitpid(pid, 0)
    for fd in (*go[:1], *said, hold[0]):
        os.close(fd)
    return [{"1": "owner", "0": "refused"}.get(c, c) for c in outcomes.decode()]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its racing processes")
def test_of_runs_started_at_once_over_a_stale_lock_file_exactly_one_owns_the_folder(tmp_path, monkeypatch):
    """Each round: a killed run's .lock, and 8 runs that find it stale at the same instant. (Taking it over in two
    steps, delete then create, let two of them own it in about one round in 20.)"""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    pid = dead_pid()
    for round in range(200):
        out = tmp_path / f"threads{round}"
        out.mkdir()
        (out / ".lock").write_text(str(pid))
        outcomes = race_in_threads(out, 8)
        assert outcomes.count("owner") == 1, (round, outcomes)
        assert sorted(os.listdir(out)) == [".lock"] and (out / ".lock").read_text() == str(os.getpid())
    refusal = f"{out} is in use by another run (process {os.getpid()}); wait for it to end, or choose another " \
              f"--out-dir; if no run is using it, delete {out / '.lock'}"
    assert set(outcomes) == {"owner", refusal}, outcomes
    for round in range(4):
        out = tmp_path / f"processes{round}"
        out.mkdir()
        (out / ".lock").write_text(str(pid))
        outcomes = race_in_processes(out, 6)
        assert sorted(outcomes) == ["owner"] + ["refused"] * 5, outcomes


@pytest.mark.parametrize("content", [b"", b"\n", b"garbage", b"9" * 40, "\u00b2".encode(), "\u0661\u0662".encode(),
                                     b"-5", b"0", b"\xff\xfe\x00", b"12 34", b"x" * 10000])
def test_a_lock_file_that_names_no_process_is_taken_over(tmp_path, monkeypatch, content):
    """Empty, garbage, a number no process can have, other scripts' digits, a sign, bytes that are no text, a large
    file: none of them names a run, and none is a traceback."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_bytes(content)
    folder = RunFolder(out, "run")
    folder.lock()
    assert (out / ".lock").read_text() == str(os.getpid())
    folder.release()
    assert list(out.iterdir()) == []


def test_a_takeover_whose_taker_was_killed_is_taken_over_in_turn(tmp_path, monkeypatch):
    """A run killed between claiming a stale .lock (.lock.<its tag>) and replacing it leaves that claim: stale in
    turn, it is taken over the same way, and the folder is left with the new owner's .lock alone."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / ".lock").write_text(str(pid))
    (out / f".lock.{runfolder.read_lock_file(out / '.lock')[1]}").write_text(str(pid))
    folder = RunFolder(out, "run")
    folder.lock()
    assert sorted(os.listdir(out)) == [".lock"] and (out / ".lock").read_text() == str(os.getpid())
    folder.release()


def test_a_lock_file_naming_a_live_process_is_refused_with_the_way_out(tmp_path, monkeypatch):
    """The process may be another program that took a killed run's process id: the refusal says what to do then."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(" 1\n")  # init: alive, and no run
    with pytest.raises(RunFolderError) as refused:
        RunFolder(out, "run").lock()
    assert str(refused.value) == f"{out} is in use by another run (process 1); wait for it to end, or choose " \
                                 f"another --out-dir; if no run is using it, delete {out / '.lock'}"
    assert (out / ".lock").read_text() == " 1\n"


# ---------------------------------------------------------------------------------------------------------------
# Outputs: an empty path, the picture's format, a reader gone, an --out-dir among the images

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch run on tiny CIFAR-10, and two images to predict, in run/../photos."""
    import train
    from PIL import Image
    root = tmp_path_factory.mktemp("finished")
    data = write_cifar10(root / "data", n_per_batch=8, n_test=20)
    train.main(["--data-dir", str(data), *CPU, "--epochs", "1", "--out-dir", str(root / "run")])
    (root / "photos").mkdir()
    for i in range(40):
        Image.new("RGB", (8, 8), (6 * i, 0, 0)).save(root / "photos" / f"{i:02}.png")
    return root / "run"


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("script, argv", [
    ("export", ["--checkpoint", "{run}/best.pth", "--output", ""]),
    ("plot", ["{run}/metrics.csv", "--output", ""]),
    ("evaluate", ["--checkpoint", "{run}/best.pth", "--show", ""]),
    ("evaluate", ["--checkpoint", "{run}/best.pth", "--plot", ""]),
    ("evaluate", ["--checkpoint", "{run}/best.pth", "--data-dir", ""]),
    ("predict", ["--checkpoint", "", "{run}/../photos"]),
])
def test_an_empty_path_is_refused_like_any_invalid_one(finished, script, argv, capsys):
    module = __import__(script)
    before = snapshot(finished.parent)
    with pytest.raises(SystemExit) as exc:
        module.main([a.format(run=finished) for a in argv])
    flag = next(a for a, b in zip(argv, argv[1:]) if b == "")
    assert exc.value.code == f"{script}.py: error: argument {flag}: an empty path; give the path of a file or folder"
    assert snapshot(finished.parent) == before


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF-"), (".PNG", b"\x89PNG")])
def test_a_picture_is_drawn_in_the_format_its_suffix_names(finished, tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    import plot
    plot.main([str(finished / "metrics.csv"), "--output", str(tmp_path / f"curves{suffix}")])
    assert (tmp_path / f"curves{suffix}").read_bytes().startswith(magic)


@pytest.mark.parametrize("name", ["curves.jpg", "curves"])
def test_a_picture_suffix_that_names_no_format_drawn_is_refused(finished, tmp_path, name):
    pytest.importorskip("matplotlib")
    import evaluate
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(finished / "best.pth"), "--show", str(tmp_path / name)])
    what = "ends in .jpg" if "." in name else "has no suffix"
    assert exc.value.code == f"evaluate.py: error: the picture {tmp_path / name} {what}: give a name ending in " \
                             f".png, .svg or .pdf, the formats drawn"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["predict.py", "--checkpoint", "{run}/best.pth", "{run}/../photos"],
                                  ["predict.py", "--checkpoint", "{run}/best.pth", "--json", "{run}/../photos"],
                                  ["evaluate.py", "--checkpoint", "{run}/best.pth", "--show", "{tmp}/show.png"]])
def test_a_reader_that_has_gone_ends_the_script_quietly_with_status_141(finished, tmp_path, argv):
    if "--show" in argv:
        pytest.importorskip("matplotlib")
    proc = subprocess.Popen([sys.executable, *[a.format(run=finished, tmp=tmp_path) for a in argv], *CPU], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `| head` does once it has its lines: every write from here on fails
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err
    if "--show" in argv:
        assert (tmp_path / "show.png").read_bytes().startswith(b"\x89PNG")  # drawn all the same


@pytest.mark.parametrize("script", ["train", "find_lr"])
def test_an_out_dir_among_the_images_read_is_refused_by_every_script_that_trains(tmp_path, script):
    from image_files import make_image_folder
    data = make_image_folder(tmp_path / "photos")
    before = snapshot(data)
    out = data / "train" / "red" / "run"
    with pytest.raises(SystemExit) as exc:
        __import__(script).main(["--dataset", "imagefolder", "--data-dir", str(data), *CPU, "--out-dir", str(out)])
    assert exc.value.code == f"{script}.py: error: --out-dir {out} is inside {data / 'train'}, which this run reads " \
                             f"as images: give --out-dir a folder outside --data-dir's train/, val/ and test/"
    assert snapshot(data) == before and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# A copy of a run is its own run

@pytest.mark.slow
def test_a_copied_run_folder_resumed_is_its_own_run_with_its_own_mlflow_run(tmp_path, cifar_dir, capsys,
                                                                           monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="--mlflow needs the optional mlflow")
    import shutil
    import train
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    original, copy, moved = tmp_path / "A", tmp_path / "copy", tmp_path / "moved"
    train.main(["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--out-dir", str(original), "--mlflow"])
    first = checkpoint.load_checkpoint(original / "last.pth")
    shutil.copytree(original, copy)
    capsys.readouterr()
    train.main(["--resume", str(copy / "last.pth"), "--epochs", "2"])
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    ours = checkpoint.load_checkpoint(copy / "last.pth")
    assert note == [f"note: {copy} is a copy of the run in {original}: resuming it as a run of its own (run id "
                    f"{ours['run_id']}; with --mlflow, its own MLflow run), the original left as it is"]
    assert ours["run_id"] != first["run_id"] and ours["mlflow_run_id"] not in (None, first["mlflow_run_id"])
    client = mlflow.MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "val_loss")] == [1]  # untouched
    assert [m.step for m in client.get_metric_history(ours["mlflow_run_id"], "val_loss")] == [1, 2]
    assert checkpoint.load_checkpoint(original / "last.pth")["state"] == first["state"]
    shutil.copytree(original, tmp_path / "copy2")  # a copy resumed into a new folder: its own run too
    train.main(["--resume", str(tmp_path / "copy2" / "last.pth"), "--out-dir", str(tmp_path / "new"), "--epochs", "2"])
    assert f"note: {tmp_path / 'copy2'} is a copy of the run in {original}: " in capsys.readouterr().err
    assert checkpoint.load_checkpoint(tmp_path / "new" / "last.pth")["run_id"] not in (first["run_id"], ours["run_id"])
    original.rename(moved)  # a moved folder is the same run: it goes on in its own MLflow run
    train.main(["--resume", str(moved / "last.pth"), "--epochs", "2"])
    assert "is a copy" not in capsys.readouterr().err
    assert checkpoint.load_checkpoint(moved / "last.pth")["run_id"] == first["run_id"]
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "val_loss")] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Messages say what the user needs

def test_class_folders_that_differ_only_in_unicode_form_are_named_as_such(tmp_path):
    from conftest import fails_with
    from image_files import write_class_images
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    data = tmp_path / "photos"
    for split, cafe in (("train", nfc), ("test", nfd)):
        write_class_images(data / split / cafe, (200, 100, 0))
        write_class_images(data / split / "tea", (0, 100, 200))
    fails_with(["--dataset", "imagefolder", "--data-dir", str(data), *CPU, "--out-dir", str(tmp_path / "run")],
               f"the class folders of {data / 'test'} differ from train/'s: {nfd} here is Unicode NFD, train/'s "
               f"{nfc} is NFC (the same letters, other bytes): rename one folder so that both are spelled alike")


def write_corrupt_exif_jpeg(path: Path) -> None:
    """A JPEG whose EXIF has a tag pointing past its end (Pillow warns, and decodes the image all the same)."""
    import struct
    from PIL import Image
    entries = struct.pack("<HHII", 0x010E, 2, 100, 1000) + struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0)
    tiff = b"II*\x00" + struct.pack("<IH", 8, 2) + entries + struct.pack("<I", 0)
    Image.new("RGB", (20, 10), (200, 0, 0)).save(path, exif=b"Exif\x00\x00" + tiff)


def test_pillows_warning_for_corrupt_exif_is_one_line_of_ours_naming_the_file(tmp_path, capsys):
    from image_files import write_class_images
    data = tmp_path / "photos"
    for name, color in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        write_class_images(data / "train" / name, color)
    write_corrupt_exif_jpeg(data / "train" / "red" / "exif.jpg")
    with warnings.catch_warnings(record=True) as raw:  # Pillow's own, unreworded: none (the header's peek too)
        warnings.simplefilter("always")
        images, labels = folders.load_imagefolder_split(data, "train", ["blue", "red"], 16)  # (decoding threads)
    assert len(labels) == 13 and [str(w.message) for w in raw] == []
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    # (Pillow's own words differ between its versions: 12 says "Tag data larger than file. Skipping tag 270")
    assert len(warned) == 1 and warned[0].startswith(f"warning: {data / 'train' / 'red' / 'exif.jpg'}: ") and \
        warned[0].endswith(" (Pillow; the image is decoded all the same)"), warned
    decode.load_image(data / "train" / "red" / "exif.jpg", 3, 16)  # (predict.py's way: in the main thread)
    assert capsys.readouterr().err.splitlines() == warned


@pytest.mark.slow
def test_matplotlibs_lines_when_home_is_not_writable_are_one_line_of_ours(finished, tmp_path):
    pytest.importorskip("matplotlib")
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    proc = subprocess.run([sys.executable, "plot.py", str(finished / "metrics.csv"), "--output",
                           str(tmp_path / "c.png")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "HOME": str(home)})
    assert proc.returncode == 0 and proc.stderr.splitlines() == [
        "note: matplotlib cannot write its settings folder (is HOME writable?); it uses a temporary one, and builds "
        "its font cache again each run: set MPLCONFIGDIR to a writable folder to keep it"], proc.stderr
    assert (tmp_path / "c.png").is_file()


@pytest.mark.slow
def test_an_error_about_an_output_names_it_not_its_temporary_file(finished, tmp_path):
    pytest.importorskip("onnxruntime")
    resource = pytest.importorskip("resource")

    def small_files() -> None:  # a quota: writes past 100 kB fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    proc = subprocess.run([sys.executable, "export.py", "--checkpoint", str(finished / "best.pth"), "--output",
                           str(tmp_path / "model.onnx")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert proc.returncode == 1
    assert error_line(proc.stderr, "export.py") == f"export.py: error: {tmp_path / 'model.onnx'}: File too large"
    assert list(tmp_path.iterdir()) == []


def test_a_metrics_csv_saved_by_a_spreadsheet_is_read(finished, tmp_path):
    import plot
    saved = tmp_path / "metrics.csv"
    saved.write_bytes(b"\xef\xbb\xbf" + (finished / "metrics.csv").read_bytes().replace(b"\n", b"\r\n"))
    assert plot.read_metrics(saved) == plot.read_metrics(finished / "metrics.csv")


@pytest.mark.slow
def test_find_lr_counts_the_images_it_uses_and_holds_none_out(tmp_path, capsys):
    """The range test picks no epoch: it trains on every training image (no --val-split held out, so no warning
    about the split's size) and counts them."""
    pytest.importorskip("matplotlib")
    import find_lr
    from conftest import write_mnist
    data = tmp_path / "data"
    write_mnist(data / "mnist", compress=False)  # 120 learnable images, 12 of which a run would hold out
    find_lr.main(["--dataset", "mnist", "--data-dir", str(data), *CPU, "--batch-size", "16", "--find-lr-steps", "20",
                  "--out-dir", str(tmp_path / "lr")])
    out, err = capsys.readouterr()
    line = out.splitlines()[0]
    steps = int(line.split(": ")[1].split(" steps")[0])
    sizes = ([16] * 7 + [8]) * steps  # each pass over the 120 images: seven steps of 16, one of 8
    assert line.startswith(f"lr range test: {steps} steps ({sum(sizes[:steps])} images, of a training set of 120) "
                           f"from lr "), line
    assert "warning" not in err, err


@pytest.mark.slow
def test_a_dumb_terminal_gets_no_escape_codes(tmp_path, cifar_dir):
    import pty
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(cifar_dir), *CPU, "--epochs", "1",
                             "--batch-size", "16", "--log-interval", "2", "--out-dir", str(tmp_path / "run")], cwd=ROOT,
                            stdout=follower, stderr=follower,
                            env={**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1"})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # (the terminal closes when the process ends)
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    assert re.search(rb"step +2/", output) and b"\x1b" not in output, output


# ---------------------------------------------------------------------------------------------------------------
# Denormal and absurd values are refused, not silently dropped

@pytest.mark.parametrize("flag, value, message", [
    ("--grad-clip", "5e-324", "--grad-clip 4.94066e-324 is too small to act: give 0 (off) or at least 1e-08"),
    ("--weight-decay", "1e-320", "--weight-decay 9.99989e-321 is too small to act: give 0 (off) or at least 1e-12"),
    ("--lr", "1e-300", "--lr 1e-300 is too small to act: give at least 1e-10"),
    ("--label-smoothing", "1e-310", "--label-smoothing 1e-310 is too small to act: give 0 (off) or at least 1e-06"),
])
def test_a_denormal_or_absurdly_small_value_is_refused_with_the_smallest_sensible_one(tmp_path, cifar_dir, flag, value,
                                                                                     message):
    from conftest import fails_with
    torch.set_flush_denormal(False)  # as in a fresh process (a CPU run in this one set it: denormals parse as 0)
    out = tmp_path / "run"
    fails_with(["--data-dir", str(cifar_dir), *CPU, "--out-dir", str(out), flag, value], message)
    assert not out.exists()
