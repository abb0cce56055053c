"""Torch files that come from elsewhere (checkpoints, the image folders' caches, torchvision's pretrained weights),
checked before anything reads a tensor of theirs. Each reader loads its file with torch.load(weights_only=True), which
builds tensors and plain containers only (never code), then refuses what oversized_tensor finds, in its own words.
"""
from pathlib import Path

import torch

import cli


def oversized_tensor(content: object, path: Path) -> str | None:
    """Why `content` (what torch.load read from `path`) must be refused before anything reads a tensor, or None: a
    tensor whose elements are more than its storage holds (an expanded, zero-stride tensor: a few bytes in the file,
    gigabytes once an operation materializes it) or reach past it, or a storage larger than the file. Each container
    is visited once, however often a crafted file refers to it."""
    file_size, seen, stack = path.stat().st_size, set(), [content]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set)):
            stack += x
        elif isinstance(x, torch.Tensor):
            storage, size = x.untyped_storage().nbytes(), x.element_size()
            reach = x.storage_offset() + sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride())) + 1
            if storage > file_size or x.numel() and (x.numel() * size > storage or reach * size > storage):
                return (f"{path} holds a tensor of shape {cli.shorten(str(tuple(x.shape)), 100)} over a storage of "
                        f"{storage:,} bytes (an expanded tensor, a crafted file?); refusing it")
    return None
