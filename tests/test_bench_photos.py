"""bench.py --photos as a user runs it: from their own folder with a relative path, writing nothing into it, on at
most --photos-limit training images (said in its output), and quiet on Ctrl-C (one line, status 130) wherever it
is, train.py's run or torchvision's DataLoader workers. Real processes and signals."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bench_photos
from conftest import ROOT, as_from_a_terminal

TINY = ["--model", "simplecnn", "--image-size", "32", "--batch-size", "2", "--workers", "1"]


def photo_folder(root: Path, counts: dict[str, int], size: int = 48) -> Path:
    """root/train/<class>/ with counts[class] noise JPEGs of size x (size + 8 i) px, and root/test/<class>/ with 2."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n if split == "train" else 2):
                pixels = rng.integers(0, 256, (size + 8 * i, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"p{i:02}.jpg", quality=90)
    return root


def snapshot(folder: Path) -> dict:
    """Every entry under folder, hidden ones included, with the bytes of each file."""
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_photo_links_cap_the_training_images_taking_the_classes_in_turn(tmp_path):
    root = photo_folder(tmp_path / "photos", {"a": 5, "b": 2, "c": 4}, size=8)
    before = snapshot(root)

    def linked(limit: int) -> dict[str, list[str]]:
        dest = tmp_path / f"links-{limit}"
        used, total = bench_photos.photo_links(root, dest, limit)
        found = {split: sorted(str(p.relative_to(dest / split)) for p in (dest / split).rglob("*.jpg"))
                 for split in ("train", "test")}
        assert total == 11 and used == len(found["train"])
        assert all(p.is_symlink() and p.resolve() == root / p.relative_to(dest) for p in dest.rglob("*.jpg"))
        assert found["test"] == ["a/p00.jpg", "b/p00.jpg", "c/p00.jpg"]  # one per class, as train.py needs
        return found["train"]
    assert linked(8) == ["a/p00.jpg", "a/p01.jpg", "a/p02.jpg", "b/p00.jpg", "b/p01.jpg", "c/p00.jpg", "c/p01.jpg",
                         "c/p02.jpg"]  # in turn: a, b, c, a, b, c, then a and c (b has no more)
    assert linked(2) == ["a/p00.jpg", "b/p00.jpg", "c/p00.jpg"]  # at least one per class
    assert len(linked(0)) == len(linked(100)) == 11  # 0: all
    assert snapshot(root) == before


@pytest.mark.slow
def test_the_photo_benchmark_runs_from_the_users_folder_writes_nothing_there_and_states_its_cap(tmp_path):
    user = tmp_path / "home"
    photo_folder(user / "photos", {"cats": 8, "dogs": 8})
    # (a short TMPDIR: multiprocessing's sockets live there, and a Unix socket's path is at most 107 bytes, which
    # pytest-xdist's tmp_path under /tmp/pytest-of-root/pytest-N/popen-gwK/ leaves no room for)
    before, scratch = snapshot(user), Path(tempfile.mkdtemp(prefix="bp-", dir="/tmp"))
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--photos", "photos", *TINY, "--photos-limit",
                             "6"], cwd=user, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert f"{user}/photos: decoding to 32 px on one core" in lines
    assert "one training epoch of each pipeline on 6 of the 16 training images (--photos-limit 6; 0 for all)" in lines
    table = lines[lines.index("pipeline (simplecnn, 32 px, 1 workers)        images/s      memory") + 1:]
    assert [row[:44].strip() for row in table[:3]] == ["train.py streamed (photo recipe)",
                                                       "torchvision ImageFolder + DataLoader",
                                                       "train.py in memory (squash)"]
    assert snapshot(user) == before  # no cache, no run folder, nothing: the folder as it was
    # and the links, runs and cache it made elsewhere are gone (multiprocessing's own pymp-* folders, which forked
    # DataLoader workers leave as they end without Python's exit handlers, are not bench.py's)
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("pymp-")]
    shutil.rmtree(scratch)
    assert left == []


def children(pid: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append((int(entry.name), (entry / "cmdline").read_bytes()))
        except (OSError, IndexError):
            continue
    return found


def wait_for(proc: subprocess.Popen, ready) -> list[int]:
    """Poll proc's children until ready(children) names some (their pids); fail if proc ends first."""
    while proc.poll() is None:
        found = ready(children(proc.pid))
        if found:
            return found
        time.sleep(0.01)
    pytest.fail(f"bench.py ended first: {proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["torchvision's DataLoader workers", "train.py's run"])
def test_ctrl_c_in_the_photo_benchmark_is_one_line_and_status_130(tmp_path, phase):
    photo_folder(tmp_path / "photos", {"cats": 16, "dogs": 16})
    command = [sys.executable, str(ROOT / "bench.py"), "--photos", str(tmp_path / "photos"), *TINY,
               "--photos-limit", "0"]
    # a group of its own, as a shell's foreground job, which Ctrl-C signals as a whole
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    own = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    if phase == "train.py's run":
        started = wait_for(proc, lambda found: [pid for pid, line in found if b"train.py" in line])
    else:  # once that pipeline has begun, its forked DataLoader workers: bench.py's own command line
        assert any(line.startswith("  torchvision ImageFolder + DataLoader") for line in proc.stdout)
        started = wait_for(proc, lambda found: [pid for pid, line in found if line == own])
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert err.splitlines()[-1] == "bench.py: stopped by SIGINT" and "Traceback" not in err, err
    assert "train.py: stopped" not in err and "KeyboardInterrupt" not in err, err
    for pid in started:  # ended with it, workers and train.py alike
        assert not Path(f"/proc/{pid}").exists() or " Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_start_up_count_too_small_for_two_classes_is_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--photos", "photos", "--start-up", "100", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == (
        "bench.py: error: --start-up takes numbers of files in [2, 100000000]: two classes need one each")
