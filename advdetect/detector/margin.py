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

``noise`` (pixel sigmas, e.g. (0.01,)) adds, for each sigma, the same softmax shift under Gaussian pixel
noise (one fixed, seeded noise pattern, so a verdict is deterministic and the white-box attacker knows it),
read as l = log(shift + 1e-6) and l^2: CW and DeepFool move more than clean images under noise, BIM and
PGD less, a two-sided signal. ``hidden`` > 0 replaces the logistic regression by a small MLP (two hidden
layers of that width, still differentiable), which uses such signals in both directions (README, "Noise
shifts and an MLP combiner").

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


NOISE_SEED = 0  # the fixed noise pattern of the noise evidence


def noise_pattern(shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """The fixed standard-normal C x H x W pattern the noise evidence adds (seeded: the same on every call)."""
    gen = torch.Generator().manual_seed(NOISE_SEED)
    return torch.randn(tuple(shape), generator=gen).to(device)


def classifier_evidence(model: nn.Module, images: torch.Tensor, squeeze: tuple[float, ...] = (),
                        logits: torch.Tensor | None = None, with_class: bool = False,
                        noise: tuple[float, ...] = ()) -> torch.Tensor:
    """N x (1 + len(squeeze) + len(noise) [+ 1]), differentiable: the classifier's :func:`log_prob_gap` on
    ``images``, then its :func:`blur_shift` under a Gaussian blur of each ``squeeze`` sigma, then under the
    fixed :func:`noise_pattern` times each ``noise`` sigma (clamped to [0, 1]), then (``with_class``) its
    predicted class as a float (``logits``: ``model(images)``, when already computed; else computed in the
    same classifier call as the copies)."""
    return logits_and_evidence(model, images, squeeze, logits, with_class, noise)[1]


def logits_and_evidence(model: nn.Module, images: torch.Tensor, squeeze: tuple[float, ...] = (),
                        logits: torch.Tensor | None = None, with_class: bool = False,
                        noise: tuple[float, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(images)`` and :func:`classifier_evidence` of ``images``; without ``logits`` the images go into
    the classifier call of their blurred and noisy copies (one call for a small batch instead of two)."""
    from ..masks.perturbation import gaussian_blur

    variants = [gaussian_blur(images, sigma) for sigma in squeeze]
    if noise:
        pattern = noise_pattern(images.shape[1:], images.device)
        variants += [(images + sigma * pattern).clamp(0, 1) for sigma in noise]
    outs = _variant_logits(model, variants if logits is not None else [images, *variants])
    if logits is None:
        logits, outs = outs[0], outs[1:]
    columns = [log_prob_gap(logits)]
    columns += [blur_shift(logits, out).to(logits.device) for out in outs]
    if with_class:
        columns.append(logits.detach().argmax(1).float())
    return logits, torch.stack(columns, 1)


VARIANT_BATCH = 256  # images per classifier call when the variants of a small batch are stacked


def _variant_logits(model: nn.Module, variants: list[torch.Tensor]) -> list[torch.Tensor]:
    """``model`` on each of ``variants`` (equal-shaped batches), several stacked into one call while that call
    holds at most :data:`VARIANT_BATCH` images: a small batch's blurred and noisy copies cost one classifier
    call instead of one each (a verdict at batch 1), a large batch's calls keep their usual size (memory)."""
    if not variants:
        return []
    n = variants[0].shape[0]
    per_call = max(1, VARIANT_BATCH // n) if n else 1  # an empty batch's copies can't be split apart again
    out: list[torch.Tensor] = []
    for start in range(0, len(variants), per_call):
        group = variants[start:start + per_call]
        out += list(model(torch.cat(group)).split(n)) if len(group) > 1 else [model(group[0])]
    return out


def parse_squeeze(spec: str | Any, option: str = "--squeeze") -> tuple[float, ...]:
    """``"0.75,1.5"`` (or a sequence) -> blur (or noise) sigmas; ``""`` or ``"none"``: none (the gap alone)."""
    from ..errors import OptionError

    if isinstance(spec, str):
        spec = [] if spec.strip().lower() in ("", "none") else [s for s in spec.split(",") if s.strip()]
    try:
        return _check_squeeze(spec)
    except ValueError as exc:
        raise OptionError(f"{option}: {exc} (e.g. {'0.01' if option == '--noise' else '0.75,1.5'}, or none)") from None


def _check_squeeze(squeeze: Any, what: str = "squeeze") -> tuple[float, ...]:
    try:
        sigmas = tuple(float(v) for v in squeeze)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of positive sigmas, got {squeeze!r}") from None
    if not all(np.isfinite(v) and v > 0 for v in sigmas):
        raise ValueError(f"{what} sigmas must be finite and positive, got {sigmas}")
    return sigmas


def _features(scores: torch.Tensor, evidence: torch.Tensor, shifts: int, noises: int = 0) -> torch.Tensor:
    """N x (3 + shifts + 2 noises): score, h, h^2, the blur shifts, then l and l^2 per noise shift
    (l = log(shift + 1e-6)), from N x E evidence (gap, ``shifts`` blur shifts, ``noises`` noise shifts; a
    class column after them is not a feature)."""
    evidence = evidence.float()
    h = torch.log1p(evidence[:, 0].clamp_min(0))
    columns = [torch.stack([scores.float(), h, h * h], 1), evidence[:, 1:1 + shifts]]
    if noises:
        log_shift = torch.log(evidence[:, 1 + shifts:1 + shifts + noises].clamp_min(0) + 1e-6)
        columns += [log_shift, log_shift * log_shift]
    return torch.cat(columns, 1)


def _mlp(n_features: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class MarginCombination:
    """Logistic regression (or, with ``hidden`` > 0, a two-layer MLP of that width trained from ``seed``) over
    (detector score, log1p(gap), log1p(gap)^2, one blur shift per ``squeeze`` sigma, (l, l^2) per ``noise``
    sigma), calibrated to ``fpr`` (of each predicted class's clean images, with ``per_class``).

    scikit-learn style: :meth:`fit` returns self; ``coef_``, ``intercept_``, ``mean_``, ``scale_``
    (feature standardisation) and, after :meth:`calibrate`, ``threshold_``, ``calibration_fpr_`` and, with
    ``per_class``, ``class_offsets_`` (per class, its own threshold minus ``threshold_``; 0 for a class with
    fewer than 2/fpr calibration images, which keeps the global threshold) are learned. The ``evidence`` its
    methods take is :meth:`evidence` (:func:`classifier_evidence` with the same ``squeeze`` and, with
    ``per_class``, the predicted class; with neither, the gaps alone, N or N x 1).
    """

    def __init__(self, fpr: float = 0.05, C: float = 1.0, squeeze: tuple[float, ...] = (),
                 per_class: bool = False, noise: tuple[float, ...] = (), hidden: int = 0, seed: int = 0) -> None:
        self.fpr = fpr
        self.C = C
        self.squeeze = squeeze
        self.per_class = per_class
        self.noise = noise
        self.hidden = hidden
        self.seed = seed

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"fpr": self.fpr, "C": self.C, "squeeze": tuple(self.squeeze), "per_class": bool(self.per_class),
                "noise": tuple(self.noise), "hidden": int(self.hidden), "seed": int(self.seed)}

    @property
    def n_evidence(self) -> int:
        """Columns of the evidence it reads: the gap, one per squeeze sigma, one per noise sigma, then the
        class (per_class)."""
        return 1 + len(self.squeeze) + len(self.noise) + bool(self.per_class)

    @property
    def n_features(self) -> int:
        return 3 + len(self.squeeze) + 2 * len(self.noise)

    def evidence(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The :func:`classifier_evidence` this combination reads, of ``images`` (differentiable)."""
        return self.logits_and_evidence(model, images, logits)[1]

    def logits_and_evidence(self, model: nn.Module, images: torch.Tensor,
                            logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``model(images)`` and :meth:`evidence`, in one classifier call for a small batch
        (:func:`logits_and_evidence`)."""
        return logits_and_evidence(model, images, tuple(self.squeeze), logits, with_class=bool(self.per_class),
                                   noise=tuple(self.noise))

    def _X(self, scores: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        return _features(scores, evidence, len(self.squeeze), len(self.noise))

    def _evidence(self, evidence: Any) -> torch.Tensor:
        evidence = torch.as_tensor(evidence)
        evidence = evidence[:, None] if evidence.dim() == 1 else evidence
        if evidence.dim() != 2 or evidence.shape[1] != self.n_evidence:
            what = "the gap, then one blur shift per squeeze sigma " + str(tuple(self.squeeze)) + \
                (f", one noise shift per noise sigma {tuple(self.noise)}" if self.noise else "") + \
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
        _check_squeeze(self.noise, "noise")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 0:
            raise ValueError(f"hidden must be 0 (logistic regression) or the MLP's width, got {self.hidden!r}")
        X = self._X(torch.as_tensor(scores), self._evidence(evidence)).double()
        y = np.asarray(y).astype(int)
        if len(X) != len(y) or set(y.tolist()) != {0, 1}:
            raise ValueError("fit needs one label per score and both classes (0 clean, 1 adversarial)")
        self.mean_, self.scale_ = X.mean(0), X.std(0).clamp_min(1e-6)
        Z = (X - self.mean_) / self.scale_
        if self.hidden:
            self.mlp_ = _fit_mlp(Z.float(), torch.as_tensor(y, dtype=torch.float32), self.hidden, 1 / self.C,
                                 self.seed)
            return self
        model = LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000)
        model.fit(Z.numpy(), y)
        self.coef_ = torch.as_tensor(model.coef_[0], dtype=torch.float64)
        self.intercept_ = float(model.intercept_[0])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "mlp_" if self.hidden else "coef_"):
            raise RuntimeError("this MarginCombination is not fitted yet; call fit(scores, evidence, y)")

    def torch_decision(self, scores: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        """The combined score (a logit; higher is more adversarial), differentiable, on ``scores``' device."""
        self._check_fitted()
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
        X = self._X(scores, evidence)
        mean, scale = self.mean_.float().to(device), self.scale_.float().to(device)
        if self.hidden:
            return self.mlp_.to(device)((X - mean) / scale)[:, 0]
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
        self._check_fitted()
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
        out = {"format": FORMAT, "params": self.get_params(), "mean": self.mean_.tolist(),
               "scale": self.scale_.tolist(), "threshold": self.threshold_, "calibration_fpr": self.calibration_fpr_}
        if self.per_class:
            out["class_offsets"] = self.class_offsets_.tolist()
        if self.hidden:
            out["mlp"] = [[p.detach().double().tolist() for p in layer.parameters()]
                          for layer in self.mlp_ if isinstance(layer, nn.Linear)]
        else:
            out["coef"], out["intercept"] = self.coef_.tolist(), self.intercept_
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MarginCombination:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a margin combination (expected format {FORMAT!r})")
        try:
            per_class = data["params"].get("per_class", False)  # files before per-class calibration: global
            if not isinstance(per_class, bool):
                raise ValueError(f"per_class must be true or false, got {per_class!r}")
            hidden = data["params"].get("hidden", 0)  # files before the MLP: logistic regression
            if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
                raise ValueError(f"hidden must be a width >= 0, got {hidden!r}")
            out = cls(**{k: float(v) for k, v in data["params"].items() if k in ("fpr", "C")},
                      squeeze=_check_squeeze(data["params"].get("squeeze", ())), per_class=per_class,
                      noise=_check_squeeze(data["params"].get("noise", ()), "noise"), hidden=hidden)
            if per_class:
                out.class_offsets_ = torch.tensor([float(v) for v in data["class_offsets"]], dtype=torch.float64)
            if not hidden:  # an MLP's file may hold a coef of zeros (written before 2026-11-25): not read
                out.coef_ = torch.tensor([float(v) for v in data["coef"]], dtype=torch.float64)
                out.intercept_ = float(data["intercept"])
            out.mean_ = torch.tensor([float(v) for v in data["mean"]], dtype=torch.float64)
            out.scale_ = torch.tensor([float(v) for v in data["scale"]], dtype=torch.float64)
            out.threshold_ = float(data["threshold"])
            out.calibration_fpr_ = float(data.get("calibration_fpr", out.fpr))
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed margin combination: {err}") from None
        features = out.n_features
        weights = out.mean_ if out.hidden else out.coef_
        if not (weights.numel() == out.mean_.numel() == out.scale_.numel() == features):
            raise ValueError(f"malformed margin combination: {features} features expected")
        if out.hidden:
            out.mlp_ = _load_mlp(data.get("mlp"), features, out.hidden)
        numbers = torch.cat([getattr(out, "coef_", torch.zeros(0, dtype=torch.float64)), out.mean_, out.scale_,
                             torch.tensor([getattr(out, "intercept_", 0.0), out.threshold_]),
                             getattr(out, "class_offsets_", torch.zeros(0, dtype=torch.float64)),
                             *(p.detach().double().flatten()
                               for p in getattr(out, "mlp_", nn.Sequential()).parameters())])
        if not bool(torch.isfinite(numbers).all()) or bool((out.scale_ <= 0).any()):
            raise ValueError("malformed margin combination: values must be finite and scales positive")
        return out


def _fit_mlp(Z: torch.Tensor, y: torch.Tensor, hidden: int, weight_decay: float, seed: int,
             steps: int = 2000) -> nn.Sequential:
    """The MLP combiner, trained full batch with Adam on class-balanced logistic loss (``weight_decay`` = 1/C
    times 1e-3, as scikit-learn's alpha), from a seeded initialisation; returned frozen, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _mlp(Z.shape[1], hidden)
    pos = float(y.sum())
    weight = torch.where(y == 1, (len(y) - pos) / max(pos, 1.0), 1.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3 * weight_decay)
    loss_fn = nn.BCEWithLogitsLoss(weight=weight)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(net(Z)[:, 0], y).backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


def _load_mlp(layers: Any, n_features: int, hidden: int) -> nn.Sequential:
    """The MLP of a margin.json's "mlp" (per linear layer: weight rows, bias), shape-checked."""
    net = _mlp(n_features, hidden)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    if not isinstance(layers, list) or len(layers) != len(linears):
        raise ValueError(f"malformed margin combination: an MLP of {len(linears)} layers expected")
    with torch.no_grad():
        for layer, saved in zip(linears, layers):
            if not isinstance(saved, list) or len(saved) != 2:
                raise ValueError("malformed margin combination: each MLP layer is [weight, bias]")
            weight, bias = torch.tensor(saved[0], dtype=torch.float32), torch.tensor(saved[1], dtype=torch.float32)
            if weight.shape != layer.weight.shape or bias.shape != layer.bias.shape:
                raise ValueError(f"malformed margin combination: MLP layer of shape {tuple(weight.shape)}, "
                                 f"expected {tuple(layer.weight.shape)}")
            layer.weight.copy_(weight), layer.bias.copy_(bias)
    return net.eval().requires_grad_(False)


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
    """``maps(x)`` with constant planes of the evidence ``combination`` reads on ``x`` appended
    (:meth:`MarginCombination.evidence`; default: an unfitted ``MarginCombination()``, the gap alone)."""

    def __init__(self, maps: nn.Module, model: nn.Module, combination: MarginCombination | None = None) -> None:
        super().__init__()
        self.maps, self.model = maps, model
        self.combination = MarginCombination() if combination is None else combination

    @property
    def deterministic(self) -> bool:
        """As deterministic as ``maps``: the evidence (gap, blur and fixed-pattern noise shifts) is."""
        return bool(getattr(self.maps, "deterministic", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_evidence_planes(self.maps(x), self.combination.evidence(self.model, x))


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

