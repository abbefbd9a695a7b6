"""Experiment: a mask network that reads the classifier's own features, against the fast path's network.

    python scripts/exp_feature_mask_net.py --detector runs/mix-delete-800 --layer groups.0 --epochs 30

Trains, on the detector's stored training sets (``work/train-<attack>``: the clean images of the
first and every attack's adversarial images, with their optimised deletion masks), a
:class:`~advdetect.masks.amortized.MaskNet` variant whose encoder is replaced by the output of the
classifier's layer ``--layer`` (names as in ``model.net.named_modules()``), projected and resized
to the mask's cells, plus the image pooled to them; same head, FiLM, loss and settings as
``train`` uses. Prints one JSON line: the deletion faithfulness (share of held-out test images,
clean of the first set and each set's successful attacks, whose predicted mask leaves <= 10% of the
target probability) of the detector's own network (``old``) and of the variant (``new``), and each
network's time at batch 1 (the variant's includes the classifier pass it reads). Measured once;
not a product path (README, "Real time").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect import Guard  # noqa: E402
from advdetect.fastpath import read_fast_set  # noqa: E402
from advdetect.masks.amortized import AmortizedMasks, MaskNet  # noqa: E402
from advdetect.masks.amortized_training import MaskNetFit, fit_mask_net  # noqa: E402
from advdetect.splits import load_split  # noqa: E402


class FeatureMaskNet(MaskNet):
    """MaskNet's head and FiLM over a classifier layer's features (frozen) instead of its own encoder."""

    def __init__(self, spec, model, layer: str) -> None:
        super().__init__(spec)
        modules = dict(model.net.named_modules())
        if layer not in modules:
            raise SystemExit(f"no layer {layer!r} in the classifier; choose from: {', '.join(n for n in modules if n)}")
        self.classifier = [model]  # not a submodule: not trained, not saved
        self._features = None
        modules[layer].register_forward_hook(lambda m, i, o: setattr(self, "_features", o))
        with torch.no_grad():
            model(torch.zeros(1, spec.in_channels, *model.info.input_size))
        w = spec.width
        self.project = nn.Conv2d(self._features.shape[1], 2 * w, 1)
        self.image = nn.Conv2d(spec.in_channels, 2 * w, 3, padding=1)

    def forward(self, images, targets, probs):
        with torch.no_grad():
            self.classifier[0](images)
        code = torch.cat([F.one_hot(targets, self.spec.num_classes).to(probs.dtype), probs], 1)
        scale, shift = self.film(code).chunk(2, 1)
        feats = self.project(F.interpolate(self._features, size=self.spec.low_shape, mode="bilinear",
                                           align_corners=False))
        feats = feats + self.image(F.adaptive_avg_pool2d((images - 0.5) / 0.25, self.spec.low_shape))
        feats = feats * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.head(feats), self.iterations(F.relu(feats).mean((2, 3))).squeeze(1)


def ms_batch1(fn, repeats: int = 200) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, help="a detector with a fast path and its work folder")
    parser.add_argument("--layer", default="groups.0")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    guard = Guard.load(args.detector, device="cpu")
    if guard.deployment.fast is None:
        raise SystemExit(f"{args.detector} has no fast path")
    model, old = guard.model, guard.deployment.fast.explainer
    config, work = old.config, Path(args.detector) / "work"
    names = [p.name[len("train-"):] for p in sorted(work.glob("train-*"))]
    attacks = [a["name"] for a in json.loads((Path(args.detector) / "detector.json").read_text())["attacks"]]
    names = [a for a in attacks if a in names]  # train's order: the first set's clean images
    dirs = [work / f"train-{n}" for n in names]
    keep = [torch.ones(load_split(d, config.kind, images=False).index.numel(), dtype=torch.bool) for d in dirs]
    data = read_fast_set(dirs, config.kind, old.net.spec.low_shape, keep)
    torch.manual_seed(0)
    net = FeatureMaskNet(old.net.spec, model, args.layer)
    start = time.time()
    settings = MaskNetFit(seed=0, epochs=args.epochs)
    fit_mask_net(model, net, data.images, config, teacher_masks=data.masks, teacher_iterations=data.iterations,
                 settings=settings)
    out = {"detector": args.detector, "layer": args.layer, "epochs": args.epochs, "n_train": len(data.images),
           "train_seconds": round(time.time() - start)}
    new = AmortizedMasks(model, net, config)
    tests = {n: load_split(work / f"test-{n}", config.kind) for n in names if (work / f"test-{n}").is_dir()}
    for label, explainer in (("old", old), ("new", new)):
        faithful = []
        for i, split in enumerate(tests.values()):
            for side, chosen in (("clean", split.correct), ("adv", split.successful)):
                if side == "adv" or i == 0:  # every set holds the same clean images
                    faithful.append(explainer.attribute(getattr(split, side)[chosen]).deletion_ratio <= 0.1)
        out[f"faithfulness_{label}"] = round(float(torch.cat(faithful).float().mean()), 4)
    x = next(iter(tests.values())).clean[:1]
    with torch.no_grad():
        probs = model(x).softmax(1)
        targets = probs.argmax(1)
        out["ms_batch1_old"] = ms_batch1(lambda: old.net(x, targets, probs))
        out["ms_batch1_new_with_classifier"] = ms_batch1(lambda: net(x, targets, probs))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
