"""The detector's score combined with the classifier's own confidence (issue "adaptive attacker", defenses).

Attacks leave the classifier's log-probability gap between its top two classes abnormal in both
directions: minimal-perturbation attacks (DeepFool, CW) stop just past the decision boundary (a
gap near 0), iterative L-inf attacks (BIM, PGD) drive it far above what clean images reach. The
mask detector sees the target probability in its confidence planes, but on a linear [0, 1] scale
where 0.999 and 0.999999 look the same. :class:`MarginCombination` is a logistic regression over

    (detector score s, h, h^2),   h = log(1 + gap),   gap = log p_top1 - log p_top2 (= the logit gap)

fitted on labelled scores and calibrated, like the detector, to a false-positive rate on clean
images it never fitted on. It is differentiable (:meth:`MarginCombination.torch_decision`), so an
adaptive attacker can aim at the combination itself (:class:`CombinedDetector`, :class:`WithGap`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .metrics import threshold_for_fpr

FORMAT = "advdetect.margin-combination/1"


def log_prob_gap(logits: torch.Tensor) -> torch.Tensor:
    """N: the classifier's log-probability gap between its top two classes (differentiable)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"log_prob_gap needs N x K logits with K >= 2, got shape {tuple(logits.shape)}")
    top = logits.float().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def _features(scores: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    h = torch.log1p(gaps.float().clamp_min(0))
    return torch.stack([scores.float(), h, h * h], 1)


class MarginCombination:
    """Logistic regression over (detector score, log1p(gap), log1p(gap)^2), calibrated to ``fpr``.

    scikit-learn style: :meth:`fit` returns self; ``coef_``, ``intercept_``, ``mean_``, ``scale_``
    (feature standardisation) and, after :meth:`calibrate`, ``threshold_`` and ``calibration_fpr_`` are learned.
    """

    def __init__(self, fpr: float = 0.05, C: float = 1.0) -> None:
        self.fpr = fpr
        self.C = C

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"fpr": self.fpr, "C": self.C}

    def fit(self, scores: Any, gaps: Any, y: Any) -> MarginCombination:
        """``scores``: the detector's decision values; ``gaps``: :func:`log_prob_gap`; ``y``: 1 = adversarial.
        Classes are weighted to balance."""
        from sklearn.linear_model import LogisticRegression

        if not 0 < self.fpr < 1:
            raise ValueError(f"fpr must lie in (0, 1), got {self.fpr}")
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C}")
        X = _features(torch.as_tensor(scores), torch.as_tensor(gaps)).double()
        y = np.asarray(y).astype(int)
        if len(X) != len(y) or set(y.tolist()) != {0, 1}:
            raise ValueError("fit needs one label per score and both classes (0 clean, 1 adversarial)")
        self.mean_, self.scale_ = X.mean(0), X.std(0).clamp_min(1e-6)
        model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000)
        model.fit(((X - self.mean_) / self.scale_).numpy(), y)
        self.coef_ = torch.as_tensor(model.coef_[0], dtype=torch.float64)
        self.intercept_ = float(model.intercept_[0])
        return self

    def torch_decision(self, scores: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        """The combined score (a logit; higher is more adversarial), differentiable, on ``scores``' device."""
        if not hasattr(self, "coef_"):
            raise RuntimeError("this MarginCombination is not fitted yet; call fit(scores, gaps, y)")
        device = scores.device
        X = _features(scores, gaps.to(device))
        mean, scale = self.mean_.float().to(device), self.scale_.float().to(device)
        return ((X - mean) / scale) @ self.coef_.float().to(device) + self.intercept_

    def decision_function(self, scores: Any, gaps: Any) -> np.ndarray:
        with torch.no_grad():
            return self.torch_decision(torch.as_tensor(scores).float(), torch.as_tensor(gaps).float()).cpu().numpy()

    def calibrate(self, clean_scores: Any, clean_gaps: Any, fpr: float | None = None) -> MarginCombination:
        """Set ``threshold_`` so that at most ``fpr`` of these clean images are flagged."""
        fpr = self.fpr if fpr is None else fpr
        combined = self.decision_function(clean_scores, clean_gaps)
        if len(combined) == 0:
            raise ValueError("calibration needs at least one clean image")
        self.threshold_ = threshold_for_fpr(combined, fpr)
        self.calibration_fpr_ = float(fpr)
        return self

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "threshold_"):
            raise RuntimeError("fit and calibrate the combination before saving it")
        return {"format": FORMAT, "params": self.get_params(), "coef": self.coef_.tolist(),
                "intercept": self.intercept_, "mean": self.mean_.tolist(), "scale": self.scale_.tolist(),
                "threshold": self.threshold_, "calibration_fpr": self.calibration_fpr_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MarginCombination:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a margin combination (expected format {FORMAT!r})")
        try:
            out = cls(**{k: float(v) for k, v in data["params"].items() if k in ("fpr", "C")})
            out.coef_ = torch.tensor([float(v) for v in data["coef"]], dtype=torch.float64)
            out.mean_ = torch.tensor([float(v) for v in data["mean"]], dtype=torch.float64)
            out.scale_ = torch.tensor([float(v) for v in data["scale"]], dtype=torch.float64)
            out.intercept_, out.threshold_ = float(data["intercept"]), float(data["threshold"])
            out.calibration_fpr_ = float(data.get("calibration_fpr", out.fpr))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed margin combination: {err}") from None
        if not (out.coef_.numel() == out.mean_.numel() == out.scale_.numel() == 3):
            raise ValueError("malformed margin combination: three features expected")
        numbers = torch.cat([out.coef_, out.mean_, out.scale_, torch.tensor([out.intercept_, out.threshold_])])
        if not bool(torch.isfinite(numbers).all()) or bool((out.scale_ <= 0).any()):
            raise ValueError("malformed margin combination: values must be finite and scales positive")
        return out


class WithGap(nn.Module):
    """``maps(x)`` with one more constant plane holding the classifier's :func:`log_prob_gap` on ``x``."""

    def __init__(self, maps: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.maps, self.model = maps, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_gap_plane(self.maps(x), self.model(x))


def with_gap_plane(maps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``maps`` (N x C x H x W) with a constant plane of the :func:`log_prob_gap` of ``logits`` appended."""
    gap = log_prob_gap(logits).to(maps.device, maps.dtype)
    return torch.cat([maps, gap[:, None, None, None].expand(-1, 1, *maps.shape[-2:])], 1)


class _CombinedNet(nn.Module):
    def __init__(self, network: nn.Module, combination: MarginCombination) -> None:
        super().__init__()
        self.network, self.combination = network, combination

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.combination.torch_decision(self.network(maps[:, :-1]), maps[:, -1, 0, 0])


class CombinedDetector:
    """A fitted :class:`~advdetect.detector.MaskDetector` and a calibrated :class:`MarginCombination`, seen
    as one detector over :class:`WithGap` maps (``decision_function``, ``threshold_``, ``_fitted()``):
    what the adaptive attack in :mod:`advdetect.evaluation.adaptive` attacks and judges."""

    def __init__(self, detector: Any, combination: MarginCombination) -> None:
        if not hasattr(combination, "threshold_"):
            raise ValueError("calibrate the margin combination first")
        self.detector, self.combination = detector, combination
        self.network_ = _CombinedNet(detector._fitted(), combination)
        self.threshold_ = combination.threshold_

    def _fitted(self) -> nn.Module:
        return self.network_

    def input_names(self) -> tuple[str, ...]:
        return self.detector.input_names()

    def decision_function(self, maps: torch.Tensor) -> np.ndarray:
        device = next(self.network_.network.parameters()).device
        with torch.no_grad():
            return torch.cat([self.network_(maps[i:i + 1024].to(device)).float().cpu()
                              for i in range(0, len(maps), 1024)]).numpy()

