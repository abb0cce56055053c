"""Models, the name -> class registry, and evaluate(): loss, accuracy and confusion matrix over a dataset.

Every model takes a normalized float batch (N, C, H, W) and returns logits (N, num_classes).
`build_model(name, ...)` is the one way scripts make a model, so a checkpoint, which stores the
name and the shape arguments, is enough to rebuild it (checkpoint.model_from_checkpoint). Besides our own models
(MODELS), any torchvision classification model is built by its torchvision name, with its classifier sized for
the classes and its first convolution for the input channels.
"""
import difflib
import math
import urllib.parse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
import runtime
from formats import DataError
from torchfiles import oversized_tensor


class SimpleCNN(nn.Module):
    """The seed guide's LeNet-style net: 62,006 parameters for 3x32x32 input and 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size - 4) // 2 - 4) // 2  # two (conv k5, no padding; maxpool 2) stages
        if side < 1:
            raise ValueError(f"SimpleCNN needs images of at least 16x16 pixels, got {image_size}")
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv -> (2x2 max-pool) -> BatchNorm -> GELU. Pooling before the norm and activation does
    them on a quarter of the pixels."""
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]  # BatchNorm's shift makes a bias redundant
    layers += [nn.MaxPool2d(2)] if pool else []
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out), nn.GELU())


class Residual(nn.Module):
    """x + f(x): the identity path lets gradients skip f, so the net trains fast from the first step."""

    def __init__(self, channels: int):
        super().__init__()
        self.f = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class ResNet9(nn.Module):
    """The small residual net of the fast CIFAR-10 recipes (Page's DAWNBench ResNet-9): four stages of
    widths (a, b, c, d), three poolings, two residual blocks, a global max-pool and one linear layer.
    (64, 128, 256, 512) is the original (6.6M parameters); (16, 32, 64, 128) is 16x cheaper (0.41M)."""

    DEFAULT_WIDTHS = (64, 128, 256, 512)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 widths: tuple[int, int, int, int] = DEFAULT_WIDTHS):
        super().__init__()
        self.widths = list(widths)  # kept, so a checkpoint can record them
        a, b, c, d = widths
        self.features = nn.Sequential(
            conv_bn(in_channels, a),
            conv_bn(a, b, pool=True), Residual(b),   # 32x32 -> 16x16
            conv_bn(b, c, pool=True),                # -> 8x8
            conv_bn(c, d, pool=True), Residual(d),   # -> 4x4
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(d, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the logits down keeps the initial softmax soft; the original recipe uses 1/8.
        return self.head(self.features(x)) * 0.125


def conv_group(c_in: int, c_out: int) -> nn.Sequential:
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU: one stage of AirNet, halving the image side."""
    convs = [nn.Conv2d(c, c_out, 3, padding=1, bias=False) for c in (c_in, c_out)]
    norms = [nn.BatchNorm2d(c_out, momentum=0.4) for _ in range(2)]  # short runs: let the statistics follow fast
    with torch.no_grad():
        for conv in convs:  # identity on the first channels: each conv starts as a pass-through, like a residual
            nn.init.dirac_(conv.weight[:conv.in_channels])
        for norm in norms:  # scale fixed at 1: only the shift learns, which is all a GELU threshold needs
            norm.weight.requires_grad_(False)
    return nn.Sequential(convs[0], nn.MaxPool2d(2), norms[0], nn.GELU(), convs[1], norms[1], nn.GELU())


class AirNet(nn.Module):
    """The net of Keller Jordan's airbench CIFAR-10 speed runs, for short training on small images: a frozen
    2x2 'whitening' conv set from the data, then three conv_group stages of widths (a, b, c), a global max-pool
    and one linear layer. The whitening conv makes the first steps count: every input direction starts at unit
    variance. (32, 192, 192) is 1.07M parameters and ~57M multiply-adds per 32x32 image, the work of airbench93's
    (64, 128, 128), spent where it buys more: a narrow first stage at full resolution, wide later ones."""

    DEFAULT_WIDTHS = (32, 192, 192)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 widths: tuple[int, int, int] = DEFAULT_WIDTHS):
        super().__init__()
        if image_size < 9:  # 2x2 conv, then three halvings must leave at least one pixel
            raise ValueError(f"AirNet needs images of at least 9x9 pixels, got {image_size}")
        self.widths = list(widths)
        a, b, c = widths
        patch_dims = in_channels * 2 * 2
        self.whiten = nn.Conv2d(in_channels, 2 * patch_dims, 2, bias=False)  # no padding: 32x32 -> 31x31
        # Fixed, set by init_whitening(): with nothing to learn below it, backward stops at the first conv_group,
        # and its input gradient (a 31x31 convolution) is never computed.
        self.whiten.requires_grad_(False)
        self.features = nn.Sequential(
            nn.GELU(), conv_group(2 * patch_dims, a), conv_group(a, b), conv_group(b, c),  # 31 -> 15 -> 7 -> 3
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.whiten(x))) / 9  # small logits at the start: a soft first softmax

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 1e-2) -> None:
        """Set the 2x2 conv to project each patch of `images` (normalized, N x C x H x W) onto the principal
        directions of all patches, scaled to unit variance; the negated copy lets the GELU pass both signs.
        eps is added to each variance first, so that directions with almost none (on JPEG-compressed images:
        fine colour detail, variance ~1e-4) are not blown up into loud noise; 1e-2 measured best (EXPERIMENTS.md)."""
        c = images.shape[1]
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)      # N, C, H-1, W-1, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4).double()
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.reshape(c * 4, c, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: what train.py validates and tests with, and evaluate.py reports

EVAL_BATCH = 256  # images per forward pass: any size gives the same counts; larger ones only take more memory
TTA_MODES = ("none", "mirror", "shifts")


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's float logits for batch x, averaged over test-time views. mirror: x and its mirror image.
    shifts: that, averaged with the same for x shifted one pixel up-left and one down-right (6 views)."""
    if tta == "shifts":
        h, w = x.shape[2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
        # the unshifted pair weighs half, the two shifted pairs a quarter each
        return (2 * tta_logits(model, x, "mirror") + sum(tta_logits(model, v, "mirror") for v in shifted)) / 4
    logits = model(x).float()
    return (logits + model(x.flip(3)).float()) / 2 if tta == "mirror" else logits


@torch.no_grad()
def evaluate(model: nn.Module, data, num_classes: int, batch_size: int = EVAL_BATCH,
             tta: str = "none") -> dict:
    """Mean cross-entropy, accuracy and top-5 accuracy (percent; top-5 only for more than 5 classes, else nan), the
    confusion matrix (rows = true class) and the class-balanced measures of confusion_metrics, over the images of
    `data` that could be read (all, held in memory; "skipped": how many streamed files could not be, else 0),
    with the test-time views of `tta` (see tta_logits); `data` is a data.Split. Under torchrun each process
    takes every world_size-th image and the sums are added up across processes, so every image counts once."""
    model.eval()
    device = data.device
    rank, world = runtime.rank_world()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in data.batches(torch.arange(rank, len(data), world), batch_size):
        logits = tta_logits(model, x, tta)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
        if num_classes > 5:
            top5 += (logits.topk(5).indices == y[:, None]).any(1).sum()
    if world > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
        dist.all_reduce(top5)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = confusion.sum().item()  # the images read: a streamed file that cannot be read was skipped (and warned)
    if n == 0 and len(data):
        raise DataError(f"none of the {len(data):,} images could be read (each unreadable file was named above)")
    n = max(n, 1)
    return {"loss": loss_sum.item() / n, "accuracy": 100.0 * confusion.diag().sum().item() / n,
            "top5": 100.0 * top5.item() / n if num_classes > 5 else math.nan, "confusion": confusion,
            "skipped": len(data) - confusion.sum().item(), **confusion_metrics(confusion)}


MEASURES = ("balanced_accuracy", "macro_precision", "macro_recall", "macro_f1")  # confusion_metrics' keys


def as_decimal(x: float) -> float:
    """`x` to 12 significant digits: a measure made of counts prints as the decimal it is (80.2, not the
    80.19999999999999 of float arithmetic's last bits), and no difference a test set can make is lost."""
    return float(f"{x:.12g}")


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """The measures that weigh every class alike, in percent, from a confusion matrix (rows = true class), as
    scikit-learn computes them: balanced accuracy, the mean recall over the classes that have images; macro
    precision, recall and F1, the means over the classes that have images or predictions (a class never predicted
    has precision 0, one with precision and recall 0 has F1 0)."""
    c = confusion.double()
    tp, true, predicted = c.diag(), c.sum(1), c.sum(0)
    recall, precision = tp / true.clamp(min=1), tp / predicted.clamp(min=1)
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), 0.0)
    seen = (true > 0) | (predicted > 0)
    if not seen.any():
        return dict.fromkeys(MEASURES, math.nan)
    return {"balanced_accuracy": as_decimal(100 * recall[true > 0].mean().item()),
            "macro_precision": as_decimal(100 * precision[seen].mean().item()),
            "macro_recall": as_decimal(100 * recall[seen].mean().item()),
            "macro_f1": as_decimal(100 * f1[seen].mean().item())}


MODELS = {"simplecnn": SimpleCNN, "resnet9": ResNet9, "airnet": AirNet}
SIZED_BY_IMAGE = ("simplecnn",)  # weights whose shapes follow --image-size (SimpleCNN's fc1): they fit no other


def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                widths: tuple[int, ...] | None = None) -> nn.Module:
    """A model by name: ours (MODELS) or torchvision's. `widths` sets the channels of each stage (None: the model's
    defaults; torchvision models have none)."""
    check_model_name(name)
    stages = len(getattr(MODELS.get(name), "DEFAULT_WIDTHS", ()))
    if widths is not None and len(widths) != stages:
        raise ValueError(f"{name} takes {stages} widths, got {len(widths)}" if stages else f"{name} has no widths")
    if name not in MODELS:
        return build_torchvision(name, num_classes, in_channels)
    extra = {"widths": tuple(widths)} if widths is not None else {}
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **extra)


# ---------------------------------------------------------------------------------------------------------------
# torchvision's classification models (resnet18, mobilenet_v3_small, convnext_tiny, ...), by their torchvision name

# GoogLeNet and Inception v3 train with auxiliary classifiers that return extra outputs; here they are left out
# (a plain logits tensor, like every other model), and their pretrained weights' aux tensors with them. Their
# pretrained weights take pixels scaled to [-1, 1], which torchvision makes inside the model (transform_input) from
# ImageNet-normalized input; normalizing with mean = std = 0.5 gives them the same input, with no flag to remember.
TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
HALF_SCALED = ("googlenet", "inception_v3")


def torchvision_models() -> list[str]:
    """torchvision's classification models (not its detection, segmentation, video or quantized ones)."""
    import torchvision  # here: our own models do not need its import time
    return torchvision.models.list_models(module=torchvision.models)


def check_model_name(name: str) -> None:
    """ValueError, naming the closest names, for a model that is neither ours nor torchvision's."""
    if name in MODELS or name in torchvision_models():
        return
    close = difflib.get_close_matches(name, [*MODELS, *torchvision_models()], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (python train.py --list-models lists them all)")


def build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's `name` with `num_classes` outputs and its own initialization, its first convolution taking
    `in_channels` (see fit_first_conv)."""
    from torchvision.models import get_model
    model = get_model(name, num_classes=num_classes, **TORCHVISION_KWARGS.get(name, {}))
    fit_first_conv(model, in_channels)
    return model


def pretrained_weights(name: str):
    """torchvision's default weights for `name` (a WeightsEnum member: .url, .meta, .transforms()); ValueError for a
    model without any."""
    from torchvision.models import get_model_weights
    check_model_name(name)
    if name in MODELS:
        raise ValueError(f"--pretrained: {name} is one of this project's models, which have no pretrained weights; "
                         f"use --init-from a checkpoint of yours, or a torchvision model (resnet18, ...)")
    weights = getattr(get_model_weights(name), "DEFAULT", None)
    if weights is None:
        raise ValueError(f"--pretrained: torchvision has no pretrained weights for {name}")
    return weights


def pretrained_stats(name: str, weights) -> tuple[list[float], list[float]]:
    """The per-channel mean and std the pretrained `weights` of model `name` expect their input normalized with."""
    if name in HALF_SCALED:
        return [0.5] * 3, [0.5] * 3
    preprocess = weights.transforms()  # (ImageNet's mean and std, for nearly all of them)
    return list(preprocess.mean), list(preprocess.std)


def fit_first_conv(model: nn.Module, in_channels: int) -> None:
    """Make the first convolution take `in_channels` (1 for MNIST) instead of its own: each new filter is the mean of
    its RGB filters x 3 / in_channels, so a gray image gives the response the RGB filters give its gray copy (and a
    random initialization keeps its scale)."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device)
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight) * 3 / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    replace_module(model, name, new)


def find_head(model: nn.Module, num_classes: int) -> str:
    """The name of the classifier: the last linear layer (or 1x1 convolution, SqueezeNet's) with num_classes
    outputs. Found generically, so it is `fc` of a ResNet, `classifier.3` of a MobileNet, `heads.head` of a ViT."""
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
             or isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.out_channels == num_classes]
    if not heads:
        raise ValueError(f"cannot find the classifier of {type(model).__name__}: no layer with {num_classes} outputs")
    return heads[-1]


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> None:
    """A new, freshly initialized classifier with num_classes outputs in place of the one with old_classes."""
    name = find_head(model, old_classes)
    head = model.get_submodule(name)
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None, device=head.weight.device)
    else:
        new = nn.Conv2d(head.in_channels, num_classes, 1, bias=head.bias is not None, device=head.weight.device)
    replace_module(model, name, new)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ---------------------------------------------------------------------------------------------------------------
# Starting from learned weights: --pretrained (torchvision's) and --init-from (checkpoint.init_weights); a
# ValueError for anything the user can fix, which the scripts print as one line

def pretrained_start(name: str) -> dict:
    """What --pretrained starts `name` from: {"model": state_dict, "num_classes", "in_channels", "mean", "std",
    "source"}, the middle four those the weights were trained with."""
    weights = pretrained_weights(name)
    state = {k: v for k, v in torchvision_weights(weights).items() if not k.startswith(AUX_PREFIXES)}
    mean, std = pretrained_stats(name, weights)
    return {"model": state, "num_classes": len(weights.meta["categories"]), "in_channels": 3, "mean": mean,
            "std": std, "source": f"torchvision's {weights} (ImageNet)"}


def torchvision_weights(weights) -> dict:
    """The state_dict of torchvision `weights` (e.g. ResNet18_Weights.DEFAULT) from torch's cache,
    $TORCH_HOME/hub/checkpoints/<the file name of weights.url>, downloaded there first when it is missing. A file
    already there is used as it is; read with weights_only=True, like every checkpoint."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(weights.url).path).name
    if not path.is_file():
        match = torch.hub.HASH_REGEX.search(path.name)  # the file name's hash prefix: what torch.hub checks too
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None, progress=False)
        except Exception as e:  # no network, a proxy, a wrong checksum, a full disk: the same answer
            raise ValueError(f"the pretrained weights {weights} are not in torch's cache and the download failed "
                             f"({type(e).__name__}); put {path.name} (from {weights.url}) in {path.parent}/ "
                             f"(or set TORCH_HOME to a folder whose hub/checkpoints/ has it)") from None
    try:
        with cli.c_openable(path) as name:  # (a TORCH_HOME whose name is not UTF-8 too)
            state = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"cannot read the pretrained weights {path} ({type(e).__name__}); delete it to "
                         f"download it again") from None
    problem = oversized_tensor(state, path)
    if problem is not None:
        raise ValueError(problem)
    if not (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())):
        raise ValueError(f"{path} is not a state_dict of pretrained weights; delete it to download it again")
    return state


def model_from_start(name: str, widths: tuple[int, ...] | None, start: dict, source: str, num_classes: int,
                     in_channels: int, image_size: int) -> nn.Module:
    """The model with the weights it starts from (`source`: the flag that chose them, for messages), then fitted
    to this data: pretrained RGB filters to its channels, a new classifier where the number of classes differs."""
    trained_at = start.get("image_size")  # (--init-from's: --pretrained weights are sized by no image)
    if name in SIZED_BY_IMAGE and trained_at not in (None, image_size):
        raise ValueError(f"{source}: {name}'s weights fit the --image-size they were trained at ({trained_at}) "
                         f"alone, not {image_size}: give --image-size {trained_at}, or leave out --init-from")
    model = build_model(name, start["num_classes"], start["in_channels"], image_size, widths)
    try:
        model.load_state_dict(start["model"])
    except RuntimeError as e:  # torch spreads the details over several lines: keep them, on one
        raise ValueError(f"{source}: the weights do not fit {name} (another --widths?): "
                         f"{cli.one_line(e, 300)}") from None
    fit_first_conv(model, in_channels)
    if start["num_classes"] != num_classes:
        replace_head(model, start["num_classes"], num_classes)
    return model


def freeze_backbone(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Let only the classifier learn. Returns the other modules, which training keeps in eval mode, so that their
    BatchNorm statistics stay as loaded too (and their dropout is off: the features are fixed)."""
    head = find_head(model, num_classes)
    model.requires_grad_(False)
    model.get_submodule(head).requires_grad_(True)
    return [m for name, m in model.named_modules()
            if not (name == head or name.startswith(head + ".") or any(True for _ in m.children()))]


@torch.no_grad()
def check_image_size(model: nn.Module, name: str, x: torch.Tensor) -> None:
    """A torchvision model says at its first forward pass which image sizes it cannot take: try one image `x`."""
    model.eval()
    try:
        model(x)
    except Exception as e:  # a kernel larger than what is left of the image, a ViT's fixed size, ...
        size = "x".join(map(str, x.shape[1:]))
        raise ValueError(f"{name} cannot take {size} images ({str(e).splitlines()[0][:200]}); try a larger "
                         f"--image-size") from None
