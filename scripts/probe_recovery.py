"""Probe: how far does recovery by a *mask* go, against the default light blur?

Two measurements, both printed as one JSON object:

1. ``held_out``: on the held-out test set of a finished ``train`` / ``eval_detection.py`` run
   (cached masks, the run's detector and threshold), recovery and harm for the light blur
   (``blur``) and for the paper's mask applied back, with and without the flagged label
   ruled out.
2. ``light_masks``: deletion masks optimised against a *light* blur (``--sigmas``, pixels) on
   the first ``--n`` successful adversarial images of the run's *training* split (so nothing
   is tuned on the test set), applied back with the flagged label ruled out, next to the
   whole-image blur of the same sigma (a mask that deletes everything).

    python scripts/probe_recovery.py --run runs/detector-bim-preserve-4k-fpr4 --n 300 --sigmas 0.75,1.0,1.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect.masks import MaskConfig, make_explainer  # noqa: E402
from advdetect.recovery import Recovery, RecoveryConfig, recover  # noqa: E402
from advdetect.inference import load_deployment  # noqa: E402
from advdetect.splits import load_attack_set, load_split, split_metrics  # noqa: E402

KEYS = ("recovery_top1", "recovery_top5", "harm", "harm_unconditional")


def held_out(run: Path, attack: str) -> dict[str, dict[str, float]]:
    deployed = load_deployment(run, device="cpu")
    split = load_split(run / "work" / f"test-{attack}", deployed.mask_config.kind, deployed.recovery_masks_config.kind)
    out = {}
    for name, settings in (("blur", RecoveryConfig()), ("mask", RecoveryConfig(method="mask")),
                           ("mask_nothing_ruled_out", RecoveryConfig(method="mask", exclude_flagged=False))):
        metrics = split_metrics(deployed.model, deployed.detector, split, deployed.recovery_masks_config, settings)
        out[name] = {k: round(metrics[k], 4) for k in KEYS} | {"n_adversarial": metrics["n_adversarial"]}
    return out


def light_masks(run: Path, attack: str, n: int, sigmas: list[float]) -> dict[str, dict[str, float]]:
    wrapper = load_deployment(run, device="cpu").model
    split = load_attack_set(run / "work" / f"train-{attack}")
    success = split.successful.nonzero().flatten()[:n]
    adv, adv_pred, clean_pred = split.adv[success], split.adv_pred[success], split.clean_pred[success]

    def score(rec: Recovery) -> dict[str, float]:
        return {"top1": round(float((rec.top1 == clean_pred).float().mean()), 4),
                "top5": round(float((rec.top5 == clean_pred[:, None]).any(1).float().mean()), 4)}

    out: dict[str, dict[str, float]] = {}
    for sigma in sigmas:
        out[f"whole_image_blur_{sigma}"] = score(recover(wrapper, adv, config=RecoveryConfig(sigma=sigma),
                                                         predicted=adv_pred))
        config = MaskConfig(blur_sigma=sigma)
        start = time.time()
        masks = make_explainer(wrapper, config).attribute(adv, progress=True).masks
        rec = recover(wrapper, adv, masks, RecoveryConfig(method="mask"), config, predicted=adv_pred)
        out[f"mask_blur_{sigma}"] = score(rec) | {"deleted_area": round(float((1 - masks).mean()), 3),
                                                  "seconds": round(time.time() - start, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/detector-bim-preserve-4k-fpr4")
    p.add_argument("--attack", default="bim")
    p.add_argument("--n", type=int, default=300, help="training-split adversarial images for the light masks")
    p.add_argument("--sigmas", default="0.75,1.0,1.5", help="light blurs to try (pixels); empty: skip part 2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    result = {"run": str(run), "held_out": held_out(run, args.attack)}
    sigmas = [float(x) for x in args.sigmas.split(",") if x.strip()]
    if sigmas:
        result["light_masks"] = light_masks(run, args.attack, args.n, sigmas)
        result["n_light"] = args.n
    print(json.dumps(result))


if __name__ == "__main__":
    main()
