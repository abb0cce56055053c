"""Datasets held in memory as uint8 tensors, with normalization and augmentation on whole batches.

The files are read by formats.py (CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST) and folders.py (your own image
folders); stream.py serves image folders from disk instead, for the photo recipe and for sets that do not fit in
memory (prepare chooses; docs/data.md says when).

Why in memory: CIFAR-10 is 150 MB as uint8, so decoding it once and slicing batches out of one tensor
on the training device removes the per-image Python work (PIL, ToTensor, collate) that otherwise dominates
a small model's step time (--image-size resizes the packed datasets once, into that tensor). Every random
choice of an epoch (order, crop offsets, flips) is drawn up front from (seed, epoch) alone, so an epoch is the
same whatever the batch size, accumulation or resume point.
"""
import hashlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

import cli
from runtime import print0
import tarshards
import stream
from augment import apply_policy
from batches import JITTER_UNIT, PAD, channel_stats, to_input
from decode import MAX_IMAGE_PIXELS, SQUASH, Prep
from folders import imagefolder_classes, load_imagefolder, load_imagefolder_split, require_each_class, split_listing
from formats import (DATASETS, MIN_IMAGES, DataError, allocate_images, check_memory, load_cifar10, load_cifar100,
                     load_idx_dataset)

RESIZE_BUFFER = 64 * 2**20  # bytes of float copies --image-size's resizing may hold beyond its result (>= 1 image)
OPEN_SHARDS = 8  # tar shards read at once in an epoch (mixed_order): more mixes more, each an open file or request


def load_raw(name: str, data_dir: str | Path, image_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """(train_images, train_labels, test_images, test_labels, classes), images uint8 (N, C, H, W).
    image_size is the side imagefolder images are decoded to (None: 32), max_pixels the most one image may decode
    to; the packed datasets come at their own size (32 or 28: resize_images resizes them)."""
    _check_name(name)
    if name == "imagefolder":
        return load_imagefolder(Path(data_dir), image_size or 32, max_pixels)
    return _load_packed(name, Path(data_dir), ("train", "test"))


def load_test(name: str, data_dir: str | Path, classes: list[str], image_size: int,
              max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split alone, images uint8 (N, C, image_size, image_size) and labels, for a model trained on
    `classes`: what evaluate.py reads. The normalization is the checkpoint's, so no training image is read or
    decoded, and the data may travel without them. A DataError when the dataset's classes are not `classes`."""
    _check_name(name)
    data_dir = Path(data_dir)
    if name == "imagefolder":
        return load_imagefolder_split(data_dir, "test", classes, image_size, max_pixels, against="the checkpoint's")
    images, labels, found = _load_packed(name, data_dir, ("test",))
    if found != classes:
        raise DataError(f"the classes of {name} in {data_dir} are not the checkpoint's; give --data-dir the data the "
                        f"model was trained on")
    return resize_images(images, image_size, f"{name} test"), labels


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def _load_packed(name: str, data_dir: Path, splits: tuple[str, ...]):
    if data_dir.exists() and not data_dir.is_dir():  # (not looked through, nor replaced by a folder found elsewhere)
        raise DataError(f"{name}: --data-dir {data_dir} is a file, not a folder; give the folder that holds {name}")
    if name == "cifar10":
        return load_cifar10(data_dir, splits)
    if name == "cifar100":
        return load_cifar100(data_dir, splits)
    return load_idx_dataset(name, data_dir, splits)


def resize_images(images: torch.Tensor, size: int | None, what: str) -> torch.Tensor:
    """uint8 images (N, C, H, W) resized to size x size (None, or their own size: returned as they are), with
    antialiased bilinear interpolation (what Pillow does for image folders), into one preallocated uint8 tensor, a
    few images at a time: their float copies (input, output and the separable pass between) stay within
    RESIZE_BUFFER, and the memory check counts them."""
    if size is None or images.shape[2:] == (size, size):
        return images
    n, c, h, w = images.shape
    per_image = 4 * c * (h * w + size * size + max(h, size) * max(w, size))  # float32 bytes at the peak
    chunk = max(1, min(n, RESIZE_BUFFER // per_image))
    out = allocate_images(n, c, size, f"{what}: resizing {n:,} images to {size}x{size}", extra=chunk * per_image)
    for start in range(0, n, chunk):
        resized = F.interpolate(images[start:start + chunk].float(), size=(size, size), mode="bilinear",
                                antialias=True, align_corners=False)
        out[start:start + chunk] = resized.round_().clamp_(0, 255)  # converted straight into the uint8 result
    return out


# ---------------------------------------------------------------------------------------------------------------
# In-memory sets, batches and augmentation

@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W): on the training device, or in pinned CPU memory where it has no room
    labels: torch.Tensor  # int64 (N,), on the training device
    mean: torch.Tensor    # float32 (C,), per channel, in [0, 1] pixel units
    std: torch.Tensor     # float32 (C,)
    policy: Callable[[torch.Tensor], torch.Tensor] | None = None  # training's per-image augmentation (set_policy)
    seed: int = 0                                                  # ...drawn from (seed, epoch, image)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    shard_counts = None  # (in memory: no shards to read in order; see stream.StreamSet.shard_counts)

    def batch(self, idx: torch.Tensor, crop_flip: torch.Tensor | None = None, pad: int = PAD,
              jitter: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized float images and labels for the samples `idx`: through the policy first in training (epoch >=
        1), then cropped and flipped where crop_flip is given, brightness and contrast jittered where `jitter`
        (epoch_plan's factors) is given."""
        drawn, idx = idx, idx.to(self.device) % len(self)  # (drawn: a repeat's number, see balanced_order)
        x = self.images.index_select(0, idx.to(self.images.device))  # several times faster than images[idx] on CPU
        if epoch and self.policy is not None:
            x = apply_policy(x, drawn, self.seed, epoch, self.policy)
        if x.device != self.device:  # (held in pinned memory: the batch moves now, while the GPU works)
            x = x.pin_memory().to(self.device, non_blocking=True)
        return to_input(x, self.mean, self.std, crop_flip, pad, jitter), self.labels.index_select(0, idx)

    def batches(self, idx: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation: normalized images and labels of the images `idx`, `batch_size` at a time."""
        for part in idx.split(batch_size):
            yield self.batch(part)

    def indexed_batches(self, idx: torch.Tensor,
                        batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """batches(), with the indices of the images each batch holds (all of them, here)."""
        for part in idx.split(batch_size):
            yield *self.batch(part), part

    def steps(self, parts: list[Sequence[torch.Tensor]], epoch: int, augment: bool, pad: int,
              channels_last: bool, partnered: bool = False) -> Iterator["MicroBatches"]:
        """Training: the micro-batches of each optimizer step (see MicroBatches); `epoch` is in the plan already.
        (partnered: each part's first row is its mixing partner (trainer.micro_parts): read as any other here.)"""
        for step in parts:
            yield MicroBatches(self, step, augment, pad, channels_last, epoch)

    def set_policy(self, policy: Callable[[torch.Tensor], torch.Tensor] | None, seed: int) -> None:
        """Training images go through `policy` (augment.image_policy) one by one, each with the draws of (seed,
        epoch, image), before the batch's crops, flips and jitter."""
        self.policy, self.seed = policy, seed

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The images `idx`, uint8, as they are held."""
        return self.images[idx.to(self.images.device)]

    def sample(self, n: int) -> torch.Tensor:
        """The first n images (all, if fewer), uint8."""
        return self.images[:n]

    def fingerprint(self) -> str:
        """A short hash of the set's labels and of up to 4,096 of its images (evenly spaced): what tells --resume
        that it trains on the run's own data, whatever normalization the run uses. Cheap: a few MB hashed."""
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.labels.cpu().numpy().tobytes())
        h.update(self.images[::max(1, len(self) // 4096)].cpu().numpy().tobytes())
        return h.hexdigest()


class MicroBatches(Sequence):
    """The micro-batches (x, y) of one optimizer step, each made (cropped, flipped, normalized) only when it is read.
    `parts`: the step's rows of the epoch plan, one tensor per micro-batch."""

    def __init__(self, data: ImageSet, parts: Sequence[torch.Tensor], augment: bool, pad: int, channels_last: bool,
                 epoch: int = 0):
        self.data, self.parts, self.augment, self.pad, self.channels_last = data, parts, augment, pad, channels_last
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = self.parts[i]  # rows: sample, dy, dx, flip (, brightness, contrast)
        x, y = self.data.batch(part[:, 0], part[:, 1:4] if self.augment else None, self.pad,
                               part[:, 4:] if part.shape[1] > 4 else None, self.epoch)
        return (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


Split = ImageSet | stream.StreamSet  # a split of a dataset, held in memory or streamed from disk


def split_train_val(images, labels, val_split: float, seed: int):
    """Hold out a seeded random `val_split` fraction of the training set for validation."""
    train, val = split_indices(labels, val_split, seed)
    return (images[train], labels[train]), (images[val], labels[val])


def epoch_plan(n: int, seed: int, epoch: int, device: torch.device | str = "cpu", pad: int = PAD,
               alternate_flips: bool = False, jitter: float = 0.0,
               balance: torch.Tensor | None = None, shards: torch.Tensor | None = None) -> torch.Tensor:
    """Every random choice of one epoch, from (seed, epoch) alone: an (n, 4) int64 tensor whose rows are
    (sample index, crop offset y, crop offset x, flip 0/1), in the order the samples are visited; offsets are
    in [0, 2 * pad]. alternate_flips: each image is flipped in every other epoch (a random half in epoch 1, the
    other half in epoch 2, ...), so consecutive epochs always show both sides of it; short runs gain from that.
    jitter > 0 adds two columns: each image's brightness and contrast factors, drawn in [1 - jitter, 1 + jitter],
    in units of 1/JITTER_UNIT (drawn last, so that the other columns are those of a plan without jitter).
    balance: the n images' labels, for an epoch drawn class-balanced (balanced_order) instead of each image once.
    shards: the images' shards' sizes (tar shards, read front to back): the order is mixed_order's."""
    g = torch.Generator().manual_seed(seed * 10_000 + epoch)  # distinct per epoch for runs under 10,000 epochs
    if balance is not None:
        order = balanced_order(balance.cpu(), g)
    elif shards is not None:
        order = mixed_order(shards, g)
    else:
        order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    if alternate_flips:
        first = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))  # epoch 1's, per image
        flips = (first[order % n] ^ (epoch + 1) % 2)[:, None]  # (a repeat i + r x n is image i)
    else:
        flips = torch.randint(0, 2, (n, 1), generator=g)
    columns = [order[:, None], offsets, flips]
    if jitter > 0:
        columns.append(((1 + jitter * (2 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 1)) * JITTER_UNIT)
                       .round().long())
    return torch.cat(columns, 1).to(device)


def mixed_order(counts: torch.Tensor, g: torch.Generator, open_shards: int = OPEN_SHARDS) -> torch.Tensor:
    """An epoch's order of the images of tar shards that hold `counts` images each (shard after shard), each shard
    read front to back once: the shards in a random order, dealt in turn to `open_shards` streams, and the streams'
    images interleaved at random (each stream's place drawn uniformly among the epoch's positions), so that about
    `open_shards` shards are being read at any time and each batch mixes their images. From `g` alone: the same
    order for any number of workers or processes."""
    starts = torch.cumsum(counts, 0) - counts
    order = torch.randperm(len(counts), generator=g)
    dealt = [order[k::open_shards] for k in range(min(open_shards, len(counts)))]
    within = [torch.cat([torch.arange(starts[s], starts[s] + counts[s]) for s in group.tolist()])
              for group in dealt]
    turn = torch.repeat_interleave(torch.arange(len(within)), torch.tensor([len(w) for w in within]))
    turn = turn[torch.randperm(len(turn), generator=g)]  # whose image each position of the epoch is
    mixed = torch.empty(len(turn), dtype=torch.int64)
    mixed[torch.argsort(turn, stable=True)] = torch.cat(within)  # each stream's images in its own order
    return mixed


def balanced_order(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An epoch of len(labels) image indices drawn class-balanced (--balanced-sampler): each class present gets an
    equal share (the remainder to classes drawn at random, one image more each), its images in a random order, a
    class with fewer than its share gone through again in a new order as often as needed (a rare class's images
    repeat within the epoch, a common class's are a random part of them); then the whole epoch is shuffled.
    The r-th repeat of image i is written i + r x n (n = len(labels)): the sets read image i (mod n), and its
    per-image draws (the policy, the photo recipe's crop), seeded by that number, are its own."""
    classes = labels.unique()
    share = torch.full((len(classes),), len(labels) // len(classes))
    share[torch.randperm(len(classes), generator=g)[:len(labels) % len(classes)]] += 1
    picks = []
    for c, k in zip(classes.tolist(), share.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        rounds = -(-k // len(members))
        picks += [members[torch.randperm(len(members), generator=g)] + r * len(labels) for r in range(rounds)]
        picks[-1] = picks[-1][:len(picks[-1]) - (rounds * len(members) - k)]
    order = torch.cat(picks)
    return order[torch.randperm(len(order), generator=g)]


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """--class-weights balanced: each class's weight in the loss inversely proportional to its number of training
    images, n / (classes x count): scikit-learn's "balanced", which is also the normalization that makes the weights
    average 1 over the training images (so the loss keeps its scale, and the lr its meaning). A class without
    training images gets weight 0 (it has no loss term to weigh)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    present = int((counts > 0).sum())
    return torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), 0.0).float()


def images_per_epoch(n: int, step_images: int, batch_size: int, world: int) -> int:
    """How many of `n` images an epoch of a model with BatchNorm trains on: all of them, unless the epoch's last,
    short step would give some process a micro-batch of a single image, which BatchNorm cannot normalize in
    training; then that last step is left out of the epoch (other images each epoch: the order is shuffled)."""
    rest = n % step_images
    shares = torch.arange(rest).tensor_split(world)
    sizes = [len(part) for share in shares for part in share.tensor_split(max(1, math.ceil(rest / batch_size)))]
    return n - rest if 1 in sizes else n


# Below this many validation images per class, the best epoch (best.pth, early stopping) is picked on noise
MIN_VAL_PER_CLASS = 10


def warn_small_split(val_split: float, val_labels: torch.Tensor, classes: list[str], name: str) -> None:
    """One warning line when --val-split holds out fewer than MIN_VAL_PER_CLASS images of some class (the one with
    the fewest named), with the ways forward."""
    counts = torch.bincount(val_labels.cpu(), minlength=len(classes))
    fewest = int(counts.argmin())
    if len(val_labels) and counts[fewest] < MIN_VAL_PER_CLASS:
        folder = "a val/ folder next to train/, " if name == "imagefolder" else ""
        print0(f"warning: --val-split {val_split} holds out {len(val_labels)} images for {len(classes)} classes, "
               f"{int(counts[fewest])} of class {cli.printable(classes[fewest])}: too few to pick the best epoch by; "
               f"give {folder}a larger --val-split, or --val-split 0 with a fixed --epochs", file=sys.stderr,
               flush=True)


def prepare(name: str, data_dir: str | Path, val_split: float, seed: int, device: torch.device | str,
            image_size: int | None = None, stats: tuple[list[float], list[float]] | None = None,
            max_pixels: int = MAX_IMAGE_PIXELS, prep: Prep = SQUASH, workers: int | None = None):
    """Load a dataset, hold out validation (imagefolder: DATA_DIR/val/ when it exists, instead of val_split),
    resize to image_size (None: the dataset's own size), and compute normalization from the training part (before
    resizing: the same statistics, from fewer pixels) unless `stats` (mean, std) gives it: a pretrained net's own,
    averaged over RGB for 1-channel images. Returns (train, val or None, test, classes) as ImageSets on `device`,
    or, for an image folder streamed from disk (stream.streams: the photo recipe, --workers, or too large to hold),
    as stream.StreamSets."""
    device = torch.device(device)
    if name == "shards":  # always streamed: read front to back, never whole
        return prepare_shards(str(data_dir), val_split, seed, device, image_size or 32, stats, max_pixels, prep,
                              stream.default_workers() if workers is None else workers)
    if name == "imagefolder":  # listed once, then streamed or decoded into memory
        root, size = Path(data_dir), image_size or 32
        classes = imagefolder_classes(root)
        listing = {split: split_listing(root, split, classes) for split in ("train", "val", "test")
                   if split != "val" or (root / "val").is_dir()}  # (the user's own val/ beats a random split)
        workers = stream.streams(root, size, prep, workers, sum(len(labels) for _, labels in listing.values()))
        if workers is not None:
            return prepare_streamed(root, listing, classes, val_split, seed, device, size, stats, max_pixels, prep,
                                    workers)
        (train_x, train_y), (test_x, test_y) = (load_imagefolder_split(root, split, classes, size, max_pixels,
                                                                       listing=listing[split])
                                                for split in ("train", "test"))
    else:
        train_x, train_y, test_x, test_y, classes = load_raw(name, data_dir, image_size, max_pixels)
    if name == "imagefolder" and "val" in listing:
        val_x, val_y = load_imagefolder_split(root, "val", classes, size, max_pixels, listing=listing["val"])
    else:
        check_memory(train_x.nbytes, f"{name}: holding out --val-split {val_split} of {len(train_y):,} training "
                                     f"images (a copy)")
        train, val = split_indices(train_y, val_split, seed)
        (train_x, train_y), (val_x, val_y) = (train_x[train], train_y[train]), (train_x[val], train_y[val])
        warn_small_split(val_split, val_y, classes, name)
    if stats is None and name == "imagefolder":  # (the streamed path's very images: stream.stats_sample)
        stats = channel_stats(train_x[stream.stats_sample(len(train_x), image_size or 32, seed)])
    mean, std = (torch.tensor(s, dtype=torch.float32, device=device)
                 for s in (gray_stats(stats, train_x.shape[1]) or channel_stats(train_x)))

    def on_device(x, y, split):
        return ImageSet(place(resize_images(x, image_size, f"{name} {split}"), device), y.to(device), mean, std)
    val = on_device(val_x, val_y, "val") if len(val_y) else None
    return on_device(train_x, train_y, "train"), val, on_device(test_x, test_y, "test"), classes


def prepare_streamed(root: Path, listing: dict[str, tuple[np.ndarray, torch.Tensor]], classes: list[str],
                     val_split: float, seed: int, device: torch.device, size: int,
                     stats: tuple[list[float], list[float]] | None, max_pixels: int, prep: Prep,
                     workers: int) -> tuple[stream.StreamSet, stream.StreamSet | None, stream.StreamSet, list[str]]:
    """prepare for an image folder streamed from disk, from its `listing` (split: folders.split_listing; its train
    entry is replaced by the training part): (train, val or None, test, classes) as StreamSets, validation held out
    the same way (the same images as in memory), and normalization from stream.stats_sample's training images (in
    evaluation's shape) unless `stats` gives it."""
    for split, (_, labels) in listing.items():
        require_each_class(labels, root / split, classes)
    if "val" not in listing:  # (the user's own val/ beats a random split)
        names, labels = listing.pop("train")  # (popped: the caller's listing holds no second copy of the names)
        train, val = split_indices(labels, val_split, seed)
        listing["train"], listing["val"] = (names[train.numpy()], labels[train]), (names[val.numpy()], labels[val])
        del names, labels
        warn_small_split(val_split, listing["val"][1], classes, "imagefolder")
    sets = {split: stream.stream_set(root, names, labels, size, max_pixels, prep, seed, device, workers) if len(labels)
            else None for split, (names, labels) in listing.items()}
    return normalized(sets, classes, stats, size, seed, device)


def prepare_shards(spec: str, val_split: float, seed: int, device: torch.device, size: int,
                   stats: tuple[list[float], list[float]] | None, max_pixels: int, prep: Prep,
                   workers: int) -> tuple[stream.StreamSet, stream.StreamSet | None, stream.StreamSet, list[str]]:
    """prepare for tar shards (--dataset shards, shards.py): (train, val or None, test, classes) as StreamSets read
    by `workers` processes, validation from the val shards or held out of the training shards (the same stratified
    split as a folder's), normalization as an image folder's."""
    tables, classes = tarshards.load(spec)
    if "val" not in tables:
        train, val = split_indices(torch.from_numpy(tables["train"].labels), val_split, seed)
        tables["train"], tables["val"] = tables["train"].subset(train.numpy()), tables["train"].subset(val.numpy())
        warn_small_split(val_split, torch.from_numpy(tables["val"].labels), classes, "shards")
    sets = {split: stream.shard_set(t, size, max_pixels, prep, seed, device, workers) if len(t) else None
            for split, t in tables.items()}
    if sets["train"] is None or sets["test"] is None:
        raise DataError(f"shards: {spec} has no {'training' if sets['train'] is None else 'test'} images")
    return normalized(sets, classes, stats, size, seed, device)


def normalized(sets: dict[str, stream.StreamSet | None], classes: list[str],
               stats: tuple[list[float], list[float]] | None, size: int, seed: int,
               device: torch.device) -> tuple[stream.StreamSet, stream.StreamSet | None, stream.StreamSet, list[str]]:
    """The streamed splits as prepare returns them, each normalized with `stats`, or without it with the training
    images stream.stats_sample picks, in evaluation's shape. They are read in index order (each shard front to
    back; channel_stats's sums are exact, so the order does not change them)."""
    if stats is None:
        sample = stream.stats_sample(len(sets["train"]), size, seed).sort().values
        stats = channel_stats(sets["train"].take(sample).cpu())
    mean, std = (torch.tensor(s, dtype=torch.float32, device=device) for s in stats)
    for data in filter(None, sets.values()):
        data.mean, data.std = mean, std
    return sets["train"], sets["val"], sets["test"], classes


def gray_stats(stats: tuple[list[float], list[float]] | None, channels: int):
    """A pretrained net's (mean, std) for `channels`-channel images: averaged over RGB for grayscale ones."""
    return tuple([sum(s) / len(s)] for s in stats) if stats is not None and channels == 1 else stats


def split_indices(labels: torch.Tensor, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and validation indices of the images of `labels`, both in a seeded random order: a `val_split`
    fraction held out, stratified: each class's share (rounded so that the total is the whole set's share, as
    many as an unstratified split holds out), and at least one image of each class that has two or more (a class
    of one image trains on it). A class 10x rarer than the others is not left to chance: a random split of 123
    images once gave one class 4 of them."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * val_split)
    if val_split > 0 and n_val < MIN_IMAGES["val"]:
        raise DataError(f"--val-split {val_split} of the {n} training images holds out none; give a larger "
                        f"--val-split, or 0 for no validation")
    if n - n_val < MIN_IMAGES["train"]:
        raise DataError(f"--val-split {val_split} of the {n} training images leaves {n - n_val} to train on; "
                        f"it needs at least {MIN_IMAGES['train']}: give a smaller --val-split")
    if n_val == 0:
        return order, order[:0]
    shuffled = labels.cpu()[order]
    counts = torch.bincount(shuffled)
    share = counts.double() * val_split
    held = share.floor().long()
    rest = n_val - int(held.sum())  # (the largest remainders get one more: the total is n_val)
    held[torch.argsort(share - held, descending=True, stable=True)[:rest]] += 1
    held = torch.where(counts >= 2, held.clamp(1, None), held).minimum((counts - 1).clamp(0, None))
    by_class = torch.argsort(shuffled, stable=True)  # each image's place among its class's, in the random order
    place_in_class = torch.empty(n, dtype=torch.int64)
    place_in_class[by_class] = torch.arange(n) - (counts.cumsum(0) - counts)[shuffled[by_class]]
    in_val = place_in_class < held[shuffled]
    return order[~in_val], order[in_val]


def place(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images on the training device when it has room for them (half its free memory), else in pinned CPU
    memory, from where each batch moves as it is made (ImageSet.batch)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if images.nbytes > free // 2:
            print(f"{images.nbytes / 2**30:,.1f} GiB of images stay in pinned CPU memory ({free / 2**30:,.1f} GiB "
                  f"free on {device}); each batch moves to it as it is made", file=sys.stderr)
            return images.pin_memory()
    return images.to(device)
