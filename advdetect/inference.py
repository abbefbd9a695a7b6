"""A deployed detector: loading it with its classifier, and ``detect`` and ``recover`` on image files and folders
(batched, streamed one result per image)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .detector import MaskDetector, load_detector
from .detector.inputs import maps_for_result
from .errors import AdvDetectError
from .imageio import load_image
from .fastpath import FastPath, has_fast_path, load_fast_path
from .masks import Explainer, MaskConfig, MaskResult, make_explainer
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
    fast: FastPath | None = None  # the amortized-mask detector, when the detector has one and it is used

    @property
    def path(self) -> str:
        """Which detector judges: ``"fast"`` (amortized masks) or ``"exact"`` (optimised masks)."""
        return "fast" if self.fast is not None else "exact"

    @property
    def judge(self) -> MaskDetector:
        """The detector whose scores give the verdicts (combined with the classifier's gap when the fast
        path has a margin combination)."""
        return self.fast.detector if self.fast is not None else self.detector

    @property
    def threshold(self) -> float:
        """The calibrated threshold the verdicts' scores are compared with."""
        return self.fast.threshold if self.fast is not None else self.detector.threshold_

    @property
    def calibration_fpr(self) -> float:
        return self.fast.calibration_fpr if self.fast is not None else self.detector.calibration_fpr_


@dataclass
class Judgement:
    """A batch's predictions, the masks the detector read, and its verdicts."""

    probs: torch.Tensor  # N x classes, on the CPU
    masks: MaskResult  # what the detector read (amortized or optimised)
    scores: torch.Tensor  # N adversarial scores
    flagged: torch.Tensor  # N bool: score above the threshold


def load_deployment(detector_dir: str | os.PathLike, model: str | ModelWrapper | None = None,
                    device: str = "auto", recovery_method: str | None = None, exact: bool = False) -> Deployment:
    """Load the detector in ``detector_dir`` and its classifier (``model``, else the one it recorded), checked
    to belong together; ``recovery_method`` overrides the detector's recovery method. The detector's fast
    path (amortized masks, ``<dir>/fast/``) judges when it has one, unless ``exact``."""
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
    fast = load_fast_path(detector_dir, wrapper) if has_fast_path(detector_dir) and not exact else None
    return Deployment(wrapper, detector, meta, mask_config, recovery_masks_config(meta, mask_config),
                      recovery_config(meta, recovery_method), fast)


def judge(deployed: Deployment, x: torch.Tensor, explainer: Explainer | None = None) -> Judgement:
    """Predictions, masks, scores and verdicts for a batch ``x`` (on the model's device): with the fast path
    when the deployment has one, else with ``explainer`` (the detector's optimised masks)."""
    if deployed.fast is not None:  # with a margin combination, the image and its copies take one classifier call
        logits, maps, result, evidence = deployed.fast.verdict_inputs(x)
    else:
        logits = deployed.model.logits(x)
        explainer = explainer or make_explainer(deployed.model, deployed.mask_config)
        result = explainer.attribute(x)
        maps = maps_for_result(deployed.detector.input_names(), x, result)
    scores = torch.as_tensor(deployed.judge.decision_function(maps.cpu()))
    if deployed.fast is not None:
        scores = deployed.fast.combine(scores, x, logits, evidence)
    return Judgement(logits.softmax(1).cpu(), result, scores, scores > deployed.threshold)


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


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files ``paths`` name: files as given, folders searched recursively by extension (sorted)."""
    from .data import IMAGE_SUFFIXES

    if not paths:
        raise AdvDetectError("give at least one image file or folder")
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            inside = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise AdvDetectError(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(inside)
        else:
            found.append(item)  # a missing or bad file is reported when it is read
    return found


def _batches(paths: list[Path], wrapper: ModelWrapper, batch_size: int,
             progress: bool) -> Iterator[tuple[list[Path], torch.Tensor, list[list[str]], list[dict[str, str]]]]:
    """Readable images in batches (with their notes), and the unreadable ones of each batch as errors."""
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), unit="img", desc="images", disable=not progress or len(paths) < 2) as bar:
        for start in range(0, len(paths), batch_size):
            chunk, loaded, errors = paths[start:start + batch_size], [], []
            for path in chunk:
                try:
                    loaded.append(load_image(path, size=wrapper.info.input_size, channels=len(wrapper.info.mean)))
                except AdvDetectError as exc:
                    errors.append({"image": str(path), "error": str(exc)})
            x = torch.stack([item.as_float() for item in loaded]).to(wrapper.device) if loaded else None
            if x is not None:
                wrapper.check_input(x)
            bar.update(len(chunk))
            yield [item.path for item in loaded], x, [item.notes for item in loaded], errors


def iter_detections(paths: Sequence[str | os.PathLike], deployed: Deployment, batch_size: int = 64,
                    progress: bool = False) -> Iterator[dict[str, Any]]:
    """Label, adversarial score and verdict for each image, one dict per image as soon as its batch is judged;
    an unreadable image gives ``{"image", "error"}`` instead."""
    wrapper = deployed.model
    explainer = make_explainer(wrapper, deployed.mask_config) if deployed.fast is None else None
    for files, x, notes, errors in _batches(find_images(paths), wrapper, batch_size, progress):
        yield from errors
        if x is None:
            continue
        verdict = judge(deployed, x, explainer)
        for i, path in enumerate(files):
            label = int(verdict.probs[i].argmax())
            yield {"image": str(path), "label": wrapper.info.classes[label], "label_index": label,
                   "confidence": float(verdict.probs[i, label]), "score": float(verdict.scores[i]),
                   "adversarial": bool(verdict.flagged[i]), "path": deployed.path, "notes": notes[i]}


def detect_images(paths: Sequence[str | os.PathLike], detector_dir: str | os.PathLike,
                  model: str | ModelWrapper | None = None, device: str = "auto", exact: bool = False) -> dict[str, Any]:
    """Label, adversarial score and verdict for each image (files, or folders searched recursively);
    with the detector's fast path when it has one, unless ``exact``."""
    deployed = load_deployment(detector_dir, model, device, exact=exact)
    rows = list(iter_detections(paths, deployed))
    return {"detector": str(detector_dir), "threshold": deployed.threshold,
            "calibration_fpr": deployed.calibration_fpr, "path": deployed.path, "images": rows}


def iter_recoveries(paths: Sequence[str | os.PathLike], deployed: Deployment, figures: str | os.PathLike | None = None,
                    batch_size: int = 64, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Each image's prediction and verdict, and the recovered top-1 / top-5, one dict per image (an
    unreadable image gives ``{"image", "error"}``). ``figures``: a before/after figure per image, at that
    path for a single image, else ``<figures>/<n>-<name>.png``.

    A flagged image's prediction is ruled out of the recovered ranking (unless the detector's
    recovery settings say otherwise).
    """
    wrapper = deployed.model
    explainers = recovery_explainers(deployed)
    files_all = find_images(paths)
    count = 0
    for files, x, notes, errors in _batches(files_all, wrapper, batch_size, progress):
        yield from errors
        if x is None:
            continue
        verdict, rec, shown = recover_batch(deployed, x, explainers)
        before, predicted = verdict.probs, verdict.probs.argmax(1)
        for i, path in enumerate(files):
            figure = None
            score, flagged = float(verdict.scores[i]), bool(verdict.flagged[i])
            if figures is not None:
                figure = Path(figures) if len(files_all) == 1 else Path(figures) / f"{count:05d}-{path.stem}.png"
                _recovery_figure(figure, deployed, x[i], shown[i], rec.images[i], before[i], rec.probs[i],
                                 int(predicted[i]), flagged, score, int(rec.top5[i, 0]))
            count += 1
            yield _recovery_row(path, deployed, before[i], rec.probs[i], rec.top5[i].tolist(), score, flagged, figure,
                                notes[i])


def recovery_explainers(deployed: Deployment) -> tuple[Explainer | None, Explainer | None]:
    """The mask methods :func:`recover_batch` needs: the detector's optimised masks (none on the fast path)
    and the deletion masks mask recovery applies (none when those are the detector's own)."""
    config, rec_config = deployed.mask_config, deployed.recovery_masks_config
    detect = make_explainer(deployed.model, config) if deployed.fast is None else None
    reuse = deployed.fast is None and rec_config == config
    apply = make_explainer(deployed.model, rec_config) if deployed.recovery_config.method == "mask" and not reuse \
        else None
    return detect, apply


def recover_batch(deployed: Deployment, x: torch.Tensor,
                  explainers: tuple[Explainer | None, Explainer | None] | None = None) -> tuple[Judgement, Any, torch.Tensor]:
    """Verdicts for a batch, the recovered labels (:class:`~advdetect.recovery.Recovery`) and the masks shown:
    the deletion masks applied back (optimised, also on the fast path) or, for blur recovery, those the
    detector read. ``explainers``: :func:`recovery_explainers` of the deployment (made here when not given)."""
    detect, apply = explainers if explainers is not None else recovery_explainers(deployed)
    verdict = judge(deployed, x, detect)
    shown = apply.attribute(x).masks if apply is not None else verdict.masks.masks
    rec = recover(deployed.model, x, shown, deployed.recovery_config, mask_config=deployed.recovery_masks_config,
                  predicted=verdict.probs.argmax(1), flagged=verdict.flagged)
    return verdict, rec, shown


def _recovery_row(path: Path, deployed: Deployment, before: torch.Tensor, after: torch.Tensor, top5: list[int],
                  score: float, flagged: bool, figure: Path | None, notes: list[str]) -> dict[str, Any]:
    classes, settings = deployed.model.info.classes, deployed.recovery_config
    predicted = int(before.argmax())
    ruled_out = predicted if settings.exclude_flagged and flagged else None
    return {
        "image": str(path), "prediction": classes[predicted], "confidence": float(before.max()),
        "score": score, "adversarial": flagged, "method": settings.method,
        "ruled_out": classes[ruled_out] if ruled_out is not None else None,
        "recovered": classes[top5[0]], "recovered_top5": [{"class": classes[i], "probability": float(after[i])}
                                                         for i in top5],
        "figure": str(figure) if figure else None, "notes": notes,
    }


def _recovery_figure(path: Path, deployed: Deployment, image: torch.Tensor, mask: torch.Tensor,
                     recovered: torch.Tensor, before: torch.Tensor, after: torch.Tensor, predicted: int,
                     flagged: bool, score: float, top1: int) -> None:
    from .plots import explanation_figure

    classes, settings = deployed.model.info.classes, deployed.recovery_config
    path.parent.mkdir(parents=True, exist_ok=True)
    how = ("the image's deletion mask applied back" if settings.method == "mask"
           else f"light blur (sigma {settings.sigma:g} px)")
    ruled_out = settings.exclude_flagged and flagged
    title = f"recovery: {how}" + (f", flagged label {classes[predicted]} ruled out" if ruled_out else "")
    mask_title = ("deletion mask applied back (deleted regions)" if settings.method == "mask"
                  else f"mask the detector read (score {score:+.2f})")
    explanation_figure(image.cpu(), mask.cpu(), recovered, before, after, classes, predicted, path, title=title,
                       panel_titles=(f"input: {classes[predicted]} ({before[predicted]:.1%})", mask_title,
                                     f"recovered input: {classes[top1]} ({after[top1]:.1%})"))


def recover_image(path: str | os.PathLike, detector_dir: str | os.PathLike, model: str | ModelWrapper | None = None,
                  out: str | os.PathLike | None = None, device: str = "auto", method: str | None = None,
                  exact: bool = False) -> dict[str, Any]:
    """One image's prediction, verdict and recovered top-1 / top-5 (``method``: the detector's by default;
    the verdict from the fast path when the detector has one, unless ``exact``)."""
    deployed = load_deployment(detector_dir, model, device, recovery_method=method, exact=exact)
    row = next(iter_recoveries([path], deployed, figures=out))
    if "error" in row:
        raise AdvDetectError(row["error"])
    return row
