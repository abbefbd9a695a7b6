"""A second real dataset and model: scikit-learn's handwritten digits, and a 1-channel CNN for them.

    python scripts/make_digits.py --data runs/digits            # the PNG folder only
    python scripts/make_digits.py --data runs/digits --model data/digits/digits-cnn.pt2

The 1,797 grayscale 8 x 8 digits that ship with scikit-learn (no download) are written as a PNG
ImageFolder ``<data>/<digit>/<n>.png``, upsampled to 32 x 32. With ``--model``, a small CNN is
trained on the folder's "train" part (advdetect's own split of a single folder, so the "test"
part stays unseen) and exported with ``torch.export`` (dynamic batch) beside a JSON sidecar
(mean, std, input size, channels, classes, sha256, test accuracy, this command).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advdetect.data import DataSpec, open_split  # noqa: E402
from advdetect.models.wrapper import ModelInfo  # noqa: E402
from advdetect.storage import sha256_file, write_json  # noqa: E402

SIZE = 32
CLASSES = tuple(str(d) for d in range(10))
MEAN, STD = (0.5,), (0.5,)
log = logging.getLogger("make_digits")


def write_digits_folder(out: str | Path, size: int = SIZE) -> Path:
    """scikit-learn's digits as PNGs ``out/<digit>/<n>.png`` (``size`` x ``size``, bilinear); returns ``out``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    for label in CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
    for n, (image, target) in enumerate(zip(digits.images, digits.target)):
        pixels = (image / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(out / str(target) / f"{n:04d}.png")
    return out


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions (16, 32, 64 channels), global average pooling, a linear layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_model(folder: Path, epochs: int, seed: int) -> tuple[nn.Module, float]:
    """Train on the folder's train part; return the network (taking normalized inputs) and test accuracy."""
    info = ModelInfo("digits", CLASSES, (SIZE, SIZE), MEAN, STD)
    spec = DataSpec(path=str(folder))
    train_x, train_y, _ = open_split(spec, "train", info).load()
    test_x, test_y, _ = open_split(spec, "test", info).load()
    normalize = (lambda x: (x - MEAN[0]) / STD[0])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(train_y) + 63) // 64))
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_y), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            x = train_x[idx]
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # small translations
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(normalize(x)), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("epoch %d loss %.3f", epoch + 1, loss.item())
    net.eval()
    with torch.no_grad():
        accuracy = (net(normalize(test_x)).argmax(1) == test_y).float().mean().item()
    return net, accuracy


def export_model(net: nn.Module, path: Path, accuracy: float, n_train: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.zeros(2, 1, SIZE, SIZE),), dynamic_shapes={"x": {0: batch}})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    write_json(path.with_name(path.name + ".json"), {
        "mean": list(MEAN), "std": list(STD), "input_size": [SIZE, SIZE], "channels": 1, "classes": list(CLASSES),
        "sha256": sha256_file(path), "test_accuracy": round(accuracy, 4), "n_train": n_train,
        "trained_by": "python " + shlex.join(["scripts/make_digits.py", *sys.argv[1:]])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Where to write the PNG folder.")
    parser.add_argument("--model", default=None, help="Train and export the CNN here (.pt2), e.g. "
                                                      "data/digits/digits-cnn.pt2.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = write_digits_folder(args.data)
    log.info("wrote %s", folder)
    if args.model:
        net, accuracy = train_model(folder, args.epochs, args.seed)
        export_model(net, Path(args.model), accuracy, n_train=len(open_split(
            DataSpec(path=str(folder)), "train", ModelInfo("d", CLASSES, (SIZE, SIZE), MEAN, STD))))
        log.info("test accuracy %.4f -> %s", accuracy, args.model)


if __name__ == "__main__":
    main()
