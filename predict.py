"""Label image files with a trained checkpoint: class name and probability, best first.

    python predict.py --checkpoint runs/my-photos/best.pth photo.jpg
    python predict.py --checkpoint runs/my-photos/best.pth --top-k 3 --json photos/*.jpg

Nothing but the checkpoint is needed: it holds the classes, the image size and the normalization. Each image is
decoded exactly as training decoded it (data.load_image: EXIF rotation, transparency on white, grayscale or RGB
as the model takes, squashed to the checkpoint's image size), then normalized like a training batch.
"""
import argparse
import json
import sys

import torch
import torch.nn as nn

from data import DataError, load_image, normalize
from model import CheckpointError, load_checkpoint, model_from_checkpoint

BATCH = 256  # images decoded and run at a time: memory stays flat for any number of files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"{p.prog}: error: {message}")  # one line, not the usage block
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a .pth written by train.py")
    p.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="classes listed per image, best first (default: 1)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, label, probability, top_k} instead of one line per image")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (jpg, png, bmp, webp, ...)")
    return p.parse_args(argv)


@torch.no_grad()
def predict(model: nn.Module, ckpt: dict, paths: list[str], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and class indices (len(paths), top_k) of the top_k classes of each image, best first."""
    mean, std = (torch.tensor(ckpt[k], dtype=torch.float32) for k in ("mean", "std"))
    probs = []
    for start in range(0, len(paths), BATCH):
        x = torch.stack([load_image(p, ckpt["in_channels"], ckpt["image_size"]) for p in paths[start:start + BATCH]])
        x = normalize(x, mean, std)  # exactly as training batches are normalized
        probs.append(model(x).softmax(1))
    return torch.cat(probs).topk(top_k, dim=1)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt)
        classes = ckpt["classes"]
        if not 1 <= args.top_k <= len(classes):
            sys.exit(f"predict.py: error: --top-k must be in [1, {len(classes)}], the checkpoint's number of classes")
        probs, indices = predict(model, ckpt, args.images, args.top_k)
    except (CheckpointError, DataError) as e:
        sys.exit(f"predict.py: error: {e}")
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
