"""Saving and loading detectors: safetensors weights plus a JSON description.

``detector.json`` records the classifier's identity (name, weights sha256, input size),
the mask configuration, the calibrated threshold, the attacks trained on, the held-out
metrics and library versions; ``detector.safetensors`` holds the weights, whose sha256 is
in the JSON and checked on load.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdvDetectError
from ..masks import MaskConfig
from ..storage import load_tensors, read_json, save_tensors, write_json
from .detector import MaskDetector
from .inputs import channels_fit
from .network import MaskAlexNet

FORMAT = "advdetect.detector/1"
WEIGHTS = "detector.safetensors"
META = "detector.json"


def library_versions() -> dict[str, str]:
    import sklearn
    import torch
    import torchattacks
    import torchvision

    from .. import __version__

    return {"advdetect": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torchattacks": torchattacks.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save_detector(directory: str | os.PathLike, detector: MaskDetector, classifier: dict[str, Any],
                  mask_config: MaskConfig, extra: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    net = detector._fitted()
    digest = save_tensors(directory / WEIGHTS, dict(net.state_dict()))
    meta = {
        "format": FORMAT,
        "classifier": classifier,
        "params": detector.get_params(),
        "threshold": detector.threshold_,
        "calibration_fpr": detector.calibration_fpr_,
        "n_calibration": detector.n_calibration_,
        "mask_config": mask_config.to_dict(),
        "weights": WEIGHTS,
        "sha256": digest,
        "versions": library_versions(),
        **(extra or {}),
    }
    write_json(directory / META, meta)
    return directory


def load_detector(directory: str | os.PathLike, classifier: dict[str, Any] | None = None,
                  device: str = "cpu") -> tuple[MaskDetector, dict[str, Any]]:
    """Load a saved detector; with ``classifier`` (a ModelInfo.identity()) check it matches."""
    directory = Path(directory)
    if not (directory / META).is_file():
        raise AdvDetectError(f"{directory}: not a detector (no {META}); train one with `advdetect train`")
    meta = read_json(directory / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdvDetectError(f"{directory / META}: not an advdetect detector description")
    _check_meta(directory / META, meta)
    if classifier is not None:
        from ..models import check_same_classifier

        check_same_classifier(meta["classifier"], classifier, f"detector {directory}")
    state = load_tensors(directory / meta["weights"], sha256=meta["sha256"])
    params = dict(meta["params"], device=device)
    detector = MaskDetector(**params)
    first = state.get("features.0.weight")
    net = MaskAlexNet(in_channels=int(first.shape[1]) if first is not None and first.dim() == 4 else 1,
                      dropout=detector.dropout)
    if not channels_fit(detector.input_names(), net.features[0].in_channels):
        raise AdvDetectError(f"{directory / meta['weights']}: the discriminator takes {net.features[0].in_channels} "
                             f"channels, which its inputs ({detector.inputs}) cannot make; the file is damaged")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise AdvDetectError(f"{directory / meta['weights']}: weights do not fit the discriminator ({exc})") from exc
    detector.network_ = net.to(device).eval()
    detector.threshold_ = float(meta["threshold"])
    detector.calibration_fpr_ = float(meta["calibration_fpr"])
    detector.n_calibration_ = int(meta["n_calibration"])
    detector.classes_ = np.array([0, 1])
    return detector, meta


REQUIRED = {"classifier": dict, "params": dict, "threshold": (int, float), "calibration_fpr": (int, float),
            "n_calibration": int, "mask_config": dict, "weights": str, "sha256": str}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Every field load_detector reads is present with the right type; the weights sit beside it."""
    for key, kind in REQUIRED.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise AdvDetectError(f"{path}: field {key!r} is missing or malformed; the file is damaged, retrain "
                                 "the detector")
    if Path(meta["weights"]).name != meta["weights"]:
        raise AdvDetectError(f"{path}: weights must be a file beside it, got {meta['weights']!r}")
    try:
        MaskConfig.from_dict(meta["mask_config"])
        MaskDetector(**meta["params"])._check_params()
    except (TypeError, ValueError) as exc:
        raise AdvDetectError(f"{path}: bad mask_config or params ({exc})") from exc
