"""The detector's score combined with the classifier's own confidence (issue "adaptive attacker", defenses).

Attacks leave the classifier's log-probability gap between its top two classes abnormal in both
directions: minimal-perturbation attacks (DeepFool, CW) stop just past the decision boundary (a
gap near 0), iterative L-inf attacks (BIM, PGD) drive it far above what clean images reach. The
mask detector sees the target probability in its confidence planes, but on a linear [0, 1] scale
where 0.999 and 0.999999 look the same. :class:`MarginCombination` is a logistic regression over

    (detector score s, h, h^2),   h = log(1 + gap),   gap = log p_top1 - log p_top2 (= the logit gap)

fitted on labelled scores and calibrated, like the detector, to a false-positive rate on clean
images it never fitted on. It is differentiable (:meth:`MarginCombination.torch_decision`), so an
adaptive attacker can aim at the combination itself (:class:`CombinedDetector`, :class:`WithEvidence`).

``squeeze`` (blur scales in pixels, e.g. (0.75, 1.5)) adds feature squeezing's signal (Xu et al., NDSS
2018) with the blur the masks already use: for each scale, half the L1 distance between the classifier's
softmax on the image and on its Gaussian blur (:func:`blur_shift`). Minimal-L2 attacks such as CW leave
the margin and the masks nearly normal but sit on a perturbation that a light blur undoes, so the
prediction moves (README, "Combining the score with the classifier's margin").

``per_class`` calibrates one threshold per predicted class (Mondrian calibration), so that at most
``fpr`` of each class's clean images are flagged instead of ``fpr`` overall: false positives no longer pile
up on the classes whose clean images score high (cats, on CIFAR-10). The evidence then carries the
predicted class as a last column, and the combined score is shifted by the class's offset from the
global threshold, so ``score > threshold_`` stays the verdict everywhere (README, "Per-class calibration").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .metrics import threshold_for_fpr

FORMAT = "advdetect.margin-combination/1"
SQUEEZE_SIGMAS = (0.75, 1.5)  # `train --margin`'s default blur scales of the squeeze evidence (px)


def log_prob_gap(logits: torch.Tensor) -> torch.Tensor:
    """N: the classifier's log-probability gap between its top two classes (differentiable)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"log_prob_gap needs N x K logits with K >= 2, got shape {tuple(logits.shape)}")
    top = logits.float().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def blur_shift(logits: torch.Tensor, blurred_logits: torch.Tensor) -> torch.Tensor:
    """N in [0, 1]: half the L1 distance between the softmax of ``logits`` and of ``blurred_logits``."""
    return 0.5 * (logits.float().softmax(1) - blurred_logits.float().softmax(1)).abs().sum(1)


def classifier_evidence(model: nn.Module, images: torch.Tensor, squeeze: tuple[float, ...] = (),
                        logits: torch.Tensor | None = None, with_class: bool = False) -> torch.Tensor:
    """N x (1 + len(squeeze) [+ 1]), differentiable: the classifier's :func:`log_prob_gap` on ``images``, then
    its :func:`blur_shift` under a Gaussian blur of each ``squeeze`` sigma, then (``with_class``) its predicted
    class as a float (``logits``: ``model(images)``, when already computed)."""
    from ..masks.perturbation import gaussian_blur

    logits = model(images) if logits is None else logits
    columns = [log_prob_gap(logits)]
    columns += [blur_shift(logits, model(gaussian_blur(images, sigma))).to(logits.device) for sigma in squeeze]
    if with_class:
        columns.append(logits.detach().argmax(1).float())
    return torch.stack(columns, 1)


def parse_squeeze(spec: str | Any) -> tuple[float, ...]:
    """``"0.75,1.5"`` (or a sequence) -> blur sigmas; ``""`` or ``"none"``: no squeeze evidence (the gap alone)."""
    from ..errors import OptionError

    if isinstance(spec, str):
        spec = [] if spec.strip().lower() in ("", "none") else [s for s in spec.split(",") if s.strip()]
    try:
        return _check_squeeze(spec)
    except ValueError as exc:
        raise OptionError(f"--squeeze: {exc} (e.g. 0.75,1.5, or none)") from None


def _check_squeeze(squeeze: Any) -> tuple[float, ...]:
    try:
        sigmas = tuple(float(v) for v in squeeze)
    except (TypeError, ValueError):
        raise ValueError(f"squeeze must be a sequence of blur sigmas in pixels, got {squeeze!r}") from None
    if not all(np.isfinite(v) and v > 0 for v in sigmas):
        raise ValueError(f"squeeze sigmas must be finite and positive, got {sigmas}")
    return sigmas


def _features(scores: torch.Tensor, evidence: torch.Tensor, shifts: int) -> torch.Tensor:
    """N x (3 + shifts): score, h, h^2, then the blur shifts, from N x E evidence (gap first, then the
    ``shifts`` blur shifts; a class column after them is not a feature)."""
    evidence = evidence.float()
    h = torch.log1p(evidence[:, 0].clamp_min(0))
    return torch.cat([torch.stack([scores.float(), h, h * h], 1), evidence[:, 1:1 + shifts]], 1)


class MarginCombination:
    """Logistic regression over (detector score, log1p(gap), log1p(gap)^2, one blur shift per ``squeeze``
    sigma), calibrated to ``fpr`` (of each predicted class's clean images, with ``per_class``).

    scikit-learn style: :meth:`fit` returns self; ``coef_``, ``intercept_``, ``mean_``, ``scale_``
    (feature standardisation) and, after :meth:`calibrate`, ``threshold_``, ``calibration_fpr_`` and, with
    ``per_class``, ``class_offsets_`` (per class, its own threshold minus ``threshold_``; 0 for a class with
    fewer than 2/fpr calibration images, which keeps the global threshold) are learned. The ``evidence`` its
    methods take is :meth:`evidence` (:func:`classifier_evidence` with the same ``squeeze`` and, with
    ``per_class``, the predicted class; with neither, the gaps alone, N or N x 1).
    """

    def __init__(self, fpr: float = 0.05, C: float = 1.0, squeeze: tuple[float, ...] = (),
                 per_class: bool = False) -> None:
        self.fpr = fpr
        self.C = C
        self.squeeze = squeeze
        self.per_class = per_class

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"fpr": self.fpr, "C": self.C, "squeeze": tuple(self.squeeze), "per_class": bool(self.per_class)}

    @property
    def n_evidence(self) -> int:
        """Columns of the evidence it reads: the gap, then one per squeeze sigma, then the class (per_class)."""
        return 1 + len(self.squeeze) + bool(self.per_class)

    def evidence(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The :func:`classifier_evidence` this combination reads, of ``images`` (differentiable)."""
        return classifier_evidence(model, images, tuple(self.squeeze), logits, with_class=bool(self.per_class))

    def _evidence(self, evidence: Any) -> torch.Tensor:
        evidence = torch.as_tensor(evidence)
        evidence = evidence[:, None] if evidence.dim() == 1 else evidence
        if evidence.dim() != 2 or evidence.shape[1] != self.n_evidence:
            what = "the gap, then one blur shift per squeeze sigma " + str(tuple(self.squeeze)) + \
                (", then the predicted class" if self.per_class else "")
            raise ValueError(f"evidence must be N x {self.n_evidence} ({what}), got shape {tuple(evidence.shape)}")
        return evidence

    def _classes(self, evidence: torch.Tensor) -> torch.Tensor:
        classes = evidence[:, -1].round().long()
        if bool((classes < 0).any()):
            raise ValueError("the evidence's class column holds a negative class")
        return classes

    def fit(self, scores: Any, evidence: Any, y: Any) -> MarginCombination:
        """``scores``: the detector's decision values; ``evidence``: :func:`classifier_evidence` (with no
        squeeze, the :func:`log_prob_gap` alone); ``y``: 1 = adversarial. Classes are weighted to balance."""
        from sklearn.linear_model import LogisticRegression

        if not 0 < self.fpr < 1:
            raise ValueError(f"fpr must lie in (0, 1), got {self.fpr}")
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C}")
        _check_squeeze(self.squeeze)
        X = _features(torch.as_tensor(scores), self._evidence(evidence), len(self.squeeze)).double()
        y = np.asarray(y).astype(int)
        if len(X) != len(y) or set(y.tolist()) != {0, 1}:
            raise ValueError("fit needs one label per score and both classes (0 clean, 1 adversarial)")
        self.mean_, self.scale_ = X.mean(0), X.std(0).clamp_min(1e-6)
        model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000)
        model.fit(((X - self.mean_) / self.scale_).numpy(), y)
        self.coef_ = torch.as_tensor(model.coef_[0], dtype=torch.float64)
        self.intercept_ = float(model.intercept_[0])
        return self

    def torch_decision(self, scores: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        """The combined score (a logit; higher is more adversarial), differentiable, on ``scores``' device."""
        if not hasattr(self, "coef_"):
            raise RuntimeError("this MarginCombination is not fitted yet; call fit(scores, evidence, y)")
        device = scores.device
        evidence = self._evidence(evidence).to(device)
        out = self._combined(scores, evidence)
        offsets = getattr(self, "class_offsets_", None)
        if self.per_class and offsets is not None:
            classes = self._classes(evidence)
            known = classes < len(offsets)  # a class it never saw keeps the global threshold
            shift = offsets.float().to(device)[classes.clamp_max(len(offsets) - 1)]
            out = out - torch.where(known, shift, torch.zeros_like(shift))
        return out

    def _combined(self, scores: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        """The combined score before any class offset."""
        device = scores.device
        X = _features(scores, evidence, len(self.squeeze))
        mean, scale = self.mean_.float().to(device), self.scale_.float().to(device)
        return ((X - mean) / scale) @ self.coef_.float().to(device) + self.intercept_

    def decision_function(self, scores: Any, evidence: Any) -> np.ndarray:
        with torch.no_grad():
            return self.torch_decision(torch.as_tensor(scores).float(),
                                       torch.as_tensor(evidence).float()).cpu().numpy()

    def calibrate(self, clean_scores: Any, clean_evidence: Any, fpr: float | None = None,
                  n_classes: int | None = None) -> MarginCombination:
        """Set ``threshold_`` so that at most ``fpr`` of these clean images are flagged; with ``per_class``,
        also ``class_offsets_`` (``n_classes`` of them; default: the largest class seen + 1) so that at most
        ``fpr`` of each class's images are."""
        fpr = self.fpr if fpr is None else fpr
        if not hasattr(self, "coef_"):
            raise RuntimeError("this MarginCombination is not fitted yet; call fit(scores, evidence, y)")
        with torch.no_grad():
            evidence = self._evidence(torch.as_tensor(clean_evidence).float())
            combined = self._combined(torch.as_tensor(clean_scores).float(), evidence).double().numpy()
        if len(combined) == 0:
            raise ValueError("calibration needs at least one clean image")
        self.threshold_ = threshold_for_fpr(combined, fpr)
        self.calibration_fpr_ = float(fpr)
        if self.per_class:
            classes = self._classes(evidence).numpy()
            n_classes = int(classes.max()) + 1 if n_classes is None else int(n_classes)
            if n_classes < int(classes.max()) + 1:
                raise ValueError(f"n_classes={n_classes} but the evidence holds class {int(classes.max())}")
            self.class_offsets_ = torch.tensor(class_offsets(combined, classes, fpr, n_classes), dtype=torch.float64)
        return self

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "threshold_"):
            raise RuntimeError("fit and calibrate the combination before saving it")
        out = {"format": FORMAT, "params": self.get_params(), "coef": self.coef_.tolist(),
               "intercept": self.intercept_, "mean": self.mean_.tolist(), "scale": self.scale_.tolist(),
               "threshold": self.threshold_, "calibration_fpr": self.calibration_fpr_}
        if self.per_class:
            out["class_offsets"] = self.class_offsets_.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MarginCombination:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a margin combination (expected format {FORMAT!r})")
        try:
            per_class = data["params"].get("per_class", False)  # files before per-class calibration: global
            if not isinstance(per_class, bool):
                raise ValueError(f"per_class must be true or false, got {per_class!r}")
            out = cls(**{k: float(v) for k, v in data["params"].items() if k in ("fpr", "C")},
                      squeeze=_check_squeeze(data["params"].get("squeeze", ())), per_class=per_class)
            if per_class:
                out.class_offsets_ = torch.tensor([float(v) for v in data["class_offsets"]], dtype=torch.float64)
            out.coef_ = torch.tensor([float(v) for v in data["coef"]], dtype=torch.float64)
            out.mean_ = torch.tensor([float(v) for v in data["mean"]], dtype=torch.float64)
            out.scale_ = torch.tensor([float(v) for v in data["scale"]], dtype=torch.float64)
            out.intercept_, out.threshold_ = float(data["intercept"]), float(data["threshold"])
            out.calibration_fpr_ = float(data.get("calibration_fpr", out.fpr))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed margin combination: {err}") from None
        features = 3 + len(out.squeeze)
        if not (out.coef_.numel() == out.mean_.numel() == out.scale_.numel() == features):
            raise ValueError(f"malformed margin combination: {features} features expected")
        numbers = torch.cat([out.coef_, out.mean_, out.scale_, torch.tensor([out.intercept_, out.threshold_]),
                             getattr(out, "class_offsets_", torch.zeros(0, dtype=torch.float64))])
        if not bool(torch.isfinite(numbers).all()) or bool((out.scale_ <= 0).any()):
            raise ValueError("malformed margin combination: values must be finite and scales positive")
        return out


def class_offsets(scores: np.ndarray, classes: np.ndarray, fpr: float, n_classes: int) -> list[float]:
    """Per class, the threshold that flags at most ``fpr`` of its ``scores`` minus the global one; 0 for a class
    with fewer than ceil(2/fpr) images (fewer than two of them above its own threshold place it too noisily:
    with 300 CIFAR-10 calibration images, about 30 a class, per-class thresholds flagged 15.7% of one class's
    held-out images against 9.3% for the global one; README, "Per-class calibration")."""
    scores, classes = np.asarray(scores, dtype=np.float64), np.asarray(classes).astype(int)
    overall = threshold_for_fpr(scores, fpr)
    needed = int(np.ceil(2 / fpr - 1e-9))
    return [threshold_for_fpr(scores[classes == c], fpr) - overall if int((classes == c).sum()) >= needed else 0.0
            for c in range(n_classes)]


class WithEvidence(nn.Module):
    """``maps(x)`` with constant planes of the classifier's :func:`classifier_evidence` on ``x`` appended
    (``with_class``: the predicted class too, for a per-class calibrated combination)."""

    def __init__(self, maps: nn.Module, model: nn.Module, squeeze: tuple[float, ...] = (),
                 with_class: bool = False) -> None:
        super().__init__()
        self.maps, self.model, self.squeeze, self.with_class = maps, model, tuple(squeeze), with_class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_evidence_planes(self.maps(x), classifier_evidence(self.model, x, self.squeeze,
                                                                      with_class=self.with_class))


def with_evidence_planes(maps: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """``maps`` (N x C x H x W) with one constant plane per column of ``evidence`` (N or N x E) appended."""
    evidence = evidence[:, None] if evidence.dim() == 1 else evidence
    planes = evidence.to(maps.device, maps.dtype)[:, :, None, None].expand(-1, -1, *maps.shape[-2:])
    return torch.cat([maps, planes], 1)


class _CombinedNet(nn.Module):
    def __init__(self, network: nn.Module, combination: MarginCombination) -> None:
        super().__init__()
        self.network, self.combination = network, combination

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        e = self.combination.n_evidence
        return self.combination.torch_decision(self.network(maps[:, :-e]), maps[:, -e:, 0, 0])


class CombinedDetector:
    """A fitted :class:`~advdetect.detector.MaskDetector` and a calibrated :class:`MarginCombination`, seen
    as one detector over :class:`WithEvidence` maps (``decision_function``, ``threshold_``, ``_fitted()``):
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

