"""Export a checkpoint to ONNX, and check the ONNX model against PyTorch before keeping it.

    python export.py --checkpoint runs/my-photos/best.pth --output model.onnx
    python export.py --checkpoint runs/my-photos        # a run folder: its best.pth, to runs/my-photos/best.onnx

The ONNX model takes what the PyTorch one takes: float32 images "images" (batch, C, H, W), any batch size,
normalized as (pixel / 255 - mean) / std per channel; it returns "logits" (batch, classes). The file's metadata
holds what a user of it needs: classes, mean, std (JSON lists), image_size, model_name, and prep (JSON: how an
image becomes the input: "squash" to image_size, or "crop": resize the shorter side to resize_size with
interpolation, then crop the centre). The check runs both models
on random inputs of batch sizes 1 and 5 with onnxruntime; the file is written only when the largest difference is
under 1e-4. Needs the optional packages onnx (to write) and onnxruntime (to check): pip install onnx onnxruntime.
"""
import cli

if __name__ == "__main__":
    cli.handle_signals()  # before torch loads: an early Ctrl-C exits quietly

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

from checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
from decode import Prep

TOLERANCE = 1e-4  # float32 logits of the same graph differ by rounding only, far below this
CHECK_BATCHES = (1, 5)  # two sizes, so a batch dimension that was frozen at export shows up
OPSET = 17  # run by every onnxruntime since 1.14 (2023)


class ExportError(cli.UserError):
    """An optional package missing, or an ONNX model that does not match PyTorch."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("export.py", __doc__)
    p.add_argument("--checkpoint", required=True, metavar="PATH", type=cli.path_flag,
                   help="a .pth written by train.py, or a run folder (its best.pth)")
    p.add_argument("--output", metavar="PATH", type=cli.path_flag,
                   help="the .onnx file to write (default: the checkpoint's path with .onnx)")
    return p.parse_args(argv)


def require(name: str) -> ModuleType:
    return cli.require(name, "export.py", "onnx onnxruntime")


def export_onnx(model: nn.Module, ckpt: dict, path: Path) -> None:
    """Write `model` as ONNX with a dynamic batch dimension, and the checkpoint's classes and normalization
    as metadata."""
    onnx = require("onnx")
    example = torch.zeros(2, ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"])
    with warnings.catch_warnings():
        # torch >= 2.9 deprecates this TorchScript-based exporter (and warns from inside it) for dynamo=True, which
        # also needs onnxscript and takes seconds; for these plain conv nets this one is exact and needs onnx alone
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            with without_c_output():
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                                  input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        except OSError:  # a full disk, a quota: the system's reason, about the output (cli.atomic_output)
            raise
        except Exception as e:  # an operator ONNX lacks at this size (vgg11 at 32 px, alexnet at 100 px: an
            # adaptive pooling whose output does not divide its input); torch's reason is its first line
            reason = " ".join(str(e).split("[Caused by")[0].split(" Please feel free")[0].split()).rstrip(".")
            raise ExportError(f"{ckpt['model_name']} at {ckpt['image_size']} px cannot be exported to ONNX (opset "
                              f"{OPSET}): {reason[:300] or type(e).__name__}; nothing written") from None
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {
        "classes": json.dumps(ckpt["classes"]), "mean": json.dumps(ckpt["mean"]), "std": json.dumps(ckpt["std"]),
        "image_size": str(ckpt["image_size"]), "model_name": ckpt["model_name"],
        "prep": json.dumps(Prep.from_dict(ckpt.get("prep")).to_dict())})
    onnx.save(graph, str(path))


@contextmanager
def without_c_output() -> Iterator[None]:
    """Silence what C++ code writes to the process's stdout (file descriptor 1), as torch.onnx does with the whole
    graph when an export fails: the user gets our one line instead."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@torch.no_grad()
def max_difference(model: nn.Module, path: Path, in_channels: int, image_size: int) -> float:
    """Largest |ONNX - PyTorch| logit over seeded random inputs of each of CHECK_BATCHES sizes."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    differences = []
    for n in CHECK_BATCHES:
        x = torch.randn(n, in_channels, image_size, image_size, generator=generator)
        onnx_logits = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        differences.append((onnx_logits - model(x)).abs().max())
    return torch.stack(differences).max().item()  # (torch's max keeps a NaN; Python's max(0.0, nan) is 0.0)


def main(argv: list[str] | None = None) -> float:
    with cli.one_line_errors("export.py"):
        args = parse_args(argv)
        checkpoint = checkpoint_path(args.checkpoint, "exporting")  # (a run folder: its best.pth)
        output = Path(args.output) if args.output is not None else checkpoint.with_suffix(".onnx")
        cli.check_output(args.output or output, inputs=(checkpoint,), what="ONNX output", new_folder=True)
        for package in ("onnx", "onnxruntime"):  # before any work: a missing package is the one message
            require(package)
        ckpt = load_checkpoint(checkpoint)
        model = model_from_checkpoint(ckpt)
        run_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        data_dir = run_args.get("data_dir") if isinstance(run_args.get("data_dir"), str) else None
        # the data the model was trained on is no input of this command, but no place for a model either
        cli.check_output(output, inputs=(checkpoint, data_dir), what="ONNX output", new_folder=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        with cli.atomic_output(output) as tmp:  # becomes `output` only once the check has passed
            with cli.c_openable(tmp, os.O_RDWR) as name:  # (torch and onnxruntime take no name that is not UTF-8)
                export_onnx(model, ckpt, Path(name))
                difference = max_difference(model, Path(name), ckpt["in_channels"], ckpt["image_size"])
            if not difference < TOLERANCE:  # `not <` so that a NaN fails too
                raise ExportError(f"the ONNX model differs from PyTorch by up to {difference:.3g} (limit "
                                  f"{TOLERANCE:g}); nothing written")
        cli.say(f"wrote {output}; largest difference from PyTorch on random inputs (batch sizes "
                f"{', '.join(map(str, CHECK_BATCHES))}): {difference:.3g} (limit {TOLERANCE:g})")
    return difference


if __name__ == "__main__":
    main()
