"""The modern recipe's augmentation: policies drawn image by image (--auto-augment, --random-erase: torchvision's
transforms.v2, each image's draws from (seed, epoch, image)), and mixup and cutmix drawn step by step (--mixup-alpha,
--cutmix-alpha: torchvision's meaning, each step's draw from (seed, epoch, step)). No draw comes from the run's own
random state, so a resumed run makes the very draws it would have made (docs/data.md: augmentation).
"""
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

POLICIES = ("ta_wide", "ra", "augmix", "imagenet")
MAGNITUDES = {"ra": (9, 0, 30), "augmix": (3, 1, 10)}  # the policies that take one: (default, lowest, highest)


def image_policy(auto_augment: str | None, magnitude: int | None, random_erase: float,
                 mean: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transform each training image of uint8 (C, H, W) goes through, or None for none: the --auto-augment policy
    (torchvision's reference recipe's: bilinear, RandAugment with 2 operations), then random erasing with
    probability `random_erase` (torchvision's scale and ratio), the erased pixels set to the dataset's mean colour
    (`mean`, per channel in [0, 1]): what the reference recipe's erasing of the normalized image with 0 gives."""
    if auto_augment is None and not random_erase:
        return None
    from torchvision.transforms import InterpolationMode, v2  # (here: torchvision takes ~0.5 s to import)
    steps = []
    if auto_augment is not None:
        bilinear = InterpolationMode.BILINEAR
        default = MAGNITUDES.get(auto_augment, (None,))[0]
        strength = default if magnitude is None else magnitude
        steps.append({"ta_wide": lambda: v2.TrivialAugmentWide(interpolation=bilinear),
                      "ra": lambda: v2.RandAugment(interpolation=bilinear, magnitude=strength),
                      "augmix": lambda: v2.AugMix(interpolation=bilinear, severity=strength),
                      "imagenet": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear),
                      }[auto_augment]())
    if random_erase:
        steps.append(v2.RandomErasing(p=random_erase, value=[round(255 * m) for m in mean]))
    return v2.Compose(steps)


@contextmanager
def seeded(seed: int, epoch: int, index: int) -> Iterator[None]:
    """torch's global generator seeded from (seed, epoch, image index) for one image's random draws. In the main
    process (--workers 0) its state is put back afterwards, so the run's own draws (dropout) do not move."""
    state = torch.get_rng_state() if get_worker_info() is None else None
    key = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    torch.default_generator.manual_seed(int.from_bytes(key, "little") >> 1)  # (the CPU's alone: CUDA's is the run's)
    try:
        yield
    finally:
        if state is not None:
            torch.set_rng_state(state)


def apply_policy(images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int,
                 policy: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The in-memory path's policy: each uint8 image of the batch (N, C, H, W) through `policy` on its own, its draws
    from (seed, epoch, its index `indices`) (seeded, which puts the run's random state back after), on the
    CPU: what a DataLoader worker does for a streamed image (stream.FolderFiles), so both paths draw alike."""
    out = torch.empty_like(images, device="cpu")
    for k, (image, i) in enumerate(zip(images.cpu(), indices.tolist())):
        with seeded(seed, epoch, i):
            out[k] = policy(image)
    return out.to(images.device)


# ---------------------------------------------------------------------------------------------------------------
# Mixup and cutmix: one of them per optimizer step

@dataclass(frozen=True)
class Mix:
    """--mixup-alpha and --cutmix-alpha (0 = off) as torchvision.transforms.v2's MixUp and CutMix mean them: each
    image blended with (mixup), or a box of it replaced by (cutmix), the previous image of the optimizer step (the
    step's images rolled by one, over all its micro-batches and processes: trainer.micro_parts), lam ~ Beta(alpha,
    alpha) of its own, and its one-hot target mixed in the same proportion. With both, each step takes one of the
    two, at even odds."""
    mixup_alpha: float
    cutmix_alpha: float
    num_classes: int
    seed: int

    def draw(self, epoch: int, step: int, height: int, width: int) -> tuple[float, tuple[int, int, int, int] | None]:
        """Step `step` of epoch `epoch`'s lam and cutmix box (y1, y2, x1, x2), or None for mixup; from (seed, epoch,
        step) alone, with numpy's generator (torch's Beta sampling takes no generator)."""
        key = hashlib.blake2b(f"mix,{self.seed},{epoch},{step}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(key, "little"))
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < 0.5)
        lam = float(rng.beta(*[self.cutmix_alpha if cutmix else self.mixup_alpha] * 2))
        if not cutmix:
            return lam, None
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        r = 0.5 * math.sqrt(1 - lam)  # torchvision's box: sides sqrt(1 - lam) of the image's, clipped at its edges
        half_h, half_w = int(r * height), int(r * width)
        return lam, (max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lam: float,
                 box: tuple[int, int, int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch (x, class indices y) whose first image is the partner of the second (micro_parts), mixed
        as drawn, each image with the one before it: (x[1:] mixed, targets (N - 1, num_classes) that sum to 1)."""
        targets = F.one_hot(y, self.num_classes).float()
        mixed = x[1:].clone()  # (keeps x's memory layout: channels_last stays so)
        if box is None:
            mixed.mul_(lam).add_(x[:-1], alpha=1 - lam)
        else:
            y1, y2, x1, x2 = box
            mixed[..., y1:y2, x1:x2] = x[:-1, ..., y1:y2, x1:x2]
            lam = 1 - (y2 - y1) * (x2 - x1) / (x.shape[-2] * x.shape[-1])  # the share of the image left as it was
        return mixed, targets[:-1] * (1 - lam) + targets[1:] * lam


class MixedBatches(Sequence):
    """An optimizer step's micro-batches, each mixed (Mix) with the step's one draw when it is read."""

    def __init__(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], mix: Mix, epoch: int, step: int):
        self.micro_batches, self.mix, self.epoch, self.step = micro_batches, mix, epoch, step

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.micro_batches[i]
        if len(x) == 0:  # (an empty share at the end of an epoch)
            return x, F.one_hot(y, self.mix.num_classes).float()
        return self.mix(x, y, *self.mix.draw(self.epoch, self.step, x.shape[-2], x.shape[-1]))
