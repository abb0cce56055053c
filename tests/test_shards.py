"""Tar shards in WebDataset's layout (shards.py, --dataset shards): written from a real image folder, read by
webdataset itself and read from webdataset's own writer, served by a real HTTP server on 127.0.0.1, trained on by
real worker processes, interrupted by a real Ctrl-C, and by two torchrun processes."""
import base64
import http.server
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
import shards
import stream
import tarshards
import train
from checkpoint import load_checkpoint
from conftest import ROOT, write_cifar10
from test_stream import CLASSES, children, same_weights, start, write_photos


def write_shards(tmp_path: Path, per_class: dict[str, int], shard_size: int = 8, **photos) -> tuple[Path, Path]:
    folder = write_photos(tmp_path / "photos", per_class, **photos)
    dest = tmp_path / "shards"
    shards.main([str(folder), str(dest), "--shard-size", str(shard_size)])
    return folder, dest


def run(argv: list[str]) -> dict:
    return train.main([*argv, "--device", "cpu", "--log-interval", "0"])


def flags(source: str | Path, *more: str) -> list[str]:
    return ["--dataset", "shards", "--data-dir", str(source), "--image-size", "32", "--epochs", "2",
            "--batch-size", "4", "--val-split", "0.2", "--workers", "1", *more]


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_shards_py_writes_each_files_bytes_and_class_in_webdatasets_layout(tmp_path, capsys):
    folder, dest = write_shards(tmp_path, {"train": 6, "val": 2, "test": 3}, shard_size=5)
    assert capsys.readouterr().out == (f"wrote {dest}: train 4 shards (18 images), val 2 shards (6 images), test 2 "
                                       f"shards (9 images); classes.txt, index.json\n")
    assert sorted(p.name for p in dest.iterdir()) == [
        "classes.txt", "index.json", "test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar",
        "train-000002.tar", "train-000003.tar", "val-000000.tar", "val-000001.tar"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    assert (dest / "classes.txt").read_text() == "blue\ngreen\nred\n"
    originals = {p.read_bytes(): sorted(CLASSES).index(p.parent.name) for p in (folder / "train").rglob("*.*")}
    seen, labels = [], []
    for shard in sorted(dest.glob("train-*.tar")):
        found = members(shard)
        assert all(re.fullmatch(r"train-\d{9}\.(png|jpg|cls)", name) for name, _ in found)
        for (image, payload), (cls, text) in zip(found[::2], found[1::2]):
            assert image.rsplit(".", 1)[0] == cls.rsplit(".", 1)[0] and cls.endswith(".cls")
            assert originals[payload] == int(text.decode())  # the file's own bytes, its class as decimal text
            seen.append(payload)
            labels.append(int(text))
    assert sorted(seen) == sorted(originals)  # every training image once
    assert labels[:6] != sorted(labels[:6])  # mixed: a folder lists class by class, the shards do not


@pytest.fixture
def tiny_disk(tmp_path, mounts):
    """A 32 KiB tmpfs mounted for the test (needs root and a kernel that lets it mount)."""
    mounts(tmp_path / "disk", "32k")
    return tmp_path / "disk"


def test_shards_py_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, tiny_disk, capsys):
    folder, dest = write_shards(tmp_path, {"train": 2, "test": 1})
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(SystemExit) as exc:
        shards.main([str(folder), str(dest)])
    assert exc.value.code == (f"shards.py: error: shards: {dest} exists and is not an empty folder: give a new one "
                              f"(nothing is overwritten)")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    with pytest.raises(SystemExit) as exc:
        shards.main([str(folder), str(tiny_disk / "new")])  # a real full disk, half-way through
    assert exc.value.code.startswith("shards.py: error: ") and "No space left on device" in exc.value.code
    assert list(tiny_disk.iterdir()) == []  # no new folder, no partial one


def test_mixed_order_reads_each_shard_front_to_back_and_mixes_the_open_ones():
    counts = torch.tensor([5, 7, 3, 9, 4, 6])
    g = torch.Generator().manual_seed(0)
    order = data.mixed_order(counts, g, open_shards=3)
    assert sorted(order.tolist()) == list(range(int(counts.sum())))
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    shard_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    for s, first in enumerate(starts):
        mine = order[shard_of[order] == s].tolist()
        assert mine == list(range(first, first + int(counts[s])))  # front to back
    assert len(set(shard_of[order[:6]].tolist())) > 1  # the first images already come from several shards
    again = data.mixed_order(counts, torch.Generator().manual_seed(0), open_shards=3)
    assert torch.equal(order, again)


def test_webdataset_reads_our_shards_and_we_read_webdatasets(tmp_path):
    wds = pytest.importorskip("webdataset", reason="webdataset is the reference reader and writer of shards")
    folder, dest = write_shards(tmp_path, {"train": 4, "test": 2}, shard_size=5)
    originals = {p.read_bytes(): sorted(CLASSES).index(p.parent.name) for p in (folder / "train").rglob("*.*")}
    urls = [str(p) for p in sorted(dest.glob("train-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 12
    for s in samples:
        image = s.get("png", s.get("jpg"))
        assert originals[image] == int(s["cls"])

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    expected = {}
    for split in ("train", "test"):
        with wds.ShardWriter(str(theirs / f"{split}-%06d.tar"), maxcount=7, verbose=0) as sink:
            for i, path in enumerate(sorted((folder / split).rglob("*.*"))):
                label = sorted(CLASSES).index(path.parent.name)
                sink.write({"__key__": f"sample{i:05d}", path.suffix[1:]: path.read_bytes(), "cls": label})
                expected.setdefault(split, []).append((path.read_bytes(), label))
    tables, classes = tarshards.load(str(theirs))  # no index.json: read from the shards' own headers
    assert classes == ["0", "1", "2"]  # no classes.txt: the indices
    for split, table in tables.items():
        reader = stream.ShardReader(table)
        assert [(reader.read(i), int(table.labels[i])) for i in range(len(table))] == expected[split]
    result = run(flags(theirs, "--epochs", "1", "--out-dir", str(tmp_path / "run")))
    assert result["test_images"] == 6


@pytest.mark.slow
def test_the_weights_do_not_depend_on_the_workers_and_resume_exactly_after_ctrl_c(tmp_path, capsys):
    _, dest = write_shards(tmp_path, {"train": 14, "test": 2}, shard_size=6)
    base = flags(dest, "--val-split", "0", "--color-jitter", "0.2")  # 42 images: 11 steps an epoch
    straight = run([*base, "--workers", "0", "--out-dir", str(tmp_path / "w0")])
    run([*base, "--workers", "2", "--out-dir", str(tmp_path / "w2")])
    assert same_weights(tmp_path / "w0" / "last.pth", tmp_path / "w2" / "last.pth")

    out = tmp_path / "stopped"
    proc = start([*base, "--workers", "2", "--device", "cpu", "--log-interval", "1", "--out-dir", str(out)])
    for line in proc.stdout:
        if line.split()[:4] == ["epoch", "2/2", "step", "3/11"]:
            break
    assert len(children(proc.pid)) == 2
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["state"]["epoch"] == 1 and 3 <= ckpt["partial_epoch"]["step"] < 11
    capsys.readouterr()
    resumed = run(shlex.split(err.strip().splitlines()[-1])[2:])
    assert "holds tar shards" not in capsys.readouterr().err  # (a shards run's --resume: no note)
    assert same_weights(tmp_path / "w0" / "last.pth", out / "last.pth")
    assert resumed["test_accuracy"] == straight["test_accuracy"]


class Server(http.server.ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 for `root`, answering Range requests (206) or, ranges=False, ignoring them
    (200, the whole file, as a plain static server does); `requests` records (path, Range header)."""

    def __init__(self, root: Path, ranges: bool = True):
        self.requests, self.ranges = [], ranges
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def send_head(self):
                server.requests.append((self.path, self.headers.get("Range")))
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                path = Path(self.translate_path(self.path))
                if not (server.ranges and m and path.is_file()):
                    return super().send_head()
                size, start = path.stat().st_size, int(m.group(1))
                if start >= size:
                    self.send_error(416)
                    return None
                f = path.open("rb")
                f.seek(start)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.send_header("Content-Length", str(size - start))
                self.end_headers()
                return f

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass  # (a reader that closes a shard it has read enough of: not an error)


@pytest.mark.parametrize("ranges", [True, False])
def test_shards_over_http_train_as_from_disk_and_stream_each_shard(tmp_path, ranges):
    _, dest = write_shards(tmp_path, {"train": 8, "test": 2}, shard_size=5)
    local = run(flags(dest, "--workers", "2", "--out-dir", str(tmp_path / "local")))
    server = Server(tmp_path, ranges)
    try:
        over_http = run(flags(server.url + "shards/", "--workers", "2", "--out-dir", str(tmp_path / "http")))
        # the run records the URL as given (a path would be made of it): evaluate.py and --resume find the shards
        assert load_checkpoint(tmp_path / "http" / "best.pth")["args"]["data_dir"] == server.url + "shards/"
        report = evaluate.main(["--checkpoint", str(tmp_path / "http"), "--device", "cpu", "--json"])
        assert report["accuracy"] == over_http["test_accuracy"]
        pattern = server.url + "shards/{train-{000000..000004},test-000000,test-000001}.tar"
        listed = tmp_path / "shards.txt"
        listed.write_text("".join(f"{u}\n" for u in tarshards.expand_braces(pattern)))
        from_list = run(flags(listed, "--workers", "0", "--out-dir", str(tmp_path / "list")))
    finally:
        server.shutdown()
    for other in ("http", "list"):
        assert same_weights(tmp_path / "local" / "last.pth", tmp_path / other / "last.pth")
    assert local["test_accuracy"] == over_http["test_accuracy"] == from_list["test_accuracy"]
    shard_requests = [r for r in server.requests if r[0].endswith(".tar")]
    assert shard_requests and all(r[1] is None or re.fullmatch(r"bytes=\d+-", r[1]) for r in shard_requests)
    # each shard streamed, not fetched per image: a few requests for each shard an epoch reads
    assert len(shard_requests) < 3 * 2 * 7 * 4, len(shard_requests)


def test_a_url_with_a_space_or_a_non_ascii_letter_reads_as_its_percent_encoded_spelling(tmp_path, capsys):
    """A URL typed as the folder is named (`my shards/dönnées/`) is sent percent-encoded, as a browser would: it
    trains as the encoded spelling does; what no request can carry is one line."""
    _, dest = write_shards(tmp_path / "my shards" / "dönnées", {"train": 4, "test": 1})
    server = Server(tmp_path)
    try:
        typed = run(flags(server.url + "my shards/dönnées/shards/", "--workers", "0", "--epochs", "1",
                          "--out-dir", str(tmp_path / "typed")))
        encoded = run(flags(server.url + "my%20shards/d%C3%B6nn%C3%A9es/shards/", "--workers", "0", "--epochs", "1",
                            "--out-dir", str(tmp_path / "encoded")))
        with pytest.raises(SystemExit, match=r"^train.py: error: shards: http://\[::1/x/ is not a URL a request can "
                                             r"send \(Invalid IPv6 URL\)$"):
            run(flags("http://[::1/x/", "--out-dir", str(tmp_path / "bad")))
    finally:
        server.shutdown()
    assert typed["test_images"] == encoded["test_images"] == 3 and typed["test_accuracy"] == encoded["test_accuracy"]
    assert same_weights(tmp_path / "typed" / "last.pth", tmp_path / "encoded" / "last.pth")
    assert "Traceback" not in capsys.readouterr().err


def test_a_truncated_or_corrupt_member_is_skipped_with_one_warning_and_a_missing_shard_is_one_line(tmp_path, capsys):
    _, dest = write_shards(tmp_path, {"train": 6, "test": 2}, shard_size=6)
    shard = dest / "train-000002.tar"
    offsets = np.frombuffer(base64.b64decode(json.loads((dest / "index.json").read_text())["shards"][
        "train-000002.tar"]["offsets"]), "<i8")
    with open(shard, "r+b") as f:
        f.seek(int(offsets[1]))
        f.write(b"\xff" * 64)  # the second image's first bytes: not an image any more
        f.truncate(int(offsets[4]) + 10)  # the last two images cut off: one warning for both, each counted
    server = Server(tmp_path)
    try:
        for n, source in enumerate((str(dest), server.url + "shards/")):  # from disk, then over HTTP
            shard = f"{source}/train-000002.tar".replace("//train", "/train")
            result = run(flags(source, "--val-split", "0", "--out-dir", str(tmp_path / f"run{n}")))
            err = capsys.readouterr().err
            warnings = [line for line in err.splitlines() if line.startswith("warning:")]
            assert warnings == [
                f"warning: cannot read image {shard} sample 1: cannot identify image file '{shard} sample 1'; skipped",
                f"warning: cannot read the images past the end of {shard} (a truncated shard); skipped"], err
            assert "note: 3 of epoch 1's 18 training images could not be read" in err
            assert result["test_images"] == 6
    finally:
        server.shutdown()

    os.remove(dest / "train-000001.tar")
    with pytest.raises(SystemExit) as exc:
        run(flags(dest, "--out-dir", str(tmp_path / "run2")))
    assert exc.value.code == f"train.py: error: shards: shard not found: {dest / 'train-000001.tar'} (listed in " \
                             f"index.json)"


def test_evaluate_reads_the_test_shards_as_the_run_did(tmp_path, capsys):
    _, dest = write_shards(tmp_path, {"train": 4, "test": 2})
    result = run(flags(dest, "--epochs", "1", "--out-dir", str(tmp_path / "run")))
    report = evaluate.main(["--checkpoint", str(tmp_path / "run"), "--device", "cpu", "--json"])
    assert report["accuracy"] == result["test_accuracy"] and report["confusion"].sum() == 6


@pytest.mark.parametrize("given, problem", [
    ("nowhere", "nowhere not found; give --data-dir a folder of train-*.tar and test-*.tar (python shards.py "
                "FOLDER DEST writes one)"),
    ("{dest}/../photos", "photos has no train or test shards"),
    ("{url}", "no index.json at {url}: a URL folder cannot be listed"),
    ("{dest}/train-{{000000..000001}}.tar", "has no test shards"),
    ("{url}index.json", "{url}index.json is no shard: give a URL folder with a trailing / ({url}), a brace pattern"),
    ("http://", "http:// names no host: give a URL as http://host/folder/"),
])
def test_shard_sources_that_cannot_be_read_are_one_line(tmp_path, given, problem):
    _, dest = write_shards(tmp_path, {"train": 2, "test": 1}, shard_size=4)
    server = Server(tmp_path / "photos")
    try:
        spec = given.format(url=server.url, dest=dest)
        with pytest.raises(SystemExit) as exc:
            run(flags(spec, "--out-dir", str(tmp_path / "run")))
    finally:
        server.shutdown()
    assert exc.value.code.startswith("train.py: error: shards: ") and problem.format(url=server.url) in \
        exc.value.code, exc.value.code


def test_balanced_sampler_is_refused_for_shards_with_the_way_forward(tmp_path):
    with pytest.raises(SystemExit) as exc:
        run(flags(tmp_path, "--balanced-sampler"))
    assert "--balanced-sampler draws images in any order, and shards are read front to back: give --class-weights " \
           "balanced" in str(exc.value.code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_reading_shards_over_http_step_as_one_process(tmp_path):
    _, dest = write_shards(tmp_path, {"train": 8, "test": 2}, shard_size=5)
    server = Server(tmp_path)
    try:
        # 24 images, one optimizer step of all 24: two nodes of 12 each step as one process does
        common = ["--dataset", "shards", "--data-dir", server.url + "shards/", "--image-size", "32", "--epochs", "1",
                  "--batch-size", "24", "--val-split", "0", "--optimizer", "sgd", "--lr", "0.1", "--workers", "1",
                  "--no-channels-last", "--device", "cpu", "--log-interval", "0"]
        train.main([*common, "--out-dir", str(tmp_path / "one")])
        port = free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", *common, "--out-dir",
             str(tmp_path / "two")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}) for rank in (0, 1)]
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        server.shutdown()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    one, two = (torch.load(tmp_path / d / "last.pth", weights_only=True)["model"] for d in ("one", "two"))
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k


@pytest.mark.slow
def test_the_shards_benchmark_reads_a_folder_and_its_shards_and_starts_from_tiny_shards(tmp_path):
    write_photos(tmp_path / "home" / "photos", {"train": 10, "test": 2})
    before = sorted((tmp_path / "home").rglob("*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--shards", "photos", "--image-size", "32",
                             "--workers", "1"], cwd=tmp_path / "home", capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    table = [r for r in rows if r[:1] in (["folder"], ["shards"]) and r[1:2] != ["/"]]
    assert [r[:2] for r in table] == [["folder", "cold"], ["shards", "cold"], ["folder", "warm"], ["shards", "warm"]]
    assert all(r[-1].replace(",", "").isdigit() for r in table)
    assert [r[:4] for r in rows if r[:2] == ["shards", "/"]] == [["shards", "/", "folder,", "cold:"],
                                                               ["shards", "/", "folder,", "warm:"]]
    assert sorted((tmp_path / "home").rglob("*")) == before  # the shards went to a temporary folder

    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--shards", "--start-up", "2000", "3000",
                             "--workers", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[-3:-1]] == [["2,000", "2"], ["3,000", "3"]]
    assert re.fullmatch(r"main process: -?\d+ bytes per image", lines[-1])

    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--shards"], cwd=tmp_path, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1 and result.stderr.splitlines()[-1] == (
        "bench.py: error: --shards takes an image folder, or --start-up N ... for shards of tiny images")


def test_a_folder_of_shards_is_read_as_shards_without_dataset_shards(tmp_path, capsys):
    _, dest = write_shards(tmp_path, {"train": 3, "test": 1})
    for given in (["--dataset", "imagefolder"], []):
        result = run([*given, "--data-dir", str(dest), "--image-size", "32", "--epochs", "1", "--val-split", "0",
                      "--workers", "0", "--out-dir", str(tmp_path / f"run{len(given)}")])
        err = capsys.readouterr().err
        assert f"{dest} holds tar shards (train-*.tar), not {given[1] if given else 'cifar10'}'s files: reading " \
               f"them as --dataset shards" in err
        assert result["test_images"] == 3
        assert load_checkpoint(tmp_path / f"run{len(given)}" / "best.pth")["args"]["dataset"] == "shards"


def test_a_photo_folder_or_a_url_without_dataset_is_read_as_what_it_is(tmp_path, capsys):
    """Under the default --dataset cifar10, a folder of photos (train/<class>/, test/) was searched for CIFAR-10's
    files, with the download offered into it, and a URL was made a path (http:/...): each is now read as what it
    is, with a note. A folder that holds CIFAR-10 too stays CIFAR-10."""
    folder = write_photos(tmp_path / "photos", {"train": 3, "test": 1}, sizes=(8, 12))
    result = run(["--data-dir", str(folder), "--image-size", "16", "--epochs", "1", "--val-split", "0",
                  "--out-dir", str(tmp_path / "run")])
    assert f"{folder} holds an image folder (train/<class>/, test/), not cifar10's files: reading it as --dataset " \
           f"imagefolder" in capsys.readouterr().err
    assert result["test_images"] == 3 and not (folder / "cifar-10-batches-py").exists()
    with pytest.raises(SystemExit, match=r"^train.py: error: cannot read index.json http://127.0.0.1:1/s/index.json"):
        run(["--data-dir", "http://127.0.0.1:1/s/", "--out-dir", str(tmp_path / "url")])
    assert "http://127.0.0.1:1/s/ is a URL, which only --dataset shards reads: reading it as tar shards" in \
        capsys.readouterr().err
    write_cifar10(folder, n_per_batch=4, n_test=4)
    result = run(["--data-dir", str(folder), "--epochs", "1", "--val-split", "0", "--out-dir", str(tmp_path / "c")])
    assert result["test_images"] == 4 and "reading it as" not in capsys.readouterr().err


def test_evaluate_reads_the_test_shards_alone_and_refuses_other_classes(tmp_path):
    """The README's promise for evaluate.py, on shards: the test shards (with their index.json and classes.txt)
    evaluate without the training shards, to the run's own test result; test shards of other classes are one line."""
    _, dest = write_shards(tmp_path, {"train": 3, "test": 2}, shard_size=4)
    result = run(flags(dest, "--epochs", "1", "--workers", "0", "--out-dir", str(tmp_path / "run")))
    alone = tmp_path / "test-only"
    alone.mkdir()
    for path in [*dest.glob("test-*.tar"), dest / "index.json", dest / "classes.txt"]:
        (alone / path.name).write_bytes(path.read_bytes())
    report = evaluate.main(["--checkpoint", str(tmp_path / "run"), "--data-dir", str(alone), "--device", "cpu"])
    assert report["accuracy"] == result["test_accuracy"]
    assert int(report["confusion"].sum()) == result["test_images"] == 6
    (alone / "classes.txt").write_text("".join(f"{c}\n" for c in reversed(sorted(CLASSES))))
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["--checkpoint", str(tmp_path / "run"), "--data-dir", str(alone), "--device", "cpu"])
    assert refused.value.code == (f"evaluate.py: error: the classes of the shards in {alone} are not the "
                                  f"checkpoint's; give --data-dir the data the model was trained on")


def shard_bytes(members: list[tuple[str, bytes]], end: bool = True) -> bytes:
    """A tar of `members` (name, bytes) as tarfile writes it; end=False: cut just before its end-of-archive blocks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        last = tar.offset
    return buffer.getvalue() if end else buffer.getvalue()[:last]


@pytest.mark.parametrize("make, problem", [
    (lambda d, url: f"{url}shards", "{url}shards is no shard: give a URL folder with a trailing / ({url}shards/)"),
    (lambda d, url: f"{d}/train-{{0..}}.tar", "cannot expand {{0..}} in"),
    (lambda d, url: f"{d}/{{train-000000,test-000000}}}}.tar", "closes a brace it did not open"),
    (lambda d, url: f"{d}/train-{{0..9999999}}.tar", "names over 1,000,000 shards"),
    (lambda d, url: listed(d, ["train-000000.tar", "test-000000.tar", "./train-000000.tar"]),
     "{d}/list.txt names {d}/train-000000.tar twice: each shard once"),
    (lambda d, url: f"{d}/{{train-000000,./train-000000,test-000000}}.tar", "names {d}/train-000000.tar twice"),
    (lambda d, url: replaced(d, "train-000000.tar", (d / "train-000000.tar").read_bytes() + b"\0" * 10240) and
     f"{url}shards/", ": it was written again since it was indexed; write it again (python shards.py --index on the "
                      "folder the shards came from) and put it at {url}shards/index.json"),
    (lambda d, url: emptied(d), "the training shards of {d} hold no images"),
    (lambda d, url: replaced(d, "train-000000.tar", (d / "train-000000.tar").read_bytes() + b"\0" * 10240),
     ": it was written again since it was indexed; remove {d}/index.json and write it again: python shards.py "
     "--index {d}"),
    (lambda d, url: replaced(d, "index.json", b"{nonsense"), "index.json in {d} is not JSON ("),
    (lambda d, url: replaced(d, "classes.txt", b"blue\n\nred\n"),
     "line 2 of classes.txt in {d} is empty: one class a line, each once"),
])
def test_shard_problems_found_at_the_start_are_one_line_with_the_way_forward(tmp_path, make, problem):
    _, dest = write_shards(tmp_path, {"train": 1, "test": 1}, shard_size=100, sizes=(8, 12))
    server = Server(tmp_path)
    try:
        with pytest.raises(SystemExit) as exc:
            run(flags(make(dest, server.url), "--out-dir", str(tmp_path / "run")))
    finally:
        server.shutdown()
    assert exc.value.code.startswith("train.py: error: shards: ") and \
        problem.format(d=dest, url=server.url) in exc.value.code, exc.value.code


def listed(folder: Path, names: list[str]) -> Path:
    path = folder / "list.txt"
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def emptied(folder: Path) -> Path:
    (folder / "index.json").unlink()
    (folder / "train-000000.tar").write_bytes(shard_bytes([]))
    return folder


def replaced(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder


def test_a_list_file_names_shards_relative_to_itself_and_each_folders_index_is_its_own(tmp_path, monkeypatch, capsys):
    _, first = write_shards(tmp_path / "a", {"train": 2, "test": 1})
    _, second = write_shards(tmp_path / "b", {"train": 3, "test": 1}, seed=1)
    (first / "more").mkdir()
    os.link(second / "train-000000.tar", first / "more" / "train-000000.tar")  # the same name, another folder
    (first / "list.txt").write_text("# the shards\n\n  train-000000.tar\nmore/train-000000.tar\n  # test\n"
                                    "test-000000.tar\n")
    monkeypatch.chdir(tmp_path)  # (another folder than the list's)
    tables, _ = tarshards.load(str(first / "list.txt"))
    train = tables["train"]
    assert len(train) == 6 + 8  # the second shard read from its own headers, not from the first folder's index
    reader = stream.ShardReader(train)
    assert [int(train.labels[i]) for i in range(len(train))] == [
        int(text) for shard in (first / "train-000000.tar", second / "train-000000.tar")
        for name, text in members(shard) if name.endswith(".cls")]
    assert all(reader.read(i)[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0") for i in range(len(train)))
    assert "is not in an index.json beside it: reading the shards' headers" in capsys.readouterr().err


def test_shards_py_refuses_a_dest_inside_the_folder_a_url_to_index_and_an_index_of_no_samples(tmp_path, capsys):
    folder = write_photos(tmp_path / "photos", {"train": 1, "test": 1}, sizes=(8, 12))
    for argv, message in (
            ([str(folder), str(folder / "train" / "shards")],
             f"{folder / 'train' / 'shards'} is inside {folder / 'train'}, whose folders are read as classes"),
            (["--index", "http://127.0.0.1:1/shards/"], "--index writes index.json into a folder of shards on this "
                                                       "machine, not http://127.0.0.1:1/shards/"),
            ([str(tmp_path / "nowhere"), str(tmp_path / "out")], f"{tmp_path / 'nowhere'} is no image folder: it needs "
                                                                 f"train/ and test/")):
        with pytest.raises(SystemExit) as exc:
            shards.main(argv)
        assert exc.value.code == f"shards.py: error: shards: {message}" or message in exc.value.code, exc.value.code
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(CLASSES)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train-000000.tar").write_bytes(shard_bytes([("d/s.000000.jpg", b"x"), ("d/s.000000.cls", b"0"),
                                                           ("d/s.000001.jpg", b"y"), ("d/s.000001.cls", b"1")]))
    with pytest.raises(SystemExit) as exc:
        shards.main(["--index", str(theirs)])
    assert exc.value.code.startswith(f"shards.py: error: shards: no samples in the 1 shard of {theirs}: ")
    assert "sample d/s has two members of one kind (a key with a dot in it?" in capsys.readouterr().err
    assert not (theirs / "index.json").exists()

    (theirs / "train-000000.tar").write_bytes(shard_bytes([("a.jpg", b"x"), ("a.cls", b"0"), ("b.jpg", b"y"),
                                                           ("b.cls", b"1")], end=False))  # cut between members
    shards.main(["--index", str(theirs)])
    out = capsys.readouterr()
    assert f"{theirs / 'train-000000.tar'} ends without tar's end-of-archive blocks: it may be cut short (a " \
           f"truncated shard); its 2 samples up to there are read" in out.err
    assert out.out == f"wrote {theirs / 'index.json'}: 2 samples in 1 shard\n"
    with pytest.raises(SystemExit, match=r"^shards.py: error: shards: --index .*nowhere: not found; give the folder "
                                         r"that holds the shards$"):
        shards.main(["--index", str(tmp_path / "nowhere")])


def test_a_file_that_is_no_image_is_left_out_of_the_shards_by_name(tmp_path, capsys):
    """In a shard, a run can name a bad file only by its shard and place: shards.py names it, by its path, and
    leaves it out (its header only is read: the bytes of every image are still copied as they are)."""
    folder = write_photos(tmp_path / "photos", {"train": 2, "test": 1}, sizes=(8, 12))
    (folder / "train" / "red" / "notes.jpg").write_text("not a photo\n")
    shards.main([str(folder), str(tmp_path / "shards")])
    out = capsys.readouterr()
    assert out.err == f"warning: {folder / 'train' / 'red' / 'notes.jpg'} is no image (Pillow knows no image format " \
                      f"in it): left out\n"
    assert out.out.startswith(f"wrote {tmp_path / 'shards'}: train 1 shard ({2 * len(CLASSES)} images), ")
    tables, _ = tarshards.load(str(tmp_path / "shards"))
    assert len(tables["train"]) == 2 * len(CLASSES)
    for photo in (folder / "test").rglob("*.*"):
        photo.write_text("not a photo either\n")
    with pytest.raises(SystemExit, match=rf"^shards.py: error: shards: no file of {re.escape(str(folder / 'test'))} "
                                         r"is an image: nothing to write$"):
        shards.main([str(folder), str(tmp_path / "more")])
    assert not (tmp_path / "more").exists() and not list(tmp_path.glob(".more*"))


def test_class_names_read_back_as_the_folders_are_named_and_a_line_break_is_refused(tmp_path):
    """classes.txt holds a name a line: a class folder whose name is not UTF-8 reads back as folders.py lists it;
    one with a line break in it (which would split into two classes, mislabelling every class after it) is one
    line, and nothing is written."""
    folder = write_photos(tmp_path / "photos", {"train": 1, "test": 1}, sizes=(8, 12))
    for split in ("train", "test"):
        (folder / split / "red").rename(folder / split / os.fsdecode(b"r\xe9d"))
    shards.main([str(folder), str(tmp_path / "shards")])
    _, classes = tarshards.load(str(tmp_path / "shards"))
    assert classes == data.imagefolder_classes(folder) and os.fsdecode(b"r\xe9d") in classes
    for split in ("train", "test"):
        (folder / split / "blue").rename(folder / split / "bl\nue")
    with pytest.raises(SystemExit, match=r"^shards.py: error: shards: the class folder bl\\nue has a line break in "
                                         r"its name, which classes.txt \(one name a line\) cannot hold: rename it$"):
        shards.main([str(folder), str(tmp_path / "more")])
    assert not (tmp_path / "more").exists() and not list(tmp_path.glob(".more*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_shards_py_stopped_midway_leaves_nothing(tmp_path, signum):
    folder = tmp_path / "photos"
    for split, n in (("train", 1500), ("test", 2)):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
            for i in range(n):
                (folder / split / c / f"{i}.jpg").write_bytes(b"\xff\xd8" + os.urandom(2000))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "shards.py", str(folder), str(out), "--shard-size", "10"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not any(p.name.startswith(".out.partial-") and any(p.iterdir()) for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and err == f"shards.py: stopped by {signal.Signals(signum).name}\n", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no partial folder, no out/


def test_a_class_without_training_images_is_one_warning(tmp_path, capsys):
    _, dest = write_shards(tmp_path, {"train": 1, "test": 1}, sizes=(8, 12))
    (dest / "classes.txt").write_text("blue\ngreen\nred\nyak\n")
    tables, classes = tarshards.load(str(dest))
    assert classes == ["blue", "green", "red", "yak"]
    assert capsys.readouterr().err == ("warning: 1 class of the 4 named in classes.txt has no training images (yak): "
                                       "the model gets outputs it never learns\n")
