"""Fitting a :class:`~.amortized.MaskNet`: by the mask objective itself, by distilling optimised masks, or both.

* ``"objective"`` (Dabkowski & Gal): the meaningful-perturbation objective of the predicted mask -
  area (L1) and total variation on the low-resolution mask, plus the class term of the classifier
  on the image perturbed by it, with the optimiser's score, floored at its deletion goal.
* ``"distill"``: binary cross-entropy between the predicted low-resolution mask and the optimised
  mask pooled to the same cells.
* ``"both"``: their sum.

When the optimised masks' iteration counts are given, the iteration head learns their share of the
budget (squared error) in every mode. The classifier is used frozen; only the network learns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError
from ..models.wrapper import frozen
from .amortized import AmortizedMasks, MaskNet
from .config import MaskConfig
from .loss import objective
from .meaningful import floor_score

log = logging.getLogger(__name__)

LOSSES = ("objective", "distill", "both")


@dataclass
class MaskNetFit:
    """How a mask network is trained."""

    loss: str = "both"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    goal: float | None = None  # deletion game: the class term's floor, times the original probability
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.goal is not None and not 0 < self.goal < 1:
            raise OptionError(f"goal must lie in (0, 1), got {self.goal}")
        if self.loss not in LOSSES:
            raise OptionError(f"unknown mask network loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise OptionError("epochs and batch_size must be at least 1, lr positive, weight_decay non-negative")


def fit_mask_net(model: nn.Module, net: MaskNet, images: torch.Tensor, config: MaskConfig,
                 teacher_masks: torch.Tensor | None = None, teacher_iterations: torch.Tensor | None = None,
                 targets: torch.Tensor | None = None, settings: MaskNetFit | None = None,
                 progress: bool = False) -> MaskNet:
    """Train ``net`` on ``images`` (N x C x H x W in [0, 1], on the model's device) to give ``config``'s masks.

    ``teacher_masks`` (N x 1 x H' x W', optimised masks) are needed by the distilling losses;
    ``teacher_iterations`` (N) train the iteration head; ``targets`` default to the top prediction.
    Returns ``net`` in eval mode; ``settings.history`` gets one row per epoch. The model is left as it was.
    """
    from tqdm.auto import tqdm

    settings = settings or MaskNetFit()
    if settings.loss != "objective" and teacher_masks is None:
        raise OptionError(f"the {settings.loss!r} loss distils optimised masks; give teacher_masks")
    n, device = images.shape[0], images.device
    explainer = AmortizedMasks(model, net, config)
    with torch.no_grad(), frozen(model):
        probs = torch.cat([model(images[s:s + 512]).float().softmax(1) for s in range(0, n, 512)])
    targets = probs.argmax(1) if targets is None else targets.to(device).long()
    p0 = probs.gather(1, targets[:, None]).squeeze(1)
    low_teacher = None
    if teacher_masks is not None:
        low_teacher = F.adaptive_avg_pool2d(teacher_masks.float().to(device), net.spec.low_shape).clamp(0, 1)
    share = None if teacher_iterations is None else (teacher_iterations.float().to(device) / config.iterations).clamp(0, 1)
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-n // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps, pct_start=0.15)
    settings.history = []
    net.train()
    with frozen(model):
        for epoch in tqdm(range(settings.epochs), desc="mask network", unit="epoch", disable=not progress):
            totals = torch.zeros(3)
            for idx in torch.randperm(n, generator=gen).split(settings.batch_size):
                idx = idx.to(device)
                low_logits, share_logits = net(images[idx], targets[idx], probs[idx])
                low = torch.sigmoid(low_logits)
                parts = torch.zeros(3, device=device)
                if settings.loss in ("objective", "both"):
                    parts[0] = _objective(model, explainer, images[idx], low, targets[idx], p0[idx], config,
                                          settings.goal)
                if settings.loss in ("distill", "both"):
                    parts[1] = F.binary_cross_entropy_with_logits(low_logits, low_teacher[idx])
                if share is not None:
                    parts[2] = F.mse_loss(torch.sigmoid(share_logits), share[idx])
                optimizer.zero_grad(set_to_none=True)
                parts.sum().backward()
                optimizer.step()
                schedule.step()
                totals += parts.detach().cpu() * len(idx)
            row = dict(zip(("objective", "distill", "iterations"), (totals / n).tolist()))
            settings.history.append({"epoch": epoch + 1, **row})
            log.debug("mask network epoch %d: %s", epoch + 1, row)
    return net.eval()


def _objective(model: nn.Module, explainer: AmortizedMasks, x: torch.Tensor, low: torch.Tensor,
               targets: torch.Tensor, p0: torch.Tensor, config: MaskConfig,
               goal: float | None = None) -> torch.Tensor:
    """The optimiser's per-image objective of the predicted masks, averaged (no noise, no jitter).

    In the deletion game the class term is floored at the optimiser's goal (``stop_ratio`` of the
    original probability) rather than at ``floor``: the optimiser stops at the first mask that
    reaches the goal, so its masks are the smallest that do; a network rewarded below the goal
    learns to blur the whole image instead. ``goal`` overrides that ratio (lower: fuller masks that
    delete the class with a margin).
    """
    masks = explainer.upsample(low, x.shape[-2:])
    logits = model(explainer.perturb(x, masks))
    if config.game == "delete":
        goal = max(config.floor, config.stop_ratio if goal is None else goal)
    else:
        goal = config.floor
    floor = floor_score(p0, goal, config.score)
    return objective(low, logits, targets, config.game, config.l1_coeff, config.tv_coeff, config.tv_beta,
                     config.score, floor).mean()
