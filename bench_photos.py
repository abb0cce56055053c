"""bench.py --photos: an image folder of photos, train.py streaming it (the photo recipe) and holding it in memory
against torchvision's reference pipeline (ImageFolder + DataLoader): decoding and training crops on one core, then one
training epoch of each pipeline (images/s, peak memory); and, for larger folders, the memory of a streamed epoch and
the start-up against the number of files. Run through bench.py:

    python bench.py --photos ./photos                  # decoding, crops, one epoch of each pipeline (256 photos)
    python bench.py --photos ./photos --photos-limit 0 --workers 2   # ... on all the training photos
    python bench.py --photos ./photos --stream-memory 4000 40000     # peak memory of a streamed epoch vs set size
    python bench.py --photos ./photos --start-up 128000 1281167      # first step and memory vs the folder's files

What was measured, and on what: docs/performance.md.
"""
import argparse
import contextlib
import csv
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision import transforms

import cli
import stream
from augment import seeded
from decode import Prep, load_image
from folders import image_files, imagefolder_classes
from model import build_model
from workers import init_worker

PHOTOS_LIMIT = 256  # --photos' default: resnet18 trains ~9 images/s on 2 cores, so 3 epochs of 256 take ~90 s
# train.py runs by its full path, in the user's folder: their relative paths hold
TRAIN_PY = str(Path(__file__).resolve().parent / "train.py")


def add_photo_flags(p: argparse.ArgumentParser) -> None:
    """bench.py's --photos and the flags that go with it."""
    p.add_argument("--photos", metavar="FOLDER", help="an image folder (train/, test/): train.py's streamed photo "
                   "recipe against torchvision's ImageFolder + DataLoader, and the in-memory path, one epoch each")
    p.add_argument("--start-up", nargs="+", type=int, metavar="N",
                   help="with --photos: seconds to the first step and main-process memory streaming a simulated "
                        "folder of N links to its photos (e.g. 1281167: ImageNet's training set)")
    p.add_argument("--stream-memory", nargs="+", type=int, metavar="N",
                   help="with --photos: peak memory of a streamed epoch over N images each (links to its files)")
    p.add_argument("--photos-limit", type=int, default=PHOTOS_LIMIT, metavar="N",
                   help=f"--photos: train each pipeline on at most N of the folder's training images, taken from the "
                        f"classes in turn, 0 for all (default: {PHOTOS_LIMIT}: the benchmark in under 5 minutes on 2 "
                        f"cores with resnet18 at 224 px)")
    p.add_argument("--model", default="resnet18", metavar="NAME", help="--photos: the model (default: resnet18)")
    p.add_argument("--image-size", type=int, default=224, metavar="PX", help="--photos: the side (default: 224)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="--photos: the batch (default: 32)")
    p.add_argument("--workers", type=int, default=stream.default_workers(), metavar="N",
                   help="--photos: DataLoader worker processes of both pipelines (default: one per core, at most 8)")


def run_photos(args: argparse.Namespace) -> None:
    """The photo benchmark bench.py's flags ask for: --start-up, --stream-memory, or the pipelines compared."""
    if args.start_up:
        return start_up(args.photos, args.start_up, args.workers)
    if args.stream_memory:
        return stream_memory(args.photos, args.stream_memory, args.workers)
    photos(args.photos, args.model, args.image_size, args.batch_size, args.workers, args.photos_limit)


def show(cmd: list[str]) -> None:
    """Print the train.py command `cmd` about to run, as the user would type it (bench.py's runs too)."""
    print("  " + " ".join(["train.py" if a == TRAIN_PY else a for a in cmd[1:]]), flush=True)


def photos(folder: str, model_name: str, size: int, batch_size: int, workers: int, limit: int) -> None:
    """The photo benchmark of docs/performance.md: decoding per core, then one training epoch of each pipeline over
    at most `limit` of the folder's training images (0: all). Nothing is written into the folder: the pipelines
    read links to its files in a temporary folder, where train.py's in-memory path keeps its cache."""
    root = Path(folder).absolute()  # (the user's folder, whatever folder the processes started here work in)
    if not (root / "train").is_dir():
        raise cli.UserError(f"--photos {folder}: {root / 'train'} is not a folder; give an image folder with "
                            f"train/ and test/, each with one sub-folder of images per class")
    print(f"{cli.printable(str(root))}: decoding to {size} px on one core")
    for name, rate in decode_rates(str(root), size).items():
        print(f"  {name:<46}{rate:>8,.1f} img/s")
    fidelity = crop_fidelity(str(root), size)
    print(f"training crops of the {fidelity['files']} largest JPEGs, train.py against torchvision's (whole decode):")
    for area, (sharp, diff) in fidelity["areas"].items():
        print(f"  area {area:<5g} sharpness {sharp:.2f}x  mean |difference| {diff:.2f}/255")
    ours, theirs = fidelity["seconds"]["ours"], fidelity["seconds"]["theirs"]
    print(f"  areas 0.08-1, one core: {1000 * ours:.1f} ms vs {1000 * theirs:.1f} ms per crop ({theirs / ours:.2f}x)")
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        used, total = photo_links(root, Path(tmp) / "photos", limit)
        print(f"one training epoch of each pipeline on {used:,} of the {total:,} training images"
              + (f" (--photos-limit {limit}; 0 for all)" if used < total else ""), flush=True)
        results = photo_pipelines(str(Path(tmp) / "photos"), model_name, size, batch_size, workers)
    print(f"\n{'pipeline (' + model_name + f', {size} px, {workers} workers)':<44}{'images/s':>10}{'memory':>12}")
    for name, r in results.items():
        print(f"{name:<44}{r['images_per_s']:>10,.1f}{r['memory'] / 2**30:>9,.2f} GiB")
    ratio = results["train.py streamed (photo recipe)"]["images_per_s"] / \
        results["torchvision ImageFolder + DataLoader"]["images_per_s"]
    print(f"streamed / torchvision: {ratio:.2f}x")


def photo_pipelines(folder: str, model_name: str, size: int, batch_size: int, workers: int) -> dict[str, dict]:
    """One training epoch of each pipeline on the image folder: images/s and peak memory, by pipeline."""
    common = ["--model", model_name, "--image-size", str(size), "--batch-size", str(batch_size)]
    results = {"train.py streamed (photo recipe)": train_py_photos(folder, [*common, "--resize-mode", "crop",
                                                                             "--workers", str(workers)])}
    print(f"  torchvision ImageFolder + DataLoader, {workers} workers", flush=True)
    results["torchvision ImageFolder + DataLoader"] = torchvision_photos(folder, model_name, size, batch_size,
                                                                         workers)
    results["train.py in memory (squash)"] = train_py_photos(folder, [*common, "--resize-mode", "squash"])
    return results


def photo_links(root: Path, dest: Path, limit: int) -> tuple[int, int]:
    """dest/train/ and dest/test/: links to the files of the image folder `root`, under their own names. Training:
    at most `limit` images (0: all), taken from the classes in turn (each class's first, sorted), at least one per
    class; test: one per class, which train.py needs and the benchmark does not time (no val/: none is run).
    Returns (training images linked, training images in `root`)."""
    classes = imagefolder_classes(root)
    files = {c: image_files(root / "train" / c) for c in classes}
    total = sum(map(len, files.values()))
    take = {c: len(found) for c, found in files.items()}
    if limit and limit < total:
        take, left = dict.fromkeys(classes, 0), min(total, max(limit, len(classes)))
        while left:  # a round over the classes, each giving one more while it has one
            for c in classes:
                if left and take[c] < len(files[c]):
                    take[c], left = take[c] + 1, left - 1
    tests = {c: image_files(root / "test" / c)[:1] for c in classes if (root / "test" / c).is_dir()}
    for split, chosen in (("train", {c: files[c][:take[c]] for c in classes}), ("test", tests)):
        for c, paths in chosen.items():
            for path in paths:
                link = dest / split / c / path.relative_to(root / split / c)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path, link)
    return sum(take.values()), total


def decode_rates(folder: str, size: int, count: int = 24) -> dict[str, float]:
    """Images/s on one core turning JPEGs of the folder into evaluation's size x size centre crop (resize to
    size / 0.875 first): Pillow decoding the whole file (torchvision's ImageFolder), Pillow's draft mode
    (decode.load_image, what train.py streams with), and torchvision.io.decode_jpeg."""
    import torchvision.io
    import torchvision.transforms.v2.functional as TF
    files = [p for p in image_files(Path(folder) / "train") if p.suffix.lower() in (".jpg", ".jpeg")][:count]
    if not files:
        raise cli.UserError(f"no JPEG files in {folder}/train to time decoding on")
    prep = Prep("crop", round(size / 0.875))
    torch.set_num_threads(1)

    def pillow_whole(p: Path) -> None:
        with Image.open(p) as im:
            TF.center_crop(TF.resize(im.convert("RGB"), [prep.resize_size], antialias=True), [size, size])

    def io_decode(p: Path) -> None:
        x = torchvision.io.decode_jpeg(torchvision.io.read_file(str(p)))
        TF.center_crop(TF.resize(x, [prep.resize_size], antialias=True), [size, size])
    rates = {}
    for name, decode in (("Pillow whole file, Pillow resize", pillow_whole),
                         ("Pillow draft mode, Pillow resize (train.py)", lambda p: load_image(p, 3, size, prep=prep)),
                         ("torchvision.io.decode_jpeg, torch resize", io_decode)):
        start = time.perf_counter()
        for p in files:
            decode(p)
        rates[name] = len(files) / (time.perf_counter() - start)
    return rates


def sharpness(x: torch.Tensor) -> float:
    """Mean absolute Laplacian of uint8 images (N, C, H, W): how much fine detail they hold."""
    kernel = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x.float(), kernel, groups=x.shape[1]).abs().mean().item()


def crop_fidelity(folder: str, size: int, count: int = 8, draws: int = 4) -> dict:
    """train.py's training crops (decode.load_image: the box drawn from the header, the JPEG decoded at the largest
    reduction that keeps the box >= 2 x size) against torchvision's (the whole file decoded, EXIF applied,
    RandomResizedCrop + RandomHorizontalFlip) with the same draws, on the folder's largest JPEGs, at crop areas
    0.08, 0.25 and 1.0: sharpness (sharpness()) ours / theirs and the mean |difference| in 1/255; then the time per
    crop, one core, over the default areas (0.08-1)."""
    import torchvision.transforms.v2 as T
    files = sorted((p for p in image_files(Path(folder) / "train") if p.suffix.lower() in (".jpg", ".jpeg")),
                   key=lambda p: -p.stat().st_size)[:count]
    if not files:
        raise cli.UserError(f"no JPEG files in {folder}/train to measure the training crops on")
    torch.set_num_threads(1)

    def theirs(path: Path, scale: tuple[float, float]) -> torch.Tensor:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            return T.Compose([T.RandomResizedCrop(size, scale), T.RandomHorizontalFlip(), T.PILToTensor()])(im)

    def crops(make, scale) -> torch.Tensor:
        out = []
        for k, path in enumerate(files):
            for d in range(draws):
                with seeded(0, 1, k * draws + d):
                    out.append(make(path, scale))
        return torch.stack(out)

    def ours(path: Path, scale: tuple[float, float]) -> torch.Tensor:
        return load_image(path, 3, size, prep=Prep("crop", round(size / 0.875), scale=scale), train=True)
    result = {}
    for area in (0.08, 0.25, 1.0):
        a, b = crops(ours, (area, area)), crops(theirs, (area, area))
        result[area] = (sharpness(a) / sharpness(b), (a.float() - b.float()).abs().mean().item())
    seconds = {}
    for name, make in (("ours", ours), ("theirs", theirs)):
        start = time.perf_counter()
        crops(make, (0.08, 1.0))
        seconds[name] = (time.perf_counter() - start) / (len(files) * draws)
    return {"areas": result, "seconds": seconds, "files": len(files)}


def train_py_photos(folder: str, extra: list[str]) -> dict:
    """One epoch of train.py on the image folder: training images/s (metrics.csv) and peak memory."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, TRAIN_PY, "--dataset", "imagefolder", "--data-dir", folder, "--epochs", "1",
               "--val-split", "0", "--out-dir", out, "--log-interval", "0", *extra]
        show(cmd)
        peak = [0]
        # In a session of its own: Ctrl-C reaches bench.py alone, which ends the run and its workers without a word
        # (its folders are temporary); run in the user's folder by its full path, so their relative paths hold.
        proc = None
        try:
            with cli.signals_held():  # (a Ctrl-C within Popen would leave the run going, unseen by the finally)
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
            with peak_tree_memory(proc.pid, peak):
                proc.wait()
        finally:
            if proc is not None and proc.returncode is None:  # (stopped: Ctrl-C, SIGTERM, an error of ours)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode != 0:
            raise cli.UserError("the train.py run above failed")
        with open(Path(out) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    return {"images_per_s": float(rows[-1]["images_per_s"]), "memory": peak[0]}


def torchvision_photos(folder: str, model_name: str, size: int, batch_size: int, workers: int) -> dict:
    """torchvision's reference pipeline: ImageFolder (PIL decodes each file whole) and a DataLoader with `workers`
    processes, RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize per image, then the five steps with
    train.py's defaults (Adam 1e-3, channels-last). One epoch: training images/s and peak memory."""
    from torchvision.datasets import ImageFolder
    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = ImageFolder(str(Path(folder) / "train"), transform=tf)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=False, drop_last=False,
                        worker_init_fn=init_worker)  # (Ctrl-C is the main process's to handle)
    torch.manual_seed(0)
    model = build_model(model_name, len(dataset.classes), 3, size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    peak = [0]
    with peak_tree_memory(os.getpid(), peak):
        start = time.perf_counter()
        with cli.signals_held():  # (a Ctrl-C as the workers are forked stops bench.py, not a worker: see there)
            batches = iter(loader)
        try:
            for x, y in batches:
                optimizer.zero_grad()
                F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
                optimizer.step()
        finally:
            if hasattr(batches, "_shutdown_workers"):  # now, however the loop ended (Ctrl-C), not when collected
                batches._shutdown_workers()
        seconds = time.perf_counter() - start
    return {"images_per_s": len(dataset) / seconds, "memory": peak[0]}


def tree_memory(pid: int) -> int:
    """The proportional set size (PSS) of process `pid` and its children, in bytes: what they hold of the memory,
    each shared page split between its sharers (forked DataLoader workers share most of theirs)."""
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if entry.name == str(pid) or fields[1] == str(pid):
                rollup = (entry / "smaps_rollup").read_text()
                total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) * 1024
        except (OSError, IndexError, StopIteration, ValueError):
            continue
    return total


@contextlib.contextmanager
def peak_tree_memory(pid: int, peak: list[int]) -> Iterator[None]:
    """While the block runs, sample tree_memory(pid) 20 times a second; peak[0] is the largest sample."""
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_memory(pid))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def stream_memory(folder: str, counts: list[int], workers: int) -> None:
    """Peak memory (workers included) of one streamed epoch over `counts` images: links to the folder's training
    files, as many as each count asks, in a temporary image folder of the same classes."""
    root = Path(folder)
    classes = imagefolder_classes(root)
    sources = {c: image_files(root / "train" / c) for c in classes}
    print(f"{'images':>8}{'memory':>12}{'images/s':>10}  (simplecnn, 64 px, {workers} workers, one epoch)")
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            for split, n in (("train", count), ("test", len(classes))):
                for k, c in enumerate(classes):
                    (Path(tmp) / split / c).mkdir(parents=True)
                    share = n // len(classes) + (k < n % len(classes))
                    for i in range(share):
                        source = sources[c][i % len(sources[c])]
                        os.symlink(source.resolve(), Path(tmp) / split / c / f"{i}{source.suffix}")
            r = train_py_photos(tmp, ["--image-size", "64", "--resize-mode", "crop", "--workers", str(workers),
                                      "--batch-size", "64"])
        print(f"{count:>8,}{r['memory'] / 2**30:>9,.2f} GiB{r['images_per_s']:>10,.0f}")


def simulated_folder(sources: list[Path], root: Path, files: int, classes: int) -> None:
    """root/train/ with `files` links to `sources` (in turn) over `classes` class folders, and root/test/ with two
    per class: a folder of ImageNet's shape from a few photos."""
    for split, per_class in (("train", None), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"c{c:04d}"
            folder.mkdir(parents=True)
            n = per_class or files // classes + (c < files % classes)
            for i in range(n):
                source = sources[(c + i) % len(sources)]
                os.symlink(source, folder / f"{i:07d}{source.suffix}")


def first_step(cmd: list[str]) -> tuple[float, int]:
    """Seconds from launching the train.py command `cmd` to its first optimizer step's line (--log-interval 1), and
    its main process's peak resident memory then (VmHWM, bytes); the run is ended there."""
    start, proc = time.perf_counter(), None
    try:
        with cli.signals_held():  # (a Ctrl-C within Popen would leave the run going, unseen by the finally)
            proc = subprocess.Popen(cmd, cwd=Path(__file__).parent, stdout=subprocess.PIPE, text=True,
                                    start_new_session=True)
        for line in proc.stdout:
            if line.split()[2:3] == ["step"]:
                seconds = time.perf_counter() - start
                status = Path(f"/proc/{proc.pid}/status").read_text()
                return seconds, int(next(v for k, v in (x.split(":") for x in status.splitlines())
                                         if k == "VmHWM").split()[0]) * 1024
        raise cli.UserError("train.py ended before its first step")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_up(folder: str, counts: list[int], workers: int, classes: int = 1000) -> None:
    """Seconds from launch to train.py's first optimizer step, and the main process's peak resident memory then
    (VmHWM), streaming a simulated folder of N links to the folder's photos for each N: what listing a large folder
    costs. Per file: the peak's growth from the smallest N to the largest, over the files added."""
    sources = [p.resolve() for p in image_files(Path(folder) / "train")][:16]
    if not sources:
        raise cli.UserError(f"no image files in {folder}/train to link to")
    print(f"{'files':>10}{'first step':>12}{'main process':>14}  (simplecnn, 64 px, photo recipe, {workers} workers)")
    peaks = {}
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            simulated_folder(sources, Path(tmp) / "photos", count, min(classes, count))
            seconds, peaks[count] = first_step([
                sys.executable, "train.py", "--dataset", "imagefolder", "--data-dir", str(Path(tmp) / "photos"),
                "--image-size", "64", "--resize-mode", "crop", "--workers", str(workers), "--epochs", "1",
                "--batch-size", "64", "--val-split", "0", "--log-interval", "1", "--out-dir", str(Path(tmp) / "run")])
        print(f"{count:>10,}{seconds:>11.1f}s{peaks[count] / 2**20:>11,.0f} MiB", flush=True)
    if len(counts) > 1:
        low, high = min(counts), max(counts)
        print(f"main process: {(peaks[high] - peaks[low]) / (high - low):.0f} bytes per file")
