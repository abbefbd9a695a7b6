"""Detection metrics (scikit-learn's ROC machinery underneath)."""

from __future__ import annotations

import numpy as np

from ..errors import OptionError


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Detection rate when the threshold lets through at most ``fpr`` of the clean images.

    The threshold is the clean scores' (1 - fpr) quantile, so exactly what a deployed
    detector calibrated on these clean images would flag.
    """
    clean = scores[labels == 0]
    adv = scores[labels == 1]
    if len(clean) == 0 or len(adv) == 0:
        return float("nan")
    threshold = threshold_for_fpr(clean, fpr)
    return float((adv > threshold).mean())


def threshold_for_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold t with mean(clean_scores > t) <= fpr."""
    if not 0 <= fpr < 1:
        raise OptionError(f"fpr must lie in [0, 1), got {fpr}")
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    k = int(np.floor(fpr * len(s)))  # clean images allowed above the threshold
    return float(s[len(s) - 1 - k]) if k < len(s) else float(s[0])


def fpr_per_class(scores: np.ndarray, classes: np.ndarray, threshold: float,
                  names: tuple[str, ...] | list[str] | None = None) -> dict[str, float]:
    """Share of clean images flagged, per (predicted) class: false positives that pile up on one class
    hurt that class's users even when the overall rate is on target."""
    scores, classes = np.asarray(scores, dtype=np.float64), np.asarray(classes).astype(int)
    out = {}
    for c in sorted(set(classes.tolist())):
        name = names[c] if names is not None and 0 <= c < len(names) else str(c)
        out[name] = float((scores[classes == c] > threshold).mean())
    return out


def detection_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    pred = scores > threshold
    both = len(set(labels.tolist())) == 2
    return {
        "n_clean": int((labels == 0).sum()),
        "n_adversarial": int((labels == 1).sum()),
        "accuracy": float((pred == labels).mean()),
        "roc_auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "tpr_at_5fpr": tpr_at_fpr(labels, scores, 0.05),
        "tpr_at_1fpr": tpr_at_fpr(labels, scores, 0.01),
        "tpr_at_threshold": float(pred[labels == 1].mean()) if (labels == 1).any() else float("nan"),
        "fpr_at_threshold": float(pred[labels == 0].mean()) if (labels == 0).any() else float("nan"),
    }
