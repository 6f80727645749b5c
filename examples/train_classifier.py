#!/usr/bin/env python
"""Train a tile classifier on a released synthpath dataset, the way a downstream user would.

Only plain PyTorch and Hugging Face ``datasets`` are used (no synthpath import), so this file
also documents the released format: one image column per magnification (``image_20x``,
``image_10x``, ...) and a ``label`` ClassLabel column, in ``train`` and ``test`` splits.

    python examples/train_classifier.py runs/demo/export/hf --level image_20x --epochs 5

To test on real tiles instead of the synthetic test split, give ``--test-data`` another
dataset folder (or hub name) with the same columns.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from datasets import load_dataset
from torch import nn
from torch.nn import functional as F


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="dataset folder (e.g. runs/demo/export/hf) or hub name")
    ap.add_argument("--level", default=None, help="image column to train on (default: the first image_* column)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--test-data", default=None, help="a different dataset to test on (default: DATA's test split)")
    return ap.parse_args(argv)


def to_arrays(split, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one image column to uint8 [N,H,W,3] and the labels to int64 [N]."""
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in split[column]])
    labels = np.asarray(split["label"], dtype=np.int64)
    return images, labels


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, generator=None):
    order = torch.randperm(len(labels), generator=generator) if generator is not None else torch.arange(len(labels))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size].numpy()
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        yield x, torch.from_numpy(labels[idx])


def make_model(num_classes: int) -> nn.Module:
    """A small CNN: strided conv blocks, global average pooling, linear head."""
    def block(a, b, stride):
        return [nn.Conv2d(a, b, 3, stride=stride, padding=1), nn.GroupNorm(8, b), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 64, 2), *block(64, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    ds = load_dataset(args.data)
    if args.train_split not in ds:
        print(f"error: {args.data} has no split {args.train_split!r} (splits: {list(ds)})", file=sys.stderr)
        return 2
    train = ds[args.train_split]
    columns = [c for c in train.column_names if c.startswith("image_")]
    column = args.level or (columns[0] if columns else None)
    if column not in train.column_names:
        print(f"error: no image column {column!r}; image columns are {columns}", file=sys.stderr)
        return 2
    test_ds = load_dataset(args.test_data) if args.test_data else ds
    if args.test_split not in test_ds:
        print(f"error: no test split {args.test_split!r} (splits: {list(test_ds)})", file=sys.stderr)
        return 2
    names = train.features["label"].names
    x_tr, y_tr = to_arrays(train, column)
    x_te, y_te = to_arrays(test_ds[args.test_split], column)
    print(f"{column}: {len(y_tr)} training images, {len(y_te)} test images, classes {names}")

    model = make_model(len(names))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, n = 0.0, 0
        for x, y in batches(x_tr, y_tr, args.batch_size, g):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        print(f"epoch {epoch}: train loss {total / n:.4f}")

    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches(x_te, y_te, 256):
            correct += int((model(x).argmax(1) == y).sum())
    print(f"test accuracy: {correct / len(y_te):.4f} ({correct}/{len(y_te)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
