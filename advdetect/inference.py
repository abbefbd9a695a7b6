"""``detect`` and ``recover`` on image files, with a trained detector."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .detector import load_detector
from .errors import AdvDetectError
from .imageio import load_image
from .masks import MaskConfig, make_explainer
from .models import ModelWrapper, resolve_model


def _setup(detector_dir: str | os.PathLike, model: str | ModelWrapper | None, device: str):
    from .storage import read_json

    meta_path = os.path.join(detector_dir, "detector.json")
    if not os.path.isfile(meta_path):
        raise AdvDetectError(f"{detector_dir}: not a detector (no detector.json); train one with `advdetect train`")
    wrapper = resolve_model(model or read_json(meta_path).get("classifier", {}).get("name", ""), device)
    detector, meta = load_detector(detector_dir, classifier=wrapper.info.identity(), device=str(wrapper.device))
    return wrapper, detector, meta, MaskConfig.from_dict(meta["mask_config"])


def recovery_config(meta: dict[str, Any], config: MaskConfig) -> MaskConfig:
    """The deletion masks a detector's recovery uses (recorded in detector.json since preservation detectors)."""
    return MaskConfig.from_dict(meta["recovery_config"]) if "recovery_config" in meta else config.for_recovery()


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
    wrapper, detector, meta, config = _setup(detector_dir, model, device)
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
                  out: str | os.PathLike | None = None, device: str = "auto") -> dict[str, Any]:
    """The image's prediction, its mask applied back, and the recovered top-1 / top-5."""
    from .plots import explanation_figure

    wrapper, detector, meta, config = _setup(detector_dir, model, device)
    x, notes = _load_batch([path], wrapper)
    detection = make_explainer(wrapper, config).attribute(x)
    rec_config = recovery_config(meta, config)
    explainer = make_explainer(wrapper, rec_config)
    result = detection if rec_config == config else explainer.attribute(x)
    with torch.no_grad():
        perturbed = explainer.perturb(x, result.masks)
    probs = wrapper.logits(torch.cat([x, perturbed])).softmax(1).cpu()
    before, after = probs[0], probs[1]
    classes = wrapper.info.classes
    top5 = after.topk(min(5, len(classes))).indices.tolist()
    score = float(detector.decision_function(detection.masks.cpu())[0])
    if out is not None:
        explanation_figure(x[0].cpu(), result.masks[0].cpu(), perturbed[0].cpu(), before, after, classes,
                           int(result.targets[0]), out, title="recovery: the image's mask applied back")
    return {
        "image": str(path), "prediction": classes[int(before.argmax())], "confidence": float(before.max()),
        "score": score, "adversarial": score > detector.threshold_,
        "recovered": classes[top5[0]], "recovered_top5": [{"class": classes[i], "probability": float(after[i])}
                                                         for i in top5],
        "figure": str(out) if out else None, "notes": notes[0],
    }
