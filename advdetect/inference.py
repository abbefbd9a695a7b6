"""A deployed detector: loading it with its classifier, and ``detect`` and ``recover`` on image files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .detector import MaskDetector, load_detector
from .errors import AdvDetectError
from .imageio import load_image
from .masks import MaskConfig, make_explainer
from .models import ModelWrapper, load_recorded_model, resolve_model
from .recovery import RecoveryConfig, recover


@dataclass
class Deployment:
    """A trained detector with the classifier it guards and the settings it was trained with."""

    model: ModelWrapper
    detector: MaskDetector
    meta: dict[str, Any]  # detector.json
    mask_config: MaskConfig  # the masks the detector reads
    recovery_masks_config: MaskConfig  # the deletion masks the "mask" recovery applies
    recovery_config: RecoveryConfig  # how flagged images get their label back


def load_deployment(detector_dir: str | os.PathLike, model: str | ModelWrapper | None = None,
                    device: str = "auto", recovery_method: str | None = None) -> Deployment:
    """Load the detector in ``detector_dir`` and its classifier (``model``, else the one it recorded), checked
    to belong together; ``recovery_method`` overrides the detector's recovery method."""
    from .storage import read_json

    meta_path = os.path.join(detector_dir, "detector.json")
    if not os.path.isfile(meta_path):
        raise AdvDetectError(f"{detector_dir}: not a detector (no detector.json); train one with `advdetect train`")
    recorded = read_json(meta_path).get("classifier")
    if model is None and not isinstance(recorded, dict):
        raise AdvDetectError(f"{meta_path}: no classifier recorded; the file is damaged, retrain the detector")
    wrapper = resolve_model(model, device) if model is not None else \
        load_recorded_model(recorded, device, f"detector {detector_dir}")
    detector, meta = load_detector(detector_dir, classifier=wrapper.info.identity(), device=str(wrapper.device))
    mask_config = MaskConfig.from_dict(meta["mask_config"])
    return Deployment(wrapper, detector, meta, mask_config, recovery_masks_config(meta, mask_config),
                      recovery_config(meta, recovery_method))


def recovery_masks_config(meta: dict[str, Any], config: MaskConfig) -> MaskConfig:
    """The deletion masks a detector's recovery uses (recorded in detector.json since preservation detectors)."""
    return MaskConfig.from_dict(meta["recovery_config"]) if "recovery_config" in meta else config.for_recovery()


def recovery_config(meta: dict[str, Any], method: str | None = None) -> RecoveryConfig:
    """The detector's recovery method (detector.json's "recovery"; older detectors get the default),
    with ``method`` overriding it."""
    try:
        settings = RecoveryConfig.from_dict(meta.get("recovery", {}))
        return settings if method is None else replace(settings, method=method)
    except (TypeError, ValueError) as exc:
        raise AdvDetectError(f"bad recovery settings: {exc}") from exc


def _load_batch(paths: Sequence[str | os.PathLike], wrapper: ModelWrapper) -> tuple[torch.Tensor, list[list[str]]]:
    if not paths:
        raise AdvDetectError("give at least one image file")
    loaded = [load_image(p, size=wrapper.info.input_size) for p in paths]
    x = torch.stack([item.as_float() for item in loaded]).to(wrapper.device)
    wrapper.check_input(x)
    return x, [item.notes for item in loaded]


def detect_images(paths: Sequence[str | os.PathLike], detector_dir: str | os.PathLike,
                  model: str | ModelWrapper | None = None,
                  device: str = "auto") -> dict[str, Any]:
    """Label, adversarial score and verdict for each image."""
    deployed = load_deployment(detector_dir, model, device)
    wrapper, detector, config = deployed.model, deployed.detector, deployed.mask_config
    x, notes = _load_batch(paths, wrapper)
    probs = wrapper.logits(x).softmax(1).cpu()
    result = make_explainer(wrapper, config).attribute(x)
    scores = detector.decision_function(result.masks.cpu())
    rows = []
    for i, path in enumerate(paths):
        label = int(probs[i].argmax())
        rows.append({"image": str(path), "label": wrapper.info.classes[label], "label_index": label,
                     "confidence": float(probs[i, label]), "score": float(scores[i]),
                     "adversarial": bool(scores[i] > detector.threshold_), "notes": notes[i]})
    return {"detector": str(detector_dir), "threshold": detector.threshold_,
            "calibration_fpr": detector.calibration_fpr_, "images": rows}


def recover_image(path: str | os.PathLike, detector_dir: str | os.PathLike, model: str | ModelWrapper | None = None,
                  out: str | os.PathLike | None = None, device: str = "auto", method: str | None = None) -> dict[str, Any]:
    """The image's prediction and verdict, and the recovered top-1 / top-5 (``method``: the detector's by default).

    If the detector flags the image, its prediction is ruled out of the recovered ranking
    (unless the detector's recovery settings say otherwise).
    """
    from .plots import explanation_figure

    deployed = load_deployment(detector_dir, model, device, recovery_method=method)
    wrapper, detector, config = deployed.model, deployed.detector, deployed.mask_config
    settings, rec_config = deployed.recovery_config, deployed.recovery_masks_config
    x, notes = _load_batch([path], wrapper)
    detection = make_explainer(wrapper, config).attribute(x)
    score = float(detector.decision_function(detection.masks.cpu())[0])
    flagged = score > detector.threshold_
    shown = detection  # the mask drawn in the figure (the one applied back, for mask recovery)
    if settings.method == "mask" and rec_config != config:
        shown = make_explainer(wrapper, rec_config).attribute(x)
    before = wrapper.logits(x).softmax(1).cpu()[0]
    predicted = int(before.argmax())
    rec = recover(wrapper, x, shown.masks, settings, mask_config=rec_config,
                  predicted=torch.tensor([predicted]), flagged=torch.tensor([flagged]))
    after = rec.probs[0]
    ruled_out = predicted if settings.exclude_flagged and flagged else None
    classes = wrapper.info.classes
    top5 = rec.top5[0].tolist()
    if out is not None:
        how = ("the image's deletion mask applied back" if settings.method == "mask"
               else f"light blur (sigma {settings.sigma:g} px)")
        title = f"recovery: {how}" + (f", flagged label {classes[ruled_out]} ruled out" if ruled_out is not None
                                      else "")
        mask_title = ("deletion mask applied back (deleted regions)" if settings.method == "mask"
                      else f"mask the detector read (score {score:+.2f})")
        explanation_figure(x[0].cpu(), shown.masks[0].cpu(), rec.images[0], before, after, classes, predicted, out,
                           title=title, panel_titles=(
                               f"input: {classes[predicted]} ({before[predicted]:.1%})", mask_title,
                               f"recovered input: {classes[top5[0]]} ({after[top5[0]]:.1%})"))
    return {
        "image": str(path), "prediction": classes[predicted], "confidence": float(before.max()),
        "score": score, "adversarial": flagged, "method": settings.method,
        "ruled_out": classes[ruled_out] if ruled_out is not None else None,
        "recovered": classes[top5[0]], "recovered_top5": [{"class": classes[i], "probability": float(after[i])}
                                                         for i in top5],
        "figure": str(out) if out else None, "notes": notes[0],
    }
