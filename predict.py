"""Label image files with a trained checkpoint: class name and probability, best first.

    python predict.py --checkpoint runs/my-photos/best.pth photo.jpg
    python predict.py --checkpoint runs/my-photos/best.pth --top-k 3 --json photos/*.jpg

Nothing but the checkpoint is needed: it holds the classes, the image size and the normalization. Each image is
decoded exactly as training decoded it (data.load_image: EXIF rotation, transparency on white, grayscale or RGB
as the model takes, squashed to the checkpoint's image size), then normalized like a training batch.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads: an early Ctrl-C exits quietly

import argparse
import json

import torch
import torch.nn as nn

import runtime
from checkpoint import load_checkpoint, model_from_checkpoint
from data import load_image, normalize

BATCH = 256  # images decoded and run at a time: memory stays flat for any number of files


class PredictError(cli.UserError):
    """A request the checkpoint cannot answer."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("predict.py", __doc__)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pth written by train.py")
    p.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="classes listed per image, best first (default: 1)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, label, probability, top_k} instead of one line per image")
    runtime.add_device_flag(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (jpg, png, bmp, webp, ...)")
    return p.parse_args(argv)


@torch.no_grad()
def predict(model: nn.Module, ckpt: dict, paths: list[str], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and class indices (len(paths), top_k) of the top_k classes of each image, best first."""
    device = next(model.parameters()).device
    mean, std = (torch.tensor(ckpt[k], dtype=torch.float32, device=device) for k in ("mean", "std"))
    probs = []
    for start in range(0, len(paths), BATCH):
        x = torch.stack([load_image(p, ckpt["in_channels"], ckpt["image_size"]) for p in paths[start:start + BATCH]])
        x = normalize(x.to(device), mean, std)  # exactly as training batches are normalized
        probs.append(model(x).float().softmax(1).cpu())
    probs = torch.cat(probs)
    if not torch.isfinite(probs).all():  # finite weights can still overflow: say so rather than print nan%
        raise PredictError("the model's outputs are not finite numbers for some image; the checkpoint is unusable")
    return probs.topk(top_k, dim=1)


def main(argv: list[str] | None = None) -> list[dict]:
    with cli.one_line_errors("predict.py"):
        args = parse_args(argv)
        device = runtime.pick_device(args.device)
        ckpt = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt).to(device)
        classes = ckpt["classes"]
        if not 1 <= args.top_k <= len(classes):
            raise PredictError(f"--top-k must be in [1, {len(classes)}], the checkpoint's number of classes")
        probs, indices = predict(model, ckpt, args.images, args.top_k)
    results = []
    for path, p_row, i_row in zip(args.images, probs.tolist(), indices.tolist()):
        top = [{"label": classes[i], "probability": p} for i, p in zip(i_row, p_row)]
        results.append({"path": path, "label": top[0]["label"], "probability": top[0]["probability"], "top_k": top})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}: " + ", ".join(f"{t['label']} {100 * t['probability']:.2f}%" for t in r["top_k"]))
    return results


if __name__ == "__main__":
    main()
