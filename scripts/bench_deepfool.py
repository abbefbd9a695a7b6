"""Batched DeepFool against torchattacks' one-image-at-a-time DeepFool, on the same images.

    python scripts/bench_deepfool.py --data-dir ../shared/data            # 128 images (~3 minutes)
    python scripts/bench_deepfool.py --data-dir ../shared/data --n 32     # under a minute

Both run torchattacks' algorithm (50 steps, overshoot 0.02) on the same seeded CIFAR-10 test images
with the built-in classifier, labels = the true labels. Prints one JSON line: seconds and images/s of
each, ``speedup``, the largest |difference| between their adversarial images, the share of images
whose prediction on the two adversarial images agrees (DeepFool stops 2% past the boundary, so float
rounding of a batched forward pass can land an image on the other side), each one's fooled share of
the correct images and median L2 perturbation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect.data import load_cifar10  # noqa: E402
from advdetect.deepfool import BatchedDeepFool  # noqa: E402
from advdetect.models.registry import load_model  # noqa: E402
from advdetect.models.wrapper import frozen  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n", type=int, default=128, help="test images (default 128)")
    p.add_argument("--batch", type=int, default=256, help="batch size of the batched attack (default 256)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    model = load_model("cifar10-cnn", device=args.device)
    data = load_cifar10("test", n=args.n, seed=args.seed, data_dir=args.data_dir)
    x, y = data.images.to(args.device), data.labels.to(args.device)
    with frozen(model):
        t0 = time.perf_counter()
        reference = torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y)
        t_reference = time.perf_counter() - t0
        t0 = time.perf_counter()
        attack = BatchedDeepFool(model, steps=50, overshoot=0.02)
        batched = torch.cat([attack(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(x), args.batch)])
        t_batched = time.perf_counter() - t0
    correct = model.predict(x) == y
    pred_reference, pred_batched = model.predict(reference), model.predict(batched)

    def summary(adv: torch.Tensor, pred: torch.Tensor, seconds: float) -> dict:
        return {"seconds": round(seconds, 2), "images_per_second": round(len(x) / seconds, 2),
                "fooled_of_correct": round((pred[correct] != y[correct]).float().mean().item(), 4),
                "median_l2": round((adv - x)[correct].flatten(1).norm(dim=1).median().item(), 5)}

    print(json.dumps({
        "n": len(x), "device": args.device, "threads": torch.get_num_threads(),
        "torchattacks": summary(reference, pred_reference, t_reference),
        "batched": summary(batched, pred_batched, t_batched),
        "speedup": round(t_reference / t_batched, 2),
        "max_abs_diff": (batched - reference).abs().max().item(),
        "prediction_agreement": round((pred_reference == pred_batched).float().mean().item(), 4),
    }))


if __name__ == "__main__":
    main()
