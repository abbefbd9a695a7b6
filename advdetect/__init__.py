"""advdetect: detect adversarial images from their meaningful-perturbation masks.

The main entry points, imported lazily so that ``import advdetect`` stays cheap:

* :func:`explain` - one image's mask and figure;
* :class:`MeaningfulPerturbation`, :class:`MaskConfig` - masks for batches of images;
* :class:`MaskDetector` - the clean-vs-adversarial discriminator;
* :class:`Guard` - a trained detector loaded once: ``check``, ``recover``, ``explain`` on batches;
* :func:`load_model`, :func:`load_cifar10`, :class:`DataSpec` and :func:`images_for` (your own image
  folder, streamed shard by shard).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "explain": "advdetect.explanation",
    "MaskConfig": "advdetect.masks",
    "MeaningfulPerturbation": "advdetect.masks",
    "compute_masks": "advdetect.masks",
    "MaskDetector": "advdetect.detector",
    "load_detector": "advdetect.detector",
    "load_model": "advdetect.models",
    "load_cifar10": "advdetect.data",
    "DataSpec": "advdetect.data",
    "images_for": "advdetect.data",
    "AdvDetectError": "advdetect.errors",
    "Guard": "advdetect.guard",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'advdetect' has no attribute {name!r}")
