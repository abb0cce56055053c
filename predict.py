"""Label image files with a trained checkpoint: class name and probability, best first.

    python predict.py --checkpoint runs/photos/best.pth photo.jpg
    python predict.py --checkpoint runs/photos/best.pth --top-k 3 --json *.jpg
    python predict.py --checkpoint runs/photos/best.pth new/     # every image file in new/, sorted
    python predict.py --checkpoint runs/photos photo.jpg         # a run folder: its best.pth

Nothing but the checkpoint is needed: it holds the classes, the image size and the normalization. Each image is
decoded exactly as training decoded it (decode.load_image: EXIF rotation, transparency on white, grayscale or RGB
as the model takes, then shaped by the run's recipe: squashed to the checkpoint's image size, or, for a run with the
photo recipe, the shorter side resized and the centre cropped), then normalized like a training batch.

A file that cannot be read (not an image, corrupt, over --max-image-pixels, no permission, missing) is named on
stderr, one line each; the others are labelled all the same. Exit status: 0 when every image was labelled; 2 when
some could not be read (named on stderr, the rest labelled on stdout); 1 for any other error (nothing labelled);
130 or 143 when stopped by Ctrl-C or SIGTERM; 141 when stdout's reader has gone or stdout is closed.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads: an early Ctrl-C exits quietly

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

import runtime
from batches import normalize
from checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint, run_batch_size
from decode import MAX_IMAGE_PIXELS, Prep, load_image
from folders import IMAGE_SUFFIXES, image_files
from formats import DataError
from model import EVAL_BATCH



class PredictError(cli.UserError):
    """A request the checkpoint cannot answer."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("predict.py", __doc__)
    p.add_argument("--checkpoint", required=True, metavar="PATH", type=cli.path_flag,
                   help="a .pth written by train.py, or a run folder (its best.pth)")
    p.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="classes listed per image, best first (default: 1)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, label, probability, top_k} instead of one line per image")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse an image of more pixels than this: a small file can decode to gigabytes "
                        f"(default: {MAX_IMAGE_PIXELS:,})")
    p.add_argument("--batch-size", type=int, metavar="N", help="images decoded and run at a time: memory stays "
                   "flat for any number of files (default: the run's --eval-batch-size or --batch-size)")
    runtime.add_device_flag(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", type=cli.path_flag,
                   help=f"image files, or folders: their image files ({', '.join(IMAGE_SUFFIXES)}), sorted")
    return p.parse_args(argv)


def expand_folders(given: list[str]) -> list[str]:
    """The files given, with each folder replaced by the image files under it (sorted, hidden ones left out)."""
    paths = []
    for name in given:
        if Path(name).is_dir():
            found = image_files(Path(name))
            if not found:
                raise PredictError(f"{name} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
            paths += [str(p) for p in found]
        else:
            paths.append(name)
    return paths


UNREADABLE = 2  # the exit status when some files could not be read (the others are labelled)


def decode(paths: list[str], ckpt: dict, max_pixels: int, prep: Prep) -> tuple[list[int], list[torch.Tensor]]:
    """The images of `paths` that can be read, decoded as training decoded them, and which of `paths` they are.
    One that cannot (decode.load_image's DataError: not an image, corrupt, too many pixels, no permission,
    missing) is named on stderr at once, one line, and left out."""
    kept, images = [], []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path, ckpt["in_channels"], ckpt["image_size"], max_pixels, prep=prep))
        except DataError as e:
            print(f"predict.py: error: {cli.printable(str(e))}", file=sys.stderr, flush=True)
            continue
        kept.append(i)
    return kept, images


@torch.no_grad()
def predict(model: nn.Module, ckpt: dict, paths: list[str], top_k: int, max_pixels: int = MAX_IMAGE_PIXELS,
            batch_size: int = EVAL_BATCH) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Which of `paths` could be read (decode()), and their probabilities and class indices (len(those), top_k) of
    the top_k classes, best first."""
    device = next(model.parameters()).device
    mean, std = (torch.tensor(ckpt[k], dtype=torch.float32, device=device) for k in ("mean", "std"))
    prep = Prep.from_dict(ckpt.get("prep"))  # the run's: squashed, or its photo recipe's centre crop
    read, probs = [], [torch.empty(0, len(ckpt["classes"]))]
    for start in range(0, len(paths), batch_size):
        kept, images = decode(paths[start:start + batch_size], ckpt, max_pixels, prep)
        read += [start + i for i in kept]
        if images:
            x = normalize(torch.stack(images).to(device), mean, std)  # exactly as training batches are normalized
            probs.append(model(x).float().softmax(1).cpu())
    probs = torch.cat(probs)
    if not torch.isfinite(probs).all():  # finite weights can still overflow: say so rather than print nan%
        raise PredictError("the model's outputs are not finite numbers for some image; the checkpoint is unusable")
    return read, *probs.topk(top_k, dim=1)


def main(argv: list[str] | None = None) -> list[dict]:
    with cli.one_line_errors("predict.py", "try --device cpu, or a lower --max-image-pixels"):
        args = parse_args(argv)
        if args.top_k < 1:
            raise PredictError("--top-k must be at least 1")
        if args.max_image_pixels < 1:
            raise PredictError("--max-image-pixels must be at least 1")
        if args.batch_size is not None and not 1 <= args.batch_size <= 2**31:
            raise PredictError("--batch-size must be in [1, 2**31]")
        paths = expand_folders(args.images)
        device = runtime.pick_device(args.device)
        ckpt = load_checkpoint(checkpoint_path(args.checkpoint, "labelling with"))
        model = model_from_checkpoint(ckpt).to(device)
        classes = ckpt["classes"]
        if args.top_k > len(classes):  # more than there are: list them all
            print(f"predict.py: note: --top-k {args.top_k} is more than the checkpoint's {len(classes)} classes; "
                  f"listing {len(classes)}", file=sys.stderr)
        run_args = ckpt["args"] if isinstance(ckpt.get("args"), dict) else {}
        read, probs, indices = predict(model, ckpt, paths, min(args.top_k, len(classes)), args.max_image_pixels,
                                       args.batch_size or run_batch_size(run_args))
        results = []
        for path, p_row, i_row in zip([paths[i] for i in read], probs.tolist(), indices.tolist()):
            top = [{"label": classes[i], "probability": p} for i, p in zip(i_row, p_row)]
            results.append({"path": path, "label": top[0]["label"], "probability": top[0]["probability"],
                            "top_k": top})
        if args.json:
            cli.say(json.dumps(results, indent=2))
        elif results:  # printable: a file or class name cannot break the line or send the terminal escapes
            cli.say("\n".join(f"{cli.printable(r['path'])}: " + ", ".join(
                f"{cli.printable(t['label'])} {100 * t['probability']:.2f}%" for t in r["top_k"]) for r in results))
        if len(read) < len(paths):  # each named on stderr already; the others are labelled
            raise SystemExit(UNREADABLE)
    return results


if __name__ == "__main__":
    main()
