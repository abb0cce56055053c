"""Any name the file system gives works on every path, and a stdout that is closed or full ends no script with a
traceback: file, class, data and run folder names that are not UTF-8 (Latin-1 bytes) in memory, streamed and with
the photo recipe, through evaluate.py, predict.py and export.py, printed to a strict UTF-8 stdout; every script with
stdout closed (`>&-`) or full (/dev/full); predict.py on files of which some cannot be read. Real processes."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
import train
from conftest import ROOT, write_cifar10

CPU = ["--device", "cpu"]
CAFE = os.fsdecode(b"caf\xe9")  # a Latin-1 name: on Linux its byte 0xe9 reaches Python as the surrogate \udce9
# a UTF-8 terminal's stdout, which refuses what is not UTF-8 (this machine's C.UTF-8 would let it through)
STRICT = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}


def noise_folder(root: Path, classes: list[str], per_class: int, name: str = "img") -> Path:
    """root/train/ and root/test/ of 24 px noise PNGs, `per_class` per class in each."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / c / f"{name}{i}.png")
    return root


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=STRICT,
                          timeout=300, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("path", [[], ["--workers", "1"], ["--resize-mode", "crop", "--workers", "1"]],
                         ids=["in memory", "streamed", "photo recipe"])
def test_names_that_are_not_utf8_work_on_every_path_and_print_escaped(tmp_path, path):
    data = noise_folder(tmp_path / os.fsdecode(b"d\xe9ta"), [CAFE, "blue"], 4, name=os.fsdecode(b"img\xe9"))
    out = tmp_path / os.fsdecode(b"r\xe9n")
    trained = run("train.py", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "simplecnn",
                  "--image-size", "24", "--epochs", "1", "--batch-size", "4", "--val-split", "0", *CPU,
                  "--out-dir", str(out), *path)
    assert trained.returncode == 0 and "Traceback" not in trained.stderr, trained.stderr
    assert f"results in {tmp_path}/r\\xe9n/results.json" in trained.stdout  # escaped, as printable() writes it
    evaluated = run("evaluate.py", "--checkpoint", str(out), *CPU)  # (a run folder: its best.pth, said on stderr)
    assert evaluated.returncode == 0 and "caf\\xe9" in evaluated.stdout, evaluated.stderr
    assert evaluated.stderr.splitlines()[0] == f"{tmp_path}/r\\xe9n is a folder: evaluating its best.pth"
    assert "\\udc" not in trained.stderr + evaluated.stderr  # (a name's byte is \\xe9 on stderr too)
    predicted = run("predict.py", "--checkpoint", str(out / "best.pth"), *CPU, str(data / "test"))
    assert predicted.returncode == 0 and predicted.stderr == "", predicted.stderr
    assert [line.split(": ")[0] for line in predicted.stdout.splitlines()] == [
        f"{tmp_path}/d\\xe9ta/test/{c}/img\\xe9{i}.png" for c in ("blue", "caf\\xe9") for i in range(4)]
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")) and not path:
        exported = run("export.py", "--checkpoint", str(out / "best.pth"))
        assert exported.returncode == 0 and exported.stdout.startswith(f"wrote {tmp_path}/r\\xe9n/best.onnx; ")
        assert sorted(p.name for p in out.glob("*.onnx")) == ["best.onnx"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch CIFAR-10 run, its data, and an image to predict."""
    tmp = tmp_path_factory.mktemp("closed")
    write_cifar10(tmp / "data", n_per_batch=16, n_test=20)
    train.main(["--data-dir", str(tmp / "data"), *CPU, "--epochs", "1", "--val-split", "0",
                "--out-dir", str(tmp / "run")])
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp / "red.png")
    return tmp


SCRIPTS = {  # each script, what it writes besides its stdout (the work that must be done all the same)
    "train.py": (["--data-dir", "{t}/data", *CPU, "--epochs", "1", "--val-split", "0", "--out-dir", "{o}/run"],
                 "run/results.json"),
    "evaluate.py": (["--checkpoint", "{t}/run/best.pth", *CPU], None),
    "predict.py": (["--checkpoint", "{t}/run/best.pth", *CPU, "{t}/red.png"], None),
    "export.py": (["--checkpoint", "{t}/run/best.pth", "--output", "{o}/model.onnx"], "model.onnx"),
    "plot.py": (["{t}/run/metrics.csv", "--output", "{o}/curves.png"], "curves.png"),
    "find_lr.py": (["--data-dir", "{t}/data", *CPU, "--val-split", "0", "--batch-size", "16", "--out-dir", "{o}/lr"],
                   "lr/find-lr.png"),
    "bench.py": (["--data-dir", "{t}/data", "--long-tailed", "{o}/lt"], "lt/cifar-10-batches-py/test_batch"),
}
NEEDS = {"export.py": ("onnx", "onnxruntime"), "plot.py": ("matplotlib",), "find_lr.py": ("matplotlib",)}


def close_stdout() -> None:
    os.close(1)  # as `>&-` leaves it: Python starts with sys.stdout None, and the next file opened would be fd 1


@pytest.mark.slow
@pytest.mark.parametrize("stdout", ["closed", "full"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_closed_or_full_stdout_ends_every_script_quietly_or_in_one_line_with_its_work_done(finished, tmp_path,
                                                                                            script, stdout):
    if not all(importlib.util.find_spec(m) for m in NEEDS.get(script, ())):
        pytest.skip(f"{script} needs {', '.join(NEEDS[script])} here")
    argv, output = SCRIPTS[script]
    command = [sys.executable, script, *[a.format(t=finished, o=tmp_path) for a in argv]]
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, cwd=ROOT, stdout=full if stdout == "full" else None, stderr=subprocess.PIPE,
                                text=True, preexec_fn=close_stdout if stdout == "closed" else None, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    if stdout == "closed":  # as when stdout's reader has gone: quietly, with the shell's status
        assert (result.returncode, result.stderr) == (141, ""), result.stderr
    else:
        assert (result.returncode, result.stderr) == (1, f"{script}: error: cannot write to stdout: No space left on "
                                                         f"device; free some space and try again (the command did its "
                                                         f"work; what it printed is incomplete)\n"), result.stderr
    assert output is None or (tmp_path / output).is_file()


@pytest.mark.slow
def test_predict_labels_the_readable_images_and_names_each_unreadable_one_with_status_2(tmp_path, finished):
    folder = tmp_path / "new"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), color).save(folder / f"{i}.png")
    (folder / "1b_broken.jpg").write_bytes(b"not an image at all")
    missing = tmp_path / "nowhere.png"
    result = run("predict.py", "--checkpoint", str(finished / "run" / "best.pth"), *CPU, str(folder), str(missing))
    assert result.returncode == predict.UNREADABLE == 2
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [str(folder / f"{i}.png") for i in range(3)]
    assert result.stderr.splitlines() == [
        f"predict.py: error: cannot read image {folder}/1b_broken.jpg: cannot identify image file "
        f"'{folder}/1b_broken.jpg'",
        f"predict.py: error: cannot read image {missing}: No such file or directory"]


def test_predicts_help_states_its_exit_status(capsys):
    with pytest.raises(SystemExit) as exc:
        predict.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    assert "Exit status: 0 when every image was labelled; 2 when some could not be read (named on stderr, the rest " \
           "labelled on stdout); 1 for any other error (nothing labelled)" in help_text


def test_lines_that_processes_print_to_one_stderr_never_run_together(tmp_path):
    """torchrun's processes (and DataLoader workers) share one stderr: Python writes a printed line and its newline
    apart, so two processes' lines ran together ("...--epochswarning: ..."). Inside cli.one_line_errors, as in every
    script, each line is one write. Two processes, 3,000 lines each, one pipe: every line whole."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import cli\n"
              "with cli.one_line_errors('x'):\n"
              "    for i in range(3000):\n"
              "        print(sys.argv[2] * 60, i, file=sys.stderr)\n")
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(ROOT), letter], stderr=write) for letter in "ab"]
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert [p.wait() for p in procs] == [0, 0]
    assert len(lines) == 6000 and all(re.fullmatch(r"(a{60}|b{60}) \d+", line) for line in lines), \
        next(line for line in lines if not re.fullmatch(r"(a{60}|b{60}) \d+", line))

