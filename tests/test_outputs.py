"""What the scripts write (pictures, ONNX models) replaces only a regular file that nothing else needs: a device,
a FIFO, a folder, an input, the data being read or a run file is refused in one line, before any work, and left as
it was; a write that fails leaves the old file whole and no temporary file. Real device nodes (made here, in
tmp_path), FIFOs, symlinks, real processes."""
import importlib.util
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, as_from_a_terminal, fails_with, write_cifar10

import evaluate
import export
import plot
import train

CPU = ["--device", "cpu"]
needs_matplotlib = pytest.mark.skipif(__import__("importlib.util").util.find_spec("matplotlib") is None,
                                      reason="the pictures are drawn with the optional matplotlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished one-epoch run; the tests only read it, or check it is untouched."""
    tmp = tmp_path_factory.mktemp("outputs")
    data = write_cifar10(tmp / "data")
    train.main(["--data-dir", str(data), *CPU, "--epochs", "1", "--out-dir", str(tmp / "run")])
    return tmp / "run"


def hostile_targets(folder: Path, run: Path) -> dict[str, Path]:
    """Paths an output must not replace, each made for real."""
    folder.mkdir(exist_ok=True)
    null = folder / "null"
    if not null.exists():
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the device /dev/null is, here in tmp_path
        os.mkfifo(folder / "fifo")
        (folder / "to-null").symlink_to(null)
        (folder / "to-best").symlink_to(run / "best.pth")
        (folder / "a-folder").mkdir()
    return {"device": null, "fifo": folder / "fifo", "symlink to a device": folder / "to-null",
            "folder": folder / "a-folder", "checkpoint": run / "best.pth",
            "symlink to a checkpoint": folder / "to-best",
            "metrics.csv": run / "metrics.csv", "results.json": run / "results.json",
            "data file being read": run.parent / "data" / "cifar-10-batches-py" / "test_batch",
            "new file among the data": run.parent / "data" / "cifar-10-batches-py" / "new.png"}


def state(path: Path) -> tuple:
    """What a path is, to compare before and after: its type, device number, inode and, for a file, its bytes."""
    if not os.path.lexists(path):
        return ("absent",)
    s = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(s.st_mode) else None
    return stat.S_IFMT(s.st_mode), s.st_rdev, s.st_ino, content


def commands(run: Path, target: Path) -> list:
    """Every command that writes a picture or a model to `target`."""
    best = str(run / "best.pth")
    found = []
    if all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime")):  # (else: the missing package first)
        found += [(export.main, ["--checkpoint", best, "--output", str(target)])]
    if importlib.util.find_spec("matplotlib"):
        found += [(plot.main, [str(run / "metrics.csv"), "--output", str(target)]),
                  (evaluate.main, ["--checkpoint", best, "--show", str(target)]),
                  (evaluate.main, ["--checkpoint", best, "--plot", str(target)])]
    return found


@pytest.mark.parametrize("kind", ["device", "fifo", "symlink to a device", "folder", "checkpoint",
                                  "symlink to a checkpoint", "metrics.csv", "results.json", "data file being read",
                                  "new file among the data"])
def test_an_output_that_must_not_be_replaced_is_refused_in_one_line(run, tmp_path, kind, capsys):
    target = hostile_targets(tmp_path / "hostile", run)[kind]
    if not commands(run, target):
        pytest.skip("export.py needs onnx and onnxruntime, the pictures matplotlib: none is installed")
    for main, argv in commands(run, target):
        if main is plot.main and "data" in kind:  # plot.py reads a metrics.csv alone: it knows no data
            continue
        before = {p: state(p) for p in [target, *(run.parent / "data").rglob("*"), *run.iterdir()]}
        with pytest.raises(SystemExit) as exc:
            main(argv)
        message = str(exc.value.code)
        assert message.split(":")[0] in ("plot.py", "evaluate.py", "export.py") and ": error: " in message, message
        assert "\n" not in message and ("choose" in message or "give" in message), message  # the way forward
        assert {p: state(p) for p in before} == before, (main.__module__, kind)
        assert not list(target.parent.glob("*.tmp")) and not list(run.glob("*.tmp"))
        assert capsys.readouterr().out == ""  # refused before any work: nothing evaluated, nothing drawn


def test_an_output_typed_with_a_trailing_slash_is_refused_not_written_as_a_file(run, tmp_path, capsys):
    """`--output newdir/` was written as a file named newdir: a path that ends with / names a folder."""
    target = f"{tmp_path / 'newdir'}/"
    if not commands(run, Path(target)):
        pytest.skip("export.py needs onnx and onnxruntime, the pictures matplotlib: none is installed")
    for main, argv in commands(run, Path(target)):
        argv = [target if a == str(Path(target)) else a for a in argv]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        what = "ONNX output" if main is export.main else "picture"
        assert exc.value.code.endswith(f"error: the {what} {target} ends with /, as a folder does; give the file's "
                                       f"name"), exc.value.code
        assert not (tmp_path / "newdir").exists()
    capsys.readouterr()


def test_a_device_node_stays_a_device_node(run, tmp_path):
    null = hostile_targets(tmp_path / "hostile", run)["device"]
    result = subprocess.run([sys.executable, "export.py", "--checkpoint", str(run / "best.pth"), "--output",
                             str(null)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"export.py: error: the ONNX output {null} is a character device, not a regular file; " \
                            f"it is not replaced: give the path of a new file\n"
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)


@needs_matplotlib
def test_an_existing_picture_is_replaced_and_a_failed_write_leaves_it_whole(run, tmp_path):
    picture = tmp_path / "curves.png"
    picture.write_bytes(b"an older picture")
    plot.main([str(run / "metrics.csv"), "--output", str(picture)])
    assert picture.read_bytes()[:4] == b"\x89PNG"
    picture.write_bytes(b"an older picture")

    def small_files() -> None:  # a file may grow to 1 kB only: the PNG's write fails half-way (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    result = subprocess.run([sys.executable, "plot.py", str(run / "metrics.csv"), "--output", str(picture)],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert result.returncode == 1 and result.stderr == f"plot.py: error: cannot write {picture}: File too large\n"
    assert picture.read_bytes() == b"an older picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temporary file left


@needs_matplotlib
def test_show_and_plot_on_one_path_and_a_run_folder_as_checkpoint(run, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--plot and --show both name"):
        evaluate.main(["--checkpoint", str(run / "best.pth"), "--show", str(tmp_path / "a.png"), "--plot",
                       str(tmp_path / "." / "a.png")])
    evaluate.main(["--checkpoint", str(run), "--json"])
    assert capsys.readouterr().err == f"{run} is a folder: evaluating its best.pth\n"
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(tmp_path)])
    assert str(exc.value.code) == (f"evaluate.py: error: {tmp_path} is a folder without a best.pth; give "
                                   f"--checkpoint a .pth file (a run folder holds best.pth once its first epoch has "
                                   f"ended)")


# ---------------------------------------------------------------------------------------------------------------
# The run folder: a user's own curves.png is not the run's; its lock cannot be deleted away

def train_process(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *CPU, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)  # noqa: PLW1509


def test_a_users_own_curves_png_keeps_a_run_out(tmp_path, cifar_dir):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "curves.png").write_bytes(b"my own picture")
    fails_with(["--data-dir", str(cifar_dir), *CPU, "--epochs", "1", "--out-dir", str(folder)],
               f"{folder} already holds run files (curves.png); move them elsewhere or give --out-dir a new folder")
    assert sorted(p.name for p in folder.iterdir()) == ["curves.png"]
    assert (folder / "curves.png").read_bytes() == b"my own picture"


@pytest.mark.slow
def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    data = write_cifar10(tmp_path / "data", n_per_batch=400, n_test=50)
    out = tmp_path / "run"
    flags = ["--data-dir", str(data), "--epochs", "50", "--out-dir", str(out)]
    first = train_process(*flags)
    try:
        for line in first.stdout:
            if line.startswith("cifar10: "):  # "... writing to <out>": it holds the folder
                break
        assert (out / ".lock").read_text() == str(first.pid)
        (out / ".lock").unlink()
        second = train_process(*flags)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1 and err == (f"train.py: error: {out} is in use by another run; wait for it to "
                                                  f"end, or choose another --out-dir\n")
        assert first.poll() is None  # the first run trains on, alone
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130


# ---------------------------------------------------------------------------------------------------------------
# What the libraries raise or log is one line of ours

@pytest.mark.slow
def test_a_model_onnx_cannot_express_at_its_size_is_one_line(tmp_path):
    """alexnet at 64 px: its adaptive pooling to 6 x 6 gets a 1 x 1 map, which ONNX's operator cannot take."""
    pytest.importorskip("onnxruntime", reason="export.py needs the optional onnx and onnxruntime")
    from test_predict_export import write_checkpoint
    ckpt = write_checkpoint(tmp_path / "alexnet.pth", ["cat", "dog"], image_size=64, model_name="alexnet")
    result = subprocess.run([sys.executable, "export.py", "--checkpoint", str(ckpt)], check=False, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.startswith("export.py: error: alexnet at 64 px cannot be exported to ONNX (opset 17): "
                                    "Unsupported: ONNX export of operator adaptive_avg_pool2d, output size that are "
                                    "not factor of input size; nothing written\n"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alexnet.pth"]  # no .onnx, no temporary file


@needs_matplotlib
def test_class_names_that_are_not_utf8_are_drawn_and_printed_escaped(tmp_path):
    """Folder names are bytes: one that is not UTF-8 becomes a class name with surrogates (os.fsdecode), which
    neither matplotlib nor a UTF-8 terminal takes as it is."""
    from image_files import make_image_folder
    root = make_image_folder(tmp_path / "images")
    (root / "train" / "red" / "z_broken.jpg").unlink()  # (its warning is not what this test is about)
    for split in ("train", "test"):
        os.rename(bytes(root / split / "red"), bytes(root / split) + b"/r\xe9d $x$")  # (Latin-1, and a formula)
    out = tmp_path / "run"
    train.main(["--data-dir", str(root), "--dataset", "imagefolder", *CPU, "--epochs", "1", "--batch-size", "4",
                "--val-split", "0", "--out-dir", str(out)])
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""}  # a UTF-8 terminal: stdout is strict UTF-8
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out / "best.pth"), "--show",
                             str(tmp_path / "show.png"), "--plot", str(tmp_path / "plot.png")], check=False,
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "r\\xe9d $x$ " in result.stdout
    for picture in ("show.png", "plot.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
