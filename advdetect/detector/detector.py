"""The mask discriminator as a scikit-learn-style estimator.

``MaskDetector().fit(masks, y)`` trains :class:`MaskAlexNet` (y = 1 for adversarial) with a
stratified validation split and early stopping on validation loss, then calibrates
``threshold_`` so that at most ``fpr`` of the validation clean masks score above it. Call
:meth:`calibrate` with separate held-out clean masks to recalibrate.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Context, context
from ..errors import OptionError
from .metrics import threshold_for_fpr
from .network import MaskAlexNet

log = logging.getLogger(__name__)


class MaskDetector:
    """Clean-vs-adversarial classifier over mask heatmaps (N x 1 x H x W in [0, 1]).

    Any N x C x H x W maps work (the evaluation's baselines use saliency maps and raw images);
    the channel count is fixed by ``fit``.
    """

    def __init__(self, epochs: int = 40, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 128,
                 val_fraction: float = 0.2, patience: int = 6, fpr: float = 0.05, augment: bool = True,
                 dropout: float = 0.5, seed: int = 0, device: str = "cpu") -> None:
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

    def fit(self, X: torch.Tensor, y: torch.Tensor | np.ndarray) -> MaskDetector:
        """Train on masks ``X`` with labels ``y`` (0 clean, 1 adversarial); returns self."""
        self._check_params()
        X, y = _as_masks(X), torch.as_tensor(np.asarray(y), dtype=torch.float32)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} masks but y has {y.shape[0]} labels")
        if set(y.unique().tolist()) != {0.0, 1.0}:
            raise ValueError("y must hold both classes, 0 (clean) and 1 (adversarial)")
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        train_idx, val_idx = _stratified_split(y, self.val_fraction, gen)
        device = torch.device(self.device)
        net = MaskAlexNet(in_channels=X.shape[1], dropout=self.dropout).to(device)
        ctx = context()
        # under torchrun: DistributedDataParallel, every rank a slice of each minibatch
        model = net if not ctx.enabled else DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        Xt, yt = X[train_idx].to(device), y[train_idx].to(device)
        Xv, yv = X[val_idx].to(device), y[val_idx].to(device)
        best, best_state, bad, history = float("inf"), None, 0, []
        for epoch in range(self.epochs):
            net.train()
            perm = torch.randperm(len(yt), generator=gen).to(device)
            total = torch.zeros((), device=device)
            for start in range(0, len(perm), self.batch_size):
                idx = perm[start:start + self.batch_size]
                xb = _augment(Xt[idx], gen) if self.augment else Xt[idx]  # every rank draws the same
                opt.zero_grad(set_to_none=True)
                if ctx.enabled:
                    mine = slice(ctx.rank, None, ctx.world_size)
                    # summed over this rank's slice / the whole batch, times the ranks DDP averages over:
                    # the gradient is the single-process mean over the batch
                    loss = F.binary_cross_entropy_with_logits(model(xb[mine]), yt[idx][mine], reduction="sum")
                    (loss * ctx.world_size / len(idx)).backward()
                    total += loss.detach()
                else:
                    loss = F.binary_cross_entropy_with_logits(net(xb), yt[idx])
                    loss.backward()
                    total += loss.detach() * len(idx)
                opt.step()
            sched.step()
            if ctx.enabled:
                dist.all_reduce(total)
            train_loss = float(total) / len(yt)
            val_loss = self._loss(net, Xv, yv)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
            log.info("detector epoch %d train %.4f val %.4f", epoch + 1, train_loss, val_loss)
            if val_loss < best - 1e-4:
                best, best_state, bad = val_loss, copy.deepcopy(net.state_dict()), 0
            else:
                bad += 1
            if _agreed(bad >= self.patience, ctx):
                break
        net.load_state_dict(best_state)
        net.eval()
        self.network_ = net
        self.history_ = history
        self.best_val_loss_ = best
        self.n_features_in_ = tuple(X.shape[1:])
        self.classes_ = np.array([0, 1])
        self.calibrate(Xv[yv == 0])
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
        """N x 2: probabilities of clean and adversarial (uncalibrated sigmoid of the score)."""
        p = 1 / (1 + np.exp(-self.decision_function(X).astype(np.float64)))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X: torch.Tensor) -> np.ndarray:
        """1 (adversarial) where the score exceeds the calibrated threshold, else 0."""
        return (self.decision_function(X) > self.threshold_).astype(int)

    def score(self, X: torch.Tensor, y: torch.Tensor | np.ndarray) -> float:
        return float((self.predict(X) == np.asarray(y).astype(int)).mean())

    # -- helpers ---------------------------------------------------------------------------
    def _fitted(self) -> MaskAlexNet:
        if not hasattr(self, "network_"):
            raise RuntimeError("this MaskDetector is not fitted yet; call fit(X, y) or load a saved detector")
        return self.network_

    @staticmethod
    def _loss(net: MaskAlexNet, X: torch.Tensor, y: torch.Tensor) -> float:
        net.eval()
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(net(X), y).item())


def _agreed(flag: bool, ctx: Context) -> bool:
    """Rank 0's decision, so that every rank leaves the training loop together."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


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


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (a mask's meaning is mirror-symmetric)."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
