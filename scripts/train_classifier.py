"""Train the built-in CIFAR-10 classifier (``cifar10-cnn``) on the CPU.

    python scripts/train_classifier.py --data-dir ../shared/data

Writes data/models/cifar10-cnn.safetensors and data/models/cifar10-cnn.json (classes,
normalization, input size, measured test accuracy, this command). Recipe: patch-whitening
stem (frozen weights), SGD with Nesterov momentum, linear warm-up then linear decay,
label smoothing, random flips and 2-pixel translations, channels-last memory format.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advdetect.data import CIFAR10_CLASSES, load_cifar10  # noqa: E402
from advdetect.models.cifar_cnn import CifarCNN  # noqa: E402
from advdetect.models.wrapper import ModelInfo, ModelWrapper  # noqa: E402
from advdetect.storage import save_tensors, write_json  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
log = logging.getLogger("train_classifier")


def whitening_weights(images: torch.Tensor, out_channels: int, eps: float = 5e-4) -> torch.Tensor:
    """Stem filters that whiten 2x2 patches: eigenvectors of the patch covariance, +/-."""
    patches = F.unfold(images, kernel_size=2).transpose(1, 2).reshape(-1, images.shape[1] * 4)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / patches.shape[0]
    eigval, eigvec = torch.linalg.eigh(cov)
    filters = (eigvec.T / torch.sqrt(eigval + eps)[:, None]).flip(0)  # largest variance first
    filters = filters.reshape(-1, images.shape[1], 2, 2)
    half = out_channels // 2
    return torch.cat([filters[:half], -filters[:half]])


def augment(batch: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and translations up to ``pad`` pixels (reflect padding)."""
    n, _, h, w = batch.shape
    flip = torch.rand(n, generator=gen) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.empty_like(batch)
    for ox in range(2 * pad + 1):
        for oy in range(2 * pad + 1):
            sel = ((dx == ox) & (dy == oy)).nonzero().flatten()
            if len(sel):
                out[sel] = padded[sel, :, oy:oy + h, ox:ox + w]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--widths", default="64,128,256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "data" / "models"))
    p.add_argument("--name", default="cifar10-cnn")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    widths = tuple(int(w) for w in args.widths.split(","))

    t0 = time.time()
    train = load_cifar10("train", data_dir=args.data_dir, progress=True)
    test = load_cifar10("test", data_dir=args.data_dir, progress=True)
    log.info("loaded %d train / %d test images in %.0fs", len(train), len(test), time.time() - t0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x_train = ((train.images - mean) / std).contiguous(memory_format=torch.channels_last)
    y_train = train.labels

    net = CifarCNN(widths=widths)
    with torch.no_grad():
        net.stem.weight.copy_(whitening_weights(x_train[:5000], net.stem.out_channels))
    net.stem.weight.requires_grad_(False)
    net = net.to(memory_format=torch.channels_last)

    decay, no_decay = [], []
    for name, prm in net.named_parameters():
        if prm.requires_grad:
            (decay if prm.dim() > 1 else no_decay).append(prm)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(y_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    warm = int(0.2 * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm)))

    t_train = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(y_train), generator=gen)
        run_loss, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
            out = net(xb)
            loss = F.cross_entropy(out, y_train[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
            correct += (out.argmax(1) == y_train[idx]).sum().item()
        model = ModelWrapper(net, _info(args.name, widths, None, {}))
        acc = (model.predict(test.images) == test.labels).float().mean().item()
        log.info("epoch %d/%d loss %.3f train acc %.3f test acc %.4f (%.0fs)", epoch + 1, args.epochs,
                 run_loss / steps_per_epoch, correct / (steps_per_epoch * args.batch_size), acc, time.time() - t_train)

    net = net.to(memory_format=torch.contiguous_format)
    model = ModelWrapper(net, _info(args.name, widths, None, {}))
    acc = (model.predict(test.images) == test.labels).float().mean().item()
    out = Path(args.out)
    weights = out / f"{args.name}.safetensors"
    digest = save_tensors(weights, {k: v for k, v in net.state_dict().items()})
    meta = {
        "name": args.name,
        "architecture": "CifarCNN",
        "arch_args": {"widths": list(widths), "stem_width": net.stem.out_channels, "logit_scale": net.logit_scale},
        "classes": list(CIFAR10_CLASSES),
        "input_size": [32, 32],
        "mean": list(MEAN),
        "std": list(STD),
        "weights": weights.name,
        "sha256": digest,
        "test_accuracy": round(acc, 4),
        "test_images": len(test),
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
                  "seed": args.seed, "seconds": round(time.time() - t_train, 1),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "data": "CIFAR-10 train split (50,000 images); test accuracy on the 10,000 test images"},
        "command": "python scripts/train_classifier.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    write_json(out / f"{args.name}.json", meta)
    print(json.dumps({"test_accuracy": acc, "weights": str(weights), "seconds": meta["train"]["seconds"]}))


def _info(name: str, widths: tuple[int, ...], sha: str | None, extra: dict) -> ModelInfo:
    return ModelInfo(name, CIFAR10_CLASSES, (32, 32), MEAN, STD, sha, extra)


if __name__ == "__main__":
    main()
