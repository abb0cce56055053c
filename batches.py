"""A batch of uint8 images made into the model's input, on whole batches on the training device: cropped and
flipped (epoch_plan's draws), brightness and contrast jittered, normalized; and the normalization's statistics
(channel_stats). Both data paths make their batches here (data.ImageSet in memory, stream.StreamSet from disk), and
predict.py normalizes as they do.
"""
import math

import torch
import torch.nn.functional as F

MIN_STD = 1 / 255  # one pixel level: the smallest std a channel is normalized by
JITTER_UNIT = 2**16  # epoch_plan's jitter factors are integers in units of 1/65536
PAD = 4  # random-crop padding, pixels (default)


def to_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, crop_flip: torch.Tensor | None = None,
             pad: int = PAD, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 batch (N, C, H, W) as the model takes it: cropped and flipped where crop_flip (epoch_plan's rows) is
    given, jittered where `jitter` is, then normalized. Both data paths make their batches here."""
    if crop_flip is not None:
        x = random_crop_flip(x, crop_flip, pad)
    if jitter is not None:
        x = color_jitter(x, jitter)
    return normalize(x, mean, std)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float (pixel / 255 - mean) / std per channel: what every model here takes.
    (Float images in [0, 255], color_jitter's, are normalized in place.)"""
    return images.float().div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])


def random_crop_flip(x: torch.Tensor, crop_flip: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Crop each image of x (N, C, H, W) at its own offset (dy, dx) from a copy padded by `pad` mirrored
    pixels on each side, and mirror those with flip = 1: one gather for the whole batch, no per-image Python."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(n, c, (h + 2 * pad) * (w + 2 * pad))
    arange_w = torch.arange(w, device=x.device)
    rows = crop_flip[:, 0:1] + torch.arange(h, device=x.device)                               # (N, H)
    flip = crop_flip[:, 2:3].bool()
    cols = crop_flip[:, 1:2] + torch.where(flip, arange_w.flip(0), arange_w)                 # (N, W)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, flat).view(n, c, h, w)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast, per image of the uint8 batch x (N, C, H, W), as float pixels in [0, 255]: x * b,
    then (x - its mean) * c + its mean (the mean over the image's pixels and channels), clipped; `factors`: (N, 2)
    integer (b, c) in units of 1/JITTER_UNIT, from epoch_plan. Whole-batch tensor operations, no per-image Python."""
    b, c = (factors.to(torch.float32) / JITTER_UNIT).view(-1, 2, 1, 1, 1).unbind(1)
    f = x.float().mul_(b)
    mean = f.mean((1, 2, 3), keepdim=True)
    return f.sub_(mean).mul_(c).add_(mean).clamp_(0, 255)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (n - 1) of uint8 images, in [0, 1] units, the std at least MIN_STD (a channel
    that is the same in every image, such as green in a set of red and blue ones, normalizes to 0, not 0 / 0).
    Counted from a histogram of the 256 pixel values per channel, a few thousand images at a time: the sums are
    exact integers, and no float copy of the set is made (CIFAR-10's would be 1.2 GB in float64)."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.int64)
    for chunk in images.split(4096):
        for c in range(images.shape[1]):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    means, stds = [], []
    for hist in counts.tolist():  # Python ints from here on: exact, whatever the pixel count
        n = sum(hist)
        s1 = sum(v * k for v, k in enumerate(hist))
        s2 = sum(v * v * k for v, k in enumerate(hist))
        means.append(s1 / (255 * n))
        std = math.sqrt((n * s2 - s1 * s1) / (n * (n - 1) * 255 * 255)) if n > 1 else math.nan
        stds.append(max(std, MIN_STD) if n > 1 else std)
    return means, stds
