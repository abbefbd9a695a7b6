"""Evaluation never reuses the detector's images: which images a detector was fitted and
calibrated on, and the check that an evaluation's images are none of them."""

from __future__ import annotations

from typing import Any

from ..data import CIFAR10_SIZES, shared_images, subset_record
from ..errors import AdvDetectError
from .config import EvaluateConfig


def reserved_images(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The images a detector was fitted and calibrated on (detector.json's ``images``; ``fast_fit``: those only
    its fast path fitted on, `train --fast-n`).

    Detectors from before that record are reconstructed from their seed: calibrated on test
    images, they used some of those after their ``n_eval`` held-out ones in the seeded order,
    so every test image after those counts as reserved.
    """
    if isinstance(meta.get("images"), dict):
        return [meta["images"][k] for k in ("fit", "fast_fit", "calibration")
                if isinstance(meta["images"].get(k), dict)]
    if meta.get("calibrated_on") == "test" and isinstance(meta.get("seed"), int) and isinstance(meta.get("n_eval"), int):
        return [subset_record("test", CIFAR10_SIZES["test"] - meta["n_eval"], meta["seed"] + 1, offset=meta["n_eval"])]
    return []


def check_unseen(meta: dict[str, Any], images: dict[str, Any], config: EvaluateConfig) -> None:
    """Refuse to evaluate on images the detector was fitted or calibrated on (compared by identity)."""
    shared = shared_images(reserved_images(meta), images)
    if shared:
        raise AdvDetectError(f"{len(shared)} of the {config.n} evaluation images (--n {config.n}, --seed "
                             f"{config.seed}) were used to fit or calibrate this detector; use --n "
                             f"{meta.get('n_eval')} or fewer with --seed {meta.get('seed')}: its held-out images")
