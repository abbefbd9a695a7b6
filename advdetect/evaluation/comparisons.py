"""Fit on the first half, score the second: the transfer matrix, the baselines, the mask methods.

Each comparison fits a fresh discriminator (the detector's own network) on the images of the
first half of the evaluation set and scores it on the second half, so every method, attack and
heatmap is judged on the same images by the same learner. Clean maps count for correctly
classified images, adversarial ones for successful attacks (:mod:`advdetect.splits`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..detector import MaskDetector, tpr_at_fpr
from ..masks import MaskConfig, make_explainer
from ..recovery import PAPER_RECOVERY, recover
from ..splits import Split
from .config import EvaluateConfig
from .heatmaps import HEATMAP_METHODS, heatmaps, unavailable


def fit_discriminator(fit_clean: torch.Tensor, fit_adv: torch.Tensor, seed: int) -> MaskDetector:
    """A discriminator fitted on clean (0) and adversarial (1) maps, with the comparisons' settings."""
    X = torch.cat([fit_clean, fit_adv])
    y = torch.cat([torch.zeros(len(fit_clean)), torch.ones(len(fit_adv))])
    return MaskDetector(seed=seed, epochs=30, patience=5).fit(X, y)


def score_discriminator(detector: MaskDetector, clean: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    """ROC-AUC and TPR at 5% FPR of ``detector`` on clean and adversarial maps."""
    from sklearn.metrics import roc_auc_score

    if len(adv) == 0 or len(clean) == 0:
        return {"roc_auc": float("nan"), "tpr_at_5fpr": float("nan"), "n_clean": len(clean), "n_adversarial": len(adv)}
    scores = np.r_[detector.decision_function(clean), detector.decision_function(adv)]
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    return {"roc_auc": float(roc_auc_score(labels, scores)), "tpr_at_5fpr": tpr_at_fpr(labels, scores, 0.05),
            "n_clean": int(len(clean)), "n_adversarial": int(len(adv))}


def halves(split: Split, half: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fit clean, fit adversarial, evaluation clean, evaluation adversarial) maps of ``split``, by image index."""
    index = torch.arange(len(split.labels))
    fit, held_out = index < half, index >= half
    correct, successful = split.correct, split.successful
    return (split.masks_clean[fit & correct], split.masks_adv[fit & successful],
            split.masks_clean[held_out & correct], split.masks_adv[held_out & successful])


def fit_and_score(split: Split, half: int, seed: int) -> dict[str, float]:
    """A discriminator fitted on the first half of ``split``'s maps and scored on the second (NaN if too few)."""
    fit_clean, fit_adv, held_clean, held_adv = halves(split, half)
    if min(len(fit_clean), len(fit_adv), len(held_clean), len(held_adv)) < 2:
        return {"roc_auc": float("nan"), "tpr_at_5fpr": float("nan")}
    return score_discriminator(fit_discriminator(fit_clean, fit_adv, seed), held_clean, held_adv)


def transfer_matrix(splits: list[Split], half: int, seed: int) -> dict[str, Any]:
    """Discriminator fitted on attack A's first half, scored on attack B's second half (the detector's masks)."""
    rows: dict[str, dict[str, Any]] = {}
    for trained in splits:
        fit_clean, fit_adv, _, _ = halves(trained, half)
        if len(fit_adv) < 2 or len(fit_clean) < 2:
            continue
        detector = fit_discriminator(fit_clean, fit_adv, seed)
        rows[trained.name] = {}
        for tested in splits:
            _, _, held_clean, held_adv = halves(tested, half)
            rows[trained.name][tested.name] = score_discriminator(detector, held_clean, held_adv)
    return {"trained_on": list(rows), "tested_on": [split.name for split in splits], "matrix": rows,
            "note": "ROC-AUC and TPR at 5% FPR of a discriminator fitted on the fit half of the row's attack, "
                    "on the evaluation half of the column's attack"}


def baselines(wrapper, splits: list[Split], config: EvaluateConfig,
              timed: Callable[[str, float], None]) -> dict[str, Any]:
    """The same discriminator and halves on captum heatmaps, the raw image, and our masks.

    ``timed(stage, start)`` records each method's time."""
    limit = config.n_baseline
    half = limit // 2
    results: dict[str, dict[str, Any]] = {}
    notes = [why for why in (unavailable(wrapper, m) for m in config.baselines) if why]
    methods = ["masks", *(m for m in config.baselines if not unavailable(wrapper, m))]
    for method in methods:
        start = time.time()
        clean_maps = None
        results[method] = {}
        for split in splits:
            subset = split.first(limit)
            if method != "masks":
                if clean_maps is None:  # every split holds the same clean images
                    clean_maps = heatmaps(wrapper, subset.clean, method, targets=subset.clean_pred)
                subset = subset.with_masks(clean_maps, heatmaps(wrapper, subset.adv, method,
                                                                targets=subset.adv_pred))
            results[method][split.name] = fit_and_score(subset, half, config.seed)
        timed(f"baseline_{method}", start)
    winners = {}
    for split in splits:
        scored = [(results[m][split.name]["roc_auc"], m) for m in methods
                  if not np.isnan(results[m][split.name]["roc_auc"])]
        winners[split.name] = max(scored)[1] if scored else None
    if "guided_backprop" in config.baselines and not any(isinstance(m, torch.nn.ReLU) for m in wrapper.modules()):
        notes.append("the classifier has no nn.ReLU modules, so captum's guided backprop reduces to the plain "
                     "gradient (the same map as gradient saliency)")
    return {"methods": methods, "results": results, "winner": winners, "notes": notes,
            "note": "ROC-AUC / TPR at 5% FPR on the evaluation half of the first n_baseline images; the same "
                    "discriminator (MaskAlexNet) is fitted per method and attack on the fit half"}


def method_config(name: str, detector_config: MaskConfig) -> MaskConfig:
    """The masks compared for ``name``: the detector's own, or that method's deletion masks."""
    if name == "meaningful":
        return detector_config
    if name == "extremal":
        return MaskConfig(method="extremal", game="delete", area=0.1, seed=detector_config.seed)
    return MaskConfig(method="robust", seed=detector_config.seed)


def method_comparison(wrapper, detector_config: MaskConfig, splits: list[Split],
                      config: EvaluateConfig) -> dict[str, Any]:
    """Detection (same discriminator, same halves) and recovery of each mask method on the first n_methods images."""
    limit = config.n_methods
    half = limit // 2
    names = list(dict.fromkeys(["meaningful", *config.methods]))
    out: dict[str, Any] = {"methods": names, "configs": {}, "results": {}, "masks_per_second": {}}
    for name in names:
        mask_config = method_config(name, detector_config)
        explainer = make_explainer(wrapper, mask_config)
        out["configs"][name] = mask_config.to_dict()
        start, count = time.time(), 0
        clean_masks = explainer.attribute(splits[0].clean[:limit].to(wrapper.device)).masks.cpu()
        count += limit
        out["results"][name] = {}
        for split in splits:
            subset = split.first(limit)
            subset = subset.with_masks(clean_masks, explainer.attribute(subset.adv.to(wrapper.device)).masks.cpu())
            count += limit
            row = fit_and_score(subset, half, config.seed)
            pick = (torch.arange(len(subset.labels)) >= half) & subset.successful  # evaluation half's attacks
            top5 = recover(wrapper, subset.adv[pick].to(wrapper.device), subset.masks_adv[pick], PAPER_RECOVERY,
                           mask_config).top5
            clean_label = subset.clean_pred[pick]
            row["recovery_top1"] = float((top5[:, 0] == clean_label).float().mean()) if len(top5) else float("nan")
            row["recovery_top5"] = float((top5 == clean_label[:, None]).any(1).float().mean()) if len(top5) \
                else float("nan")
            out["results"][name][split.name] = row
        out["masks_per_second"][name] = round(count / max(time.time() - start, 1e-9), 2)
    out["note"] = (f"first {limit} test images: discriminators fitted on images 0..{half - 1}, evaluated on "
                   f"{half}..{limit - 1}; recovery applies each method's mask to the evaluation half's successful "
                   "adversarial images (top-1/top-5 of the clean prediction)")
    return out
