"""Benchmarks you can re-run: the seed pipeline against train.py, and time to accuracy of a preset.

    python bench.py --data-dir ./data                  # 5 epochs each: images/s and test accuracy (~3 min, 2 cores)
    python bench.py --data-dir ./data --epochs 1       # throughput only, quicker
    python bench.py --data-dir ./data --preset fast    # time to accuracy: the whole train.py command, timed
    python bench.py --preset fast -- --widths 64,256,256 --device cuda   # train.py flags
    python bench.py --step-cost 64,128,128 32,192,192  # AirNet training step time per widths, side by side (no data)
    python bench.py --step-cost 32,192,192 --optimizers sgd muon   # ... and per optimizer
    python bench.py --loop-cost 4 32                   # train.py's loop against the bare five steps (no data)
    python bench.py --flops seed fast                  # FLOPs per image and of each recipe; achieved FLOP/s vs peak
    python bench.py --data-dir ./data --memory         # peak memory of one epoch: the seed pipeline vs train.py
    python bench.py --data-dir ./data --memory -- --preset fast   # the same for a preset
    python bench.py --loop-cost 32 --log-interval 1    # the same, also with a progress line after every step
    python bench.py --photos ./photos                  # photos: streamed vs torchvision's ImageFolder + DataLoader
    python bench.py --photos ./photos --stream-memory 4000 40000   # peak memory of a streamed epoch vs set size
    python bench.py --shards ./photos --image-size 32  # a folder vs its shards
    python bench.py --shards --start-up 128000 1281167  # start-up, memory
    python bench.py --data-dir ./data --long-tailed ./data-lt   # long-tailed CIFAR-10 (imbalance 100) to train on

The baseline is the seed guide's recipe as written there: a Dataset that turns each image into a PIL image and
applies ToTensor + Normalize (what torchvision.datasets.CIFAR10 does per item; built here from the same arrays
so that no file goes through the plain unpickler), a DataLoader with batch 32 and shuffle, SimpleCNN, Adam 1e-3,
all 50,000 training images. train.py runs as a subprocess with the same recipe and --val-split 0, so both train
on the same images. images/s counts the training pass alone in both.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads: an early Ctrl-C exits quietly, as in the other scripts

import argparse
import contextlib
import csv
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import bench_photos
import bench_shards
import config
import optim
import runtime
import train
from bench_photos import TRAIN_PY, show
from checkpoint import EpochTally
from data import ImageSet, load_raw
from formats import load_cifar10
from model import AirNet, SimpleCNN
from trainer import build_trainer

ROOT = Path(__file__).resolve().parent  # what --memory's seed guide process imports bench.py from


class SeedGuideCIFAR10(Dataset):
    """Per-item work of torchvision's CIFAR10 dataset with the guide's transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision stores it
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def seed_guide_run(data_dir: str, epochs: int) -> dict:
    train_x, train_y, test_x, test_y, _ = load_raw("cifar10", data_dir)
    torch.manual_seed(0)
    train = DataLoader(SeedGuideCIFAR10(train_x, train_y), batch_size=32, shuffle=True)
    test = DataLoader(SeedGuideCIFAR10(test_x, test_y), batch_size=32)
    model = SimpleCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for images, labels in train:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
        rates.append(len(train.dataset) / (time.perf_counter() - start))
        print(f"  seed guide epoch {epoch + 1}: {rates[-1]:,.0f} img/s", flush=True)
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
    return {"images_per_s": sum(rates) / len(rates), "test_accuracy": 100 * correct / len(test.dataset)}


def seed_guide_process(data_dir: str) -> None:
    """--memory's seed guide run, in a process of its own: one epoch; an error is one line, as train.py's."""
    with cli.one_line_errors("bench.py"):
        seed_guide_run(data_dir, 1)


def run_train_py(cmd: list[str]) -> None:
    # (a stdout that has failed here, closed or full, is not handed on: train.py would fail on it too)
    if subprocess.run(cmd, stdout=subprocess.DEVNULL if cli.stdout_failed() else None).returncode != 0:
        # train.py has said why, in one line
        raise cli.UserError("the train.py run above failed")


def train_py_run(data_dir: str, epochs: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, TRAIN_PY, "--data-dir", data_dir, "--epochs", str(epochs), "--val-split", "0",
               "--out-dir", out, *extra]
        show(cmd)
        run_train_py(cmd)
        with open(Path(out) / "metrics.csv", newline="") as f:
            rates = [float(row["images_per_s"]) for row in csv.DictReader(f)]
        results = json.loads((Path(out) / "results.json").read_text())
    return {"images_per_s": sum(rates) / len(rates), "test_accuracy": results["test_accuracy"]}


def peak_memory(cmd: list[str]) -> int:
    """Run cmd to its end and return its peak resident memory in bytes: what /usr/bin/time -v calls the maximum
    resident set size, as the kernel counts it (process exit included)."""
    show(cmd)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise cli.UserError(f"the run above failed (exit {proc.returncode})")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def memory(data_dir: str, extra: list[str]) -> None:
    """Peak memory of one epoch: the seed guide's pipeline against train.py (the seed recipe, or `extra`), each in
    a process of its own."""
    with tempfile.TemporaryDirectory() as out:
        ours = peak_memory([sys.executable, TRAIN_PY, "--data-dir", data_dir, "--epochs", "1", "--out-dir", out,
                            *extra])
    base = peak_memory([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import bench; "
                        f"bench.seed_guide_process({data_dir!r})"])
    print(f"\n{'pipeline':<12}{'peak resident memory':>22}")
    for name, peak in (("seed guide", base), ("train.py", ours)):
        print(f"{name:<12}{peak / 2**30:>18.2f} GiB")


def time_to_accuracy(data_dir: str, preset: str, extra: list[str]) -> None:
    """Run the whole train.py command (load, train, final test) and report its wall time and test accuracy."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, TRAIN_PY, "--preset", preset, "--data-dir", data_dir, "--out-dir", out, *extra]
        show(cmd)
        start = time.perf_counter()
        run_train_py(cmd)
        wall = time.perf_counter() - start
        results = json.loads((Path(out) / "results.json").read_text())
    print(f"\n{preset}: {results['test_accuracy']:.2f}% test accuracy in {wall:.0f} s wall clock "
          f"({results['train_seconds']:.0f} s of training, {results['epochs_completed']} epochs)")


def step_cost(all_widths: list[tuple[int, ...]], optimizers: list[str], batch_size: int = 512,
              rounds: int = 7) -> None:
    """Time one training step of the fast preset (label smoothing, bf16 autocast, channels_last) for AirNet at
    each widths with each optimizer (the preset's other values), on random 32x32 images on the CPU; they take
    turns, so machine noise hits them all alike. Prints the median."""
    runtime.keep_freed_memory()  # as train.py does on the CPU
    torch.set_flush_denormal(True)
    cpu = torch.device("cpu")
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    runs = {}
    for widths in all_widths:
        for name in optimizers:
            args = config.parse_args(["--preset", "fast", "--optimizer", name])
            model = AirNet(widths=widths).to(memory_format=torch.channels_last)
            runs[",".join(map(str, widths)) + " " + name] = (model, optim.make_optimizer(model, args, cpu, 10), [])

    def step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast(args.amp, cpu):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=args.label_smoothing)
        loss.backward()
        optimizer.step()
    for _ in range(rounds):
        for model, optimizer, times in runs.values():
            step(model, optimizer)  # warm-up
            for _ in range(3):
                start = time.perf_counter()
                step(model, optimizer)
                times.append(time.perf_counter() - start)
    first = statistics.median(next(iter(runs.values()))[2])
    for name, (_, _, times) in runs.items():
        ms = statistics.median(times)
        print(f"{name:>20}: {ms * 1000:6.0f} ms per step of {batch_size}, {ms / first:.2f}x")


def loop_cost(batch_sizes: list[int], images: int = 4096, rounds: int = 5, log_interval: int = 0) -> dict[int, float]:
    """train.py's training loop (train_epoch, the seed recipe) against the bare five steps on one fixed batch
    (same model, fused Adam, channels_last), images/s side by side on the CPU; the two take turns, so machine noise
    hits both alike. With log_interval > 0 the loop also runs with train.py's --log-interval (its lines to
    /dev/null), in the same turns. Prints and returns the loop's share of the bare step's images/s per batch size
    (median)."""
    runtime.keep_freed_memory()  # as train.py does on the CPU, for both
    torch.set_flush_denormal(True)
    cpu, shares = torch.device("cpu"), {}
    for batch_size in batch_sizes:
        args = config.parse_args(["--batch-size", str(batch_size), "--device", "cpu", "--log-interval", "0"])
        logged_args = config.parse_args(["--batch-size", str(batch_size), "--device", "cpu", "--log-interval",
                                        str(log_interval)])
        generator = torch.Generator().manual_seed(0)
        data = ImageSet(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator),
                        torch.randint(0, 10, (images,), generator=generator), torch.full((3,), 0.5),
                        torch.full((3,), 0.25))
        trainer = build_trainer(args, data, 10, cpu, resumed=None)
        logged_trainer = build_trainer(logged_args, data, 10, cpu, resumed=None)
        bare_model = SimpleCNN().to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(bare_model.parameters(), lr=args.lr, fused=True)
        x, y = data.batch(torch.arange(batch_size))
        x = x.contiguous(memory_format=torch.channels_last)
        loop_rates, bare_rates, logged_rates = [], [], []
        for epoch in range(1, rounds + 1):
            tally = EpochTally()
            train.train_epoch(trainer, data, args, epoch, tally)
            loop_rates.append(images / tally.seconds)
            if log_interval:
                tally = EpochTally()
                with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                    train.train_epoch(logged_trainer, data, logged_args, epoch, tally)
                logged_rates.append(images / tally.seconds)
            start = time.perf_counter()
            for _ in range(images // batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(bare_model(x), y)
                loss.backward()
                optimizer.step()
            bare_rates.append(images // batch_size * batch_size / (time.perf_counter() - start))
        loop, bare = statistics.median(loop_rates), statistics.median(bare_rates)
        shares[batch_size] = loop / bare
        logged = f"; with --log-interval {log_interval} {statistics.median(logged_rates):>8,.0f} img/s: " \
            f"{100 * statistics.median(logged_rates) / bare:.0f}%" if log_interval else ""
        print(f"batch {batch_size:>4}: bare step {bare:>8,.0f} img/s, train.py loop {loop:>8,.0f} img/s: "
              f"{100 * loop / bare:.0f}%{logged}", flush=True)
    return shares


def model_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> tuple[float, float]:
    """(forward + backward, forward) FLOPs per image of `model` on the batch x, counted by torch's FlopCounterMode
    (matrix multiplies and convolutions: 2 FLOPs per multiply-add; what the counter does not count, such as
    BatchNorm and activations, is left out)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.train()
    with FlopCounterMode(display=False) as forward, autocast:
        logits = model(x)
    with FlopCounterMode(display=False) as backward:
        F.cross_entropy(logits.float(), y).backward()
    model.zero_grad(set_to_none=True)
    fwd = forward.get_total_flops() / len(x)
    return fwd + backward.get_total_flops() / len(x), fwd


def matmul_peak(dtype: torch.dtype, n: int = 4096, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matrix multiply in `dtype` on this process's threads: the machine's practical peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def efficiency(presets: list[str], steps: int = 30, train_images: int = 50_000, test_images: int = 10_000) -> None:
    """For each preset on CIFAR-10-sized data: FLOPs per image, the training and test FLOPs of the whole recipe,
    the images/s of train.py's own training loop (train_epoch, on `steps` steps of random images) and the FLOP/s
    that makes, against the peak of a large bf16 and fp32 matrix multiply measured right before, in this process
    and on its threads. Prints a table."""
    runtime.keep_freed_memory()  # as train.py does on the CPU
    torch.set_flush_denormal(True)
    cpu, rows = torch.device("cpu"), []
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    for preset in presets:
        args = config.parse_args(["--preset", preset, "--device", "cpu", "--log-interval", "0", "--val-split", "0"])
        n = steps * args.batch_size * args.accum_steps
        generator = torch.Generator().manual_seed(0)
        data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
                        torch.randint(0, 10, (n,), generator=generator), torch.full((3,), 0.5), torch.full((3,), 0.25))
        t = build_trainer(args, data, 10, cpu, resumed=None)
        x, y = data.batch(torch.arange(min(64, n)))
        train_flops, test_flops = model_flops(t.model, x.contiguous(memory_format=torch.channels_last), y, t.autocast)
        views = {"none": 1, "mirror": 2, "shifts": 6}[args.tta]
        train.train_epoch(t, data, args, 1, EpochTally(step=steps - 2))  # warm-up: the last 2 steps
        tally = EpochTally()
        train.train_epoch(t, data, args, 1, tally)
        rate = n / tally.seconds
        peak = peaks["bf16" if args.amp == "bf16" else "fp32"]
        rows.append((preset, train_flops, args.epochs * train_images * train_flops,
                     test_images * views * test_flops, rate, rate * train_flops, peak))
    print(f"peak of a 4096x4096 matrix multiply on {torch.get_num_threads()} threads: bf16 {peaks['bf16'] / 1e9:,.0f} "
          f"GFLOP/s, fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s")
    print(f"{'preset':<8}{'MFLOP/img':>11}{'train PFLOP':>13}{'test PFLOP':>12}{'img/s':>9}{'GFLOP/s':>10}"
          f"{'peak':>8}{'share':>8}")
    for preset, per_image, total, test, rate, achieved, peak in rows:
        print(f"{preset:<8}{per_image / 1e6:>11,.0f}{total / 1e15:>13.4f}{test / 1e15:>12.4f}{rate:>9,.0f}"
              f"{achieved / 1e9:>10,.0f}{peak / 1e9:>8,.0f}{100 * achieved / peak:>7.1f}%")


def main() -> None:
    with cli.one_line_errors("bench.py"):
        run_benchmark()


def long_tail_counts(n: int, imbalance: float, classes: int = 10) -> list[int]:
    """How many training images class i keeps: int(n x imbalance^(-i/(classes-1))), at least 1 (the literature's
    rounding down: for n = 5,000 and imbalance 100, 5,000, 2,997, ..., 83, 50)."""
    return [max(1, int(n * imbalance ** (-i / (classes - 1)))) for i in range(classes)]


def long_tailed_cifar10(data_dir: str, out: str, imbalance: float = 100.0, seed: int = 0) -> list[int]:
    """Write a long-tailed copy of CIFAR-10 to `out`/cifar-10-batches-py, as the literature builds it (Cao et al.,
    NeurIPS 2019): class i keeps int(n x imbalance^(-i/9)) of its training images (n: the smallest class's count,
    5,000 for CIFAR-10; at imbalance 100: 5,000 down to 50, 12,406 in all), a seeded random choice; the test set is
    copied untouched. Returns the counts kept, class by class."""
    src, dst = Path(data_dir) / "cifar-10-batches-py", Path(out) / "cifar-10-batches-py"
    if dst.exists():
        raise cli.UserError(f"{dst} already exists; give --long-tailed a new folder")
    images, labels, _ = load_cifar10(Path(data_dir), ("train",))
    members = [(labels == c).nonzero().squeeze(1) for c in range(10)]
    counts = long_tail_counts(min(map(len, members)), imbalance)
    g = torch.Generator().manual_seed(seed)
    kept = torch.cat([m[torch.randperm(len(m), generator=g)[:k]] for m, k in zip(members, counts)]).sort().values
    dst.mkdir(parents=True)
    for i, part in enumerate(kept.tensor_split(5), 1):  # the five training batches of the real layout
        batch = {"data": images[part].reshape(len(part), 3072).numpy(), "labels": labels[part].tolist()}
        (dst / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    for name in ("test_batch", "batches.meta"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return counts


def parse_bench_args() -> argparse.Namespace:
    p = cli.parser("bench.py", __doc__)
    p.add_argument("--data-dir", default="./data", metavar="DIR", help="holds cifar-10-batches-py (default: ./data)")
    p.add_argument("--epochs", type=int, default=5, metavar="N", help="epochs for each pipeline (default: 5)")
    p.add_argument("--preset", metavar="NAME", help="time a train.py preset to accuracy instead")
    p.add_argument("--step-cost", nargs="+", type=config.widths_list, metavar="A,B,C",
                   help="time an AirNet training step for each of these widths instead (CPU, no data needed)")
    p.add_argument("--optimizers", nargs="+", default=["sgd"], choices=["sgd", "muon", "adam", "adamw"],
                   metavar="NAME", help="--step-cost: time the step with each of these optimizers (default: sgd)")
    p.add_argument("--loop-cost", nargs="+", type=int, metavar="BATCH",
                   help="train.py's loop against the bare model step at these batch sizes instead (CPU, no data)")
    p.add_argument("--flops", nargs="+", metavar="PRESET", choices=sorted(config.PRESETS),
                   help="FLOPs per image, of the whole recipe and per second of train.py's loop, against the "
                        "machine's matrix-multiply peak, for these presets instead (CPU, no data)")
    p.add_argument("--memory", action="store_true",
                   help="peak resident memory of one epoch instead: the seed guide's pipeline against train.py")
    p.add_argument("--log-interval", type=int, default=0, metavar="N",
                   help="with --loop-cost: also time the loop with train.py's --log-interval N (default: 0, off)")
    bench_photos.add_photo_flags(p)
    p.add_argument("--shards", nargs="?", const="", metavar="FOLDER",
                   help="an epoch read from an image folder against its tar shards (shards.py), the data path alone "
                        "(give --image-size too); with --start-up N ..., no folder: the first step from N images "
                        "in 1,000-image shards instead")
    p.add_argument("--long-tailed", metavar="DIR", help="write a long-tailed copy of --data-dir's CIFAR-10 to DIR "
                   "instead (class i keeps 5000 x imbalance^(-i/9) training images; the test set as it is)")
    p.add_argument("--imbalance", type=float, default=100.0, metavar="R",
                   help="--long-tailed: the most common class's count over the rarest's (default: 100)")
    p.add_argument("train_args", nargs="*", help="extra train.py flags, after --")
    args = p.parse_args()
    for wrong, message in ((args.loop_cost and not all(1 <= n <= 4096 for n in args.loop_cost),
                            "--loop-cost takes batch sizes in [1, 4096]"),
                           (args.log_interval < 0, "--log-interval must be >= 0"),
                           (args.step_cost and any(len(w) != 3 for w in args.step_cost),
                            "--step-cost takes AirNet widths: three channel counts each, like 32,192,192"),
                           (not 1 <= args.imbalance <= 5000, "--imbalance must be in [1, 5000]"),
                           (args.photos_limit < 0, "--photos-limit must be >= 0 (0: all the training images)"),
                           (args.shards == "" and not args.start_up, "--shards takes an image folder, or "
                                                                     "--start-up N ... for shards of tiny images"),
                           (args.start_up and not (args.photos or args.shards is not None),
                            "--start-up is for --photos FOLDER or --shards"),
                           (args.start_up and not all(2 <= n <= 10**8 for n in args.start_up),
                            "--start-up takes numbers of files in [2, 100000000]: two classes need one each")):
        if wrong:
            p.error(message)
    return args


def run_benchmark() -> None:
    """The benchmark the flags ask for: the first of --long-tailed, --flops, --step-cost, --loop-cost, --memory,
    --photos and --preset given, else the seed guide's pipeline against train.py."""
    args = parse_bench_args()
    if args.long_tailed:
        counts = long_tailed_cifar10(args.data_dir, args.long_tailed, args.imbalance)
        return print(f"{sum(counts):,} training images ({', '.join(map(str, counts))}) written to "
                     f"{Path(args.long_tailed) / 'cifar-10-batches-py'}; train with --data-dir {args.long_tailed}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for asked, benchmark in ((args.flops, lambda: efficiency(args.flops)),
                             (args.step_cost, lambda: step_cost(args.step_cost, args.optimizers)),
                             (args.loop_cost, lambda: loop_cost(args.loop_cost, log_interval=args.log_interval)),
                             (args.memory, lambda: memory(args.data_dir, args.train_args)),
                             (args.photos, lambda: bench_photos.run_photos(args)),
                             (args.shards is not None, lambda: bench_shards.run_shards(args.shards, args.start_up,
                                                                                       args.workers, args.image_size)),
                             (args.preset, lambda: time_to_accuracy(args.data_dir, args.preset, args.train_args))):
        if asked:
            return benchmark()
    ours = train_py_run(args.data_dir, args.epochs, args.train_args)
    base = seed_guide_run(args.data_dir, args.epochs)
    print(f"\n{'pipeline':<12}{'images/s':>10}{'test acc':>10}")
    for name, r in (("seed guide", base), ("train.py", ours)):
        print(f"{name:<12}{r['images_per_s']:>10,.0f}{r['test_accuracy']:>9.2f}%")
    print(f"speed-up: {ours['images_per_s'] / base['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
