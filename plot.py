"""Pictures of a run: loss and accuracy curves from its metrics.csv, and the confusion matrix.

    python plot.py runs/my-photos/metrics.csv                      # writes runs/my-photos/curves.png
    python plot.py runs/my-photos/metrics.csv --output curves.png

plot_confusion(confusion, classes, path) draws the confusion matrix of evaluate.py (evaluate.py --plot PATH),
plot_predictions test images with their labels (evaluate.py --show PATH), plot_lr_range the learning-rate range
test (train.py --find-lr); train.py draws curves.png with plot_curves at the end of every run.
matplotlib is optional (pip install matplotlib): it is imported only when a picture is drawn, so training and
evaluation run without it.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads: an early Ctrl-C exits quietly

import csv
import io
import logging
import math
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from decode import open_regular
from model import confusion_metrics

CURVES = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")  # the metrics.csv columns drawn
PICTURE_FORMATS = ("png", "svg", "pdf")  # what a picture's suffix may ask for (matplotlib's savefig formats)
OFF_SCALE = 1e6  # a loss or accuracy beyond this is drawn at the top of the rest (on_scale)


class PlotError(cli.UserError):
    """matplotlib missing, or a file that cannot be read or written."""


def require_matplotlib() -> type:
    """matplotlib's Figure class. Figure, not pyplot: no global figure state and no GUI backend to pick.
    Where matplotlib cannot write its settings and font cache folder (HOME read-only or missing), it logs raw lines
    as it imports and uses a temporary folder: that is said in one line of ours instead."""
    if sys.modules.get("matplotlib.figure") is not None:
        return sys.modules["matplotlib.figure"].Figure
    log = logging.getLogger("matplotlib")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        figure = cli.require("matplotlib.figure", "drawing")
        import matplotlib
        folders = {Path(matplotlib.get_configdir()), Path(matplotlib.get_cachedir())}
    finally:
        log.setLevel(level)
    if any(f.parent == Path(tempfile.gettempdir()) and f.name.startswith("matplotlib-") for f in folders):
        print("note: matplotlib cannot write its settings folder (is HOME writable?); it uses a temporary one, and "
              "builds its font cache again each run: set MPLCONFIGDIR to a writable folder to keep it",
              file=sys.stderr, flush=True)
    return figure.Figure


def read_metrics(path: Path) -> dict[str, list[float]]:
    """The CURVES columns of a metrics.csv written by train.py, as floats (a run without validation has nan). One
    saved by a spreadsheet is read too: a UTF-8 byte-order mark is skipped (utf-8-sig), CRLF line ends are lines."""
    try:  # (open_regular: a FIFO is refused, not waited on)
        with io.TextIOWrapper(open_regular(path, "metrics file"), newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []  # fieldnames reads the file: None when empty
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, csv.Error):
        raise PlotError(f"{path} is not a CSV file") from None
    missing = [c for c in CURVES if c not in columns]
    if missing:
        raise PlotError(f"{path} is not a metrics.csv of train.py (no {', '.join(missing)} column)")
    if not rows:
        raise PlotError(f"{path} has no epochs yet")
    try:
        return {c: [float(row[c]) for row in rows] for c in CURVES}
    except (TypeError, ValueError):  # a short row gives None, a mangled one a non-number
        raise PlotError(f"{path} has a row with a missing or non-numeric value") from None


def label(name: str, width: int | None = None) -> str:
    """A class name as matplotlib can draw it: bytes that are not UTF-8 escaped (cli.readable), `$` taken
    literally (not as the start of a formula), cut to `width` characters."""
    return cli.printable(name)[:width].replace("$", r"\$")


def plot_curves(metrics: dict[str, list[float]], path: str | Path, best: int | None = None) -> None:
    """Loss (left) and accuracy (right) per epoch, train and validation, to a picture (PNG, SVG or PDF, by the
    suffix); a dashed line marks the epoch of best.pth when there is validation: `best`, or else the lowest
    validation loss (train.py's default)."""
    fig = require_matplotlib()(figsize=(10, 4), layout="constrained")
    from matplotlib.ticker import MaxNLocator
    epochs = [int(e) if float(e).is_integer() else e for e in metrics["epoch"]]
    # best.pth's epoch, as train.py chooses it by default: the lowest validation loss (the first of equal ones);
    # none without validation
    val_losses = [(v, e) for v, e in zip(metrics["val_loss"], epochs) if not math.isnan(v)]
    if not val_losses:
        best = None
    elif best is None:
        best = min(val_losses, key=lambda pair: pair[0])[1]
    for ax, name, title in zip(fig.subplots(1, 2), ("loss", "acc"), ("loss (cross-entropy)", "accuracy (%)")):
        curves = {split: metrics[f"{split}_{name}"] for split in ("train", "val")}
        curves, top = on_scale(curves)
        for split, values in curves.items():
            if not all(math.isnan(v) for v in values):  # a run with --val-split 0 has no validation curve
                ax.plot(epochs, values, marker="o", label=split)
        if top is not None:
            title += f"\n(values beyond {OFF_SCALE:g} drawn at {top:.3g})"
        if best is not None:
            ax.axvline(best, color="tab:green", linestyle="--", linewidth=1, label=f"best.pth (epoch {best})")
        ax.set(title=title, xlabel="epoch", xlim=(epochs[0] - 0.5, epochs[-1] + 0.5) if len(epochs) < 3 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def on_scale(curves: dict[str, list[float]], limit: float = OFF_SCALE) -> tuple[dict[str, list[float]], float | None]:
    """Values beyond `limit` (a diverged loss, infinity, a mangled file) cannot share an axis with the rest
    (matplotlib cannot even place the ticks of 1e308): they are drawn at the top of the other values' range.
    Returns the curves and that top (None when every value was on the scale)."""
    values = [v for vs in curves.values() for v in vs if not math.isnan(v)]
    sane = [v for v in values if abs(v) <= limit]
    if len(sane) == len(values):
        return curves, None
    top = 1.1 * max(sane, default=1.0)
    low = min(sane, default=0.0)
    return {k: [v if math.isnan(v) or abs(v) <= limit else top if v > 0 else low for v in vs]
            for k, vs in curves.items()}, top


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: str | Path) -> None:
    """The confusion matrix (rows: true class, columns: predicted, as evaluate.py computes it) to a PNG: each cell
    colored by its share of the true class's images, so that rare classes read like common ones, and labelled
    with its count; the title gives the accuracy and the measures that weigh every class alike."""
    counts = torch.as_tensor(confusion, dtype=torch.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {tuple(counts.shape)} for {n} classes")
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(20, max(4, 0.45 * n + 2))  # inches: room for the labels, within a screen
    fig = require_matplotlib()(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    m = confusion_metrics(counts)
    title = (f"confusion matrix: accuracy {100 * counts.diag().sum().item() / max(1, counts.sum().item()):.1f}%, "
             f"balanced {m['balanced_accuracy']:.1f}%\nmacro precision {m['macro_precision']:.1f}%, recall "
             f"{m['macro_recall']:.1f}%, F1 {m['macro_f1']:.1f}%")
    ax.set(title=title, xlabel="predicted class", ylabel="true class", xticks=range(n), yticks=range(n))
    ax.set_xticklabels([label(c) for c in classes], rotation=45, ha="right")
    ax.set_yticklabels([label(c) for c in classes])
    if n <= 30:  # beyond that the numbers would be too small to read
        for i, (count_row, share_row) in enumerate(zip(counts.tolist(), share.tolist())):
            for j, (count, fraction) in enumerate(zip(count_row, share_row)):
                ax.text(j, i, count, ha="center", va="center", fontsize=8, color="white" if fraction > 0.5 else "black")
    _save(fig, path)


def plot_predictions(images: torch.Tensor, labels: list[int], predicted: list[int], confidence: list[float],
                     classes: list[str], path: str | Path, title: str = "", columns: int = 8) -> None:
    """A grid of uint8 images (N, C, H, W), each with its true class, predicted class and the model's probability
    under it; mistakes in red, framed. Each image is drawn 128 px wide, pixels enlarged as squares (nearest
    neighbour), so 32x32 images stay sharp. The cells are as wide as their longest label (in a monospaced
    font, whose width is known before drawing): no label runs into its neighbour or off the picture."""
    texts = [(f"true: {short(classes[true])}", f"pred: {short(classes[guess])}", percent(p))
             for true, guess, p in zip(labels, predicted, confidence)]
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    points = 9  # the labels' font size: at 80 dpi, 10 pixels
    side, line, char = 1.6, points * 1.35 / 72, points * 0.602 / 72  # inches: an image, a line, a character
    #   (0.602: a DejaVu Sans Mono character's width per point of size, its line 1.35 points with our spacing)
    cell_w = max(side + 0.15, 0.2 + char * max(len(t) for lines in texts for t in lines))
    cell_h = side + 3 * line + 0.2
    width = max(columns * cell_w, 4)  # (a few images: room for the title on a few lines)
    margin = (width - columns * cell_w) / 2
    title_lines = textwrap.wrap(title, width=int(width / 0.0833)) or [""]  # (10-point characters)
    top = 0.2 + 0.18 * len(title_lines)
    height = rows * cell_h + top
    fig = require_matplotlib()(figsize=(width, height), dpi=80)
    fig.text(0.5, 1 - 0.1 / height, "\n".join(label(t) for t in title_lines), ha="center", va="top", fontsize=10)
    for i, (image, lines, true, guess) in enumerate(zip(images, texts, labels, predicted)):
        row, column = divmod(i, columns)
        left = (margin + column * cell_w + (cell_w - side) / 2) / width
        bottom = 1 - (top + row * cell_h + side) / height
        ax = fig.add_axes((left, bottom, side / width, side / height))
        wrong = true != guess
        grayscale = image.shape[0] == 1
        ax.imshow((image[0] if grayscale else image.permute(1, 2, 0)).numpy(), cmap="gray" if grayscale else None,
                  vmin=0, vmax=255, interpolation="nearest", aspect="auto")
        ax.set(xticks=[], yticks=[])
        ax.text(0.5, -0.04, "\n".join(label(t) for t in lines), transform=ax.transAxes, ha="center", va="top",
                fontsize=points, family="DejaVu Sans Mono", linespacing=1.1, color="red" if wrong else "black")
        for spine in ax.spines.values():
            spine.set(color="red" if wrong else "lightgray", linewidth=3 if wrong else 0.5)
    _save(fig, path, dpi=80)


def short(name: str, width: int = 18) -> str:
    """A class name cut to `width` characters, an ellipsis marking the cut."""
    name = cli.printable(name)
    return name if len(name) <= width else name[:width - 1] + "\u2026"


def percent(p: float) -> str:
    """A probability to one decimal, never rounded up to a certainty: 0.99996 is ">99.9%", not "100.0%"."""
    return ">99.9%" if 0.9995 <= p < 1 else "<0.1%" if 0 < p < 0.0005 else f"{100 * p:.1f}%"  # (those would round)


def plot_lr_range(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float | None,
                  path: str | Path) -> None:
    """train.py --find-lr: the loss of each step against its lr (log scale), raw and smoothed, and the suggested
    lr. The y axis stops above the first loss, so that the explosion at the end does not flatten the rest."""
    fig = require_matplotlib()(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, losses, color="lightgray", label="loss of each step")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed")
    if suggestion is not None:  # (None: the loss never fell, no suggestion)
        ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested --lr {suggestion:.2g}")
    finite = [v for v in losses + smoothed if math.isfinite(v)]
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="training loss",
           title="learning-rate range test", ylim=(0.95 * min(finite), 1.1 * max(smoothed[0], min(finite))))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def check_output(path: str | Path, inputs: tuple = ()) -> None:
    """Refuse, before any work, a picture path whose file must not be replaced (cli.check_output), or whose suffix
    names no format drawn (picture_format): a PlotError."""
    try:
        cli.check_output(path, inputs, what="picture")
    except cli.UserError as e:
        raise PlotError(str(e)) from None
    picture_format(path)


def picture_format(path: str | Path) -> str:
    """The format a picture's suffix asks for: PNG, SVG or PDF (any case); another suffix is refused."""
    suffix = Path(path).suffix.lower()
    if suffix[1:] not in PICTURE_FORMATS:
        raise PlotError(f"the picture {path} {f'ends in {suffix}' if suffix else 'has no suffix'}: give a name ending "
                        f"in {', '.join('.' + f for f in PICTURE_FORMATS[:-1])} or .{PICTURE_FORMATS[-1]}, the "
                        f"formats drawn")
    return suffix[1:]


def _save(fig, path: str | Path, dpi: int = 100) -> None:
    """Render in the format the suffix names, then write atomically: a full disk or a signal never leaves half a
    picture (nor hides the old one)."""
    check_output(path)  # every picture, whoever asks for it (train.py's curves.png too)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=picture_format(path), dpi=dpi)
    try:
        cli.write_output(path, buffer.getbuffer())
    except OSError as e:
        reason = cli.describe_os_error(OSError(e.errno, e.strerror))  # (not e.filename: the temporary file's)
        raise PlotError(f"cannot write {path}: {reason}") from None


def main(argv: list[str] | None = None) -> Path:
    p = cli.parser("plot.py", __doc__)
    p.add_argument("metrics", metavar="METRICS_CSV", type=cli.path_flag, help="a run's metrics.csv")
    p.add_argument("--output", metavar="PATH", type=cli.path_flag,
                   help="the picture to write: .png, .svg or .pdf (default: curves.png next to METRICS_CSV)")
    with cli.one_line_errors("plot.py"):
        args = p.parse_args(argv)
        output = Path(args.output) if args.output is not None else Path(args.metrics).with_name("curves.png")
        require_matplotlib()  # first, so that a missing package is the one message
        check_output(args.output or output, inputs=(args.metrics,))  # (as typed: a trailing / is refused)
        plot_curves(read_metrics(Path(args.metrics)), output)
        cli.say(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
