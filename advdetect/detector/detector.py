"""The mask discriminator as a scikit-learn-style estimator.

``MaskDetector().fit(masks, y)`` trains :class:`MaskAlexNet` (y = 1 for adversarial) with a
stratified validation split and early stopping on validation loss, then calibrates
``threshold_`` so that at most ``fpr`` of the validation clean masks score above it. Call
:meth:`calibrate` with separate held-out clean masks to recalibrate. The training loop itself
(and its data-parallel form under torchrun) lives in :mod:`advdetect.detector.fitting`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch

from ..errors import OptionError
from .inputs import channels_fit
from .metrics import threshold_for_fpr
from .network import MaskAlexNet

log = logging.getLogger(__name__)


class MaskDetector:
    """Clean-vs-adversarial classifier over mask heatmaps (N x 1 x H x W in [0, 1]).

    Any N x C x H x W maps work (the evaluation's baselines use saliency maps and raw images);
    the channel count is fixed by ``fit``. ``inputs`` names what the maps hold - the masks and any
    evidence planes beside them (:mod:`advdetect.detector.inputs`, e.g. ``"masks,residual,confidence"``)
    - so that whoever deploys the detector builds the same maps.
    """

    def __init__(self, epochs: int = 40, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 128,
                 val_fraction: float = 0.2, patience: int = 6, fpr: float = 0.05, augment: bool = True,
                 dropout: float = 0.5, seed: int = 0, device: str = "cpu", inputs: str = "masks") -> None:
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.patience = patience
        self.fpr = fpr
        self.augment = augment
        self.dropout = dropout
        self.seed = seed
        self.device = device
        self.inputs = inputs

    # -- scikit-learn protocol ------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> MaskDetector:
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise OptionError(f"unknown parameter {key!r} for MaskDetector; valid: {', '.join(valid)}")
            setattr(self, key, value)
        return self

    def _check_params(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise OptionError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if not 0 <= self.fpr < 1:
            raise OptionError(f"fpr must lie in [0, 1), got {self.fpr}")
        if self.epochs < 1 or self.batch_size < 1:
            raise OptionError("epochs and batch_size must be at least 1")
        self.input_names()

    def input_names(self) -> tuple[str, ...]:
        """What the maps this detector reads hold (``inputs`` parsed; see :mod:`.inputs`)."""
        from .inputs import parse_inputs

        return parse_inputs(self.inputs)

    def fit(self, X: torch.Tensor, y: torch.Tensor | np.ndarray) -> MaskDetector:
        """Train on masks ``X`` with labels ``y`` (0 clean, 1 adversarial); returns self.

        A stratified ``val_fraction`` of the masks is held out for early stopping, and the
        threshold is then calibrated on that split's clean masks (``fpr`` of them flagged):
        ``fit`` leaves a usable detector. Call :meth:`calibrate` with clean masks of images
        never seen in fitting (what ``advdetect train`` does) for an honest threshold.
        Randomness (initialization, minibatches, flips, dropout) comes from ``seed`` alone; the
        caller's global random state is left as it was.
        """
        from ..device import seeded
        from .fitting import FitSettings, fit_network

        self._check_params()
        X, y = _as_masks(X), torch.as_tensor(np.asarray(y), dtype=torch.float32)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} masks but y has {y.shape[0]} labels")
        if not channels_fit(self.input_names(), X.shape[1]):
            raise ValueError(f"maps of {X.shape[1]} channels cannot hold the inputs {self.inputs!r} "
                             "(see advdetect.detector.inputs.detector_maps)")
        if set(y.unique().tolist()) != {0.0, 1.0}:
            raise ValueError("y must hold both classes, 0 (clean) and 1 (adversarial)")
        gen = torch.Generator().manual_seed(self.seed)
        train_idx, val_idx = _stratified_split(y, self.val_fraction, gen)
        device = torch.device(self.device)
        with seeded(self.seed, device):
            net = MaskAlexNet(in_channels=X.shape[1], dropout=self.dropout).to(device)
        settings = FitSettings(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                               batch_size=self.batch_size, patience=self.patience, augment=self.augment)
        result = fit_network(net, X[train_idx], y[train_idx], X[val_idx], y[val_idx], settings, gen)
        self.network_ = net
        self.history_ = result.history
        self.best_val_loss_ = result.best_val_loss
        self.n_features_in_ = tuple(X.shape[1:])
        self.n_samples_fit_ = int(X.shape[0])  # maps it fitted on (validation share included); not saved
        self.classes_ = np.array([0, 1])
        self.calibrate(X[val_idx][y[val_idx] == 0])
        log.info("detector calibrated on its %d validation clean masks (threshold %.3f); recalibrate on unseen "
                 "clean masks with calibrate()", self.n_calibration_, self.threshold_)
        return self

    def calibrate(self, clean_masks: torch.Tensor, fpr: float | None = None) -> MaskDetector:
        """Set ``threshold_`` so that at most ``fpr`` of these clean masks are flagged."""
        fpr = self.fpr if fpr is None else fpr
        scores = self.decision_function(clean_masks)
        if len(scores) == 0:
            raise ValueError("calibration needs at least one clean mask")
        self.threshold_ = threshold_for_fpr(scores, fpr)
        self.calibration_fpr_ = float(fpr)
        self.n_calibration_ = int(len(scores))
        return self

    def decision_function(self, X: torch.Tensor) -> np.ndarray:
        """Adversarial score (a logit: higher is more adversarial) per mask."""
        net = self._fitted()
        X = _as_masks(X)
        channels = net.features[0].in_channels
        if X.shape[1] != channels:
            raise ValueError(f"this detector takes {channels}-channel maps, got shape {tuple(X.shape)}")
        device = next(net.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], 1024):
                out.append(net(X[start:start + 1024].to(device)).float().cpu())
        return torch.cat(out).numpy() if out else np.empty(0, dtype=np.float32)

    def predict_proba(self, X: torch.Tensor) -> np.ndarray:
        """N x 2: scores of clean and adversarial, ``sigmoid(score - threshold_)``.

        Centred on the calibrated threshold, so ``predict`` is exactly ``predict_proba(X)[:, 1] >
        0.5``. A monotone map of the score, not a calibrated probability: the threshold is what
        ``fit`` or :meth:`calibrate` set for the chosen false-positive rate.
        """
        p = 1 / (1 + np.exp(-(self.decision_function(X).astype(np.float64) - self._threshold())))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X: torch.Tensor) -> np.ndarray:
        """1 (adversarial) where the score exceeds the calibrated threshold, else 0."""
        return (self.decision_function(X) > self._threshold()).astype(int)

    def score(self, X: torch.Tensor, y: torch.Tensor | np.ndarray) -> float:
        return float((self.predict(X) == np.asarray(y).astype(int)).mean())

    # -- helpers ---------------------------------------------------------------------------
    def _fitted(self) -> MaskAlexNet:
        if not hasattr(self, "network_"):
            raise RuntimeError("this MaskDetector is not fitted yet; call fit(X, y) or load a saved detector")
        return self.network_

    def _threshold(self) -> float:
        self._fitted()
        if not hasattr(self, "threshold_"):
            raise RuntimeError("this MaskDetector has no threshold yet; call calibrate(clean_masks)")
        return self.threshold_


def _as_masks(X: torch.Tensor | np.ndarray) -> torch.Tensor:
    X = torch.as_tensor(X, dtype=torch.float32)
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if X.dim() != 4:
        raise ValueError(f"masks must be N x 1 x H x W (or N x C x H x W maps), got shape {tuple(X.shape)}")
    return X


def _stratified_split(y: torch.Tensor, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    train, val = [], []
    for cls in (0.0, 1.0):
        idx = (y == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, int(round(fraction * len(idx))))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(val)
