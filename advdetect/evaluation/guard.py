"""Evaluation never reuses the detector's images: which images a detector was fitted and
calibrated on, the test images it never saw (:func:`unseen_images`), and the check that an
evaluation's images are none of the others."""

from __future__ import annotations

from typing import Any

from ..data import CIFAR10_SIZES, seeded_order, select, shared_images, subset_record
from ..errors import AdvDetectError
from ..sources import Selection
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


def unseen_images(images: Selection, n: int, seed: int, meta: dict[str, Any]) -> Selection:
    """``n`` of ``images`` in the seeded order of ``seed``, passing over those the detector was fitted or
    calibrated on (``meta``: its detector.json); the first ``n`` of that order when it used none of them.

    A detector calibrated on test images used some of the first ones in its own seeded order (its held-out
    images come first, then its calibration images), so an evaluation with the same seed would otherwise
    meet them; the record says how many were passed over (``reserved_skipped``).
    """
    reserved = reserved_images(meta)
    first = select(images, n, seed)
    if not reserved or not shared_images(reserved, first.identify()):
        return first
    order = seeded_order(len(images), seed).tolist()
    kept: list[int] = []  # positions in the source, in the seeded order
    looked = 0  # how many of that order were looked at
    step = max(n, 1024)
    for start in range(0, len(order), step):
        chunk = Selection(images.source, [images.positions[s] for s in order[start:start + step]], images.record)
        record = chunk.identify()
        shared = shared_images(reserved, record)
        ids = record.get("ids") or [None] * len(chunk)
        for position, image_id in zip(chunk.positions, ids):
            looked += 1
            if position not in shared and image_id not in shared:
                kept.append(position)
                if len(kept) == n:
                    return Selection(images.source, kept, dict(images.record, seed=seed, offset=0,
                                                               reserved_skipped=looked - n))
    raise AdvDetectError(f"--n {n}: only {len(kept)} of the {len(images)} test images were not used to fit or "
                         f"calibrate this detector; use --n {len(kept)} or fewer")
