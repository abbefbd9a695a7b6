"""Label recovery: apply an image's own mask back to it and classify again.

For an adversarial image, the deletion mask of its (adversarial) prediction blurs away the
evidence for that class, so the classifier often falls back to the label it gave the clean
image (Fong & Vedaldi 2017, section 6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .masks import MaskConfig, make_explainer
from .models.wrapper import ModelWrapper


@dataclass
class Recovery:
    logits: torch.Tensor  # N x K on the masked images
    top5: torch.Tensor  # N x 5 class indices, best first

    @property
    def top1(self) -> torch.Tensor:
        return self.top5[:, 0]


def recover(model: ModelWrapper, images: torch.Tensor, masks: torch.Tensor, config: MaskConfig | None = None) -> Recovery:
    """Classify ``images`` with their ``masks`` applied (the config's perturbation)."""
    explainer = make_explainer(model, config or MaskConfig())
    with torch.no_grad():
        perturbed = explainer.perturb(images, masks.to(images.device))
    logits = model.logits(perturbed).cpu()
    return Recovery(logits, logits.topk(min(5, logits.shape[1]), dim=1).indices)


@dataclass
class RecoveryMetrics:
    """Fractions over successful adversarial images (recovery) and clean images (harm)."""

    n_adversarial: int
    recovery_top1: float  # recovered top-1 == the clean prediction
    recovery_top5: float  # clean prediction within the recovered top-5
    recovery_ground_truth: float  # recovered top-1 == the true label
    recovery_ground_truth_top5: float
    n_clean: int
    harm: float  # detect-then-recover: clean, correctly classified images whose label the pipeline changes
    harm_unconditional: float  # the mask applied to every clean correct image changes its label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recovery_metrics(model: ModelWrapper, clean: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor,
                     clean_pred: torch.Tensor, adv_pred: torch.Tensor, clean_masks: torch.Tensor,
                     adv_masks: torch.Tensor, clean_flagged: torch.Tensor | None = None,
                     config: MaskConfig | None = None) -> RecoveryMetrics:
    """Recovery over successful attacks and harm over correctly classified clean images.

    ``clean_flagged`` (bool per image) says which clean images the detector flags; only those
    are "recovered" in the deployed pipeline, so only those can be harmed.
    """
    correct = clean_pred == labels
    success = correct & (adv_pred != labels)
    device = model.device
    rec_adv = recover(model, adv[success].to(device), adv_masks[success], config)
    truth = labels[success].cpu()
    clean_label = clean_pred[success].cpu()
    rec_clean = recover(model, clean[correct].to(device), clean_masks[correct], config)
    changed = rec_clean.top1 != clean_pred[correct].cpu()
    flagged = clean_flagged[correct.cpu()] if clean_flagged is not None else torch.ones_like(changed)

    def frac(x: torch.Tensor) -> float:
        return float(x.float().mean()) if x.numel() else float("nan")

    return RecoveryMetrics(
        n_adversarial=int(success.sum()),
        recovery_top1=frac(rec_adv.top1 == clean_label),
        recovery_top5=frac((rec_adv.top5 == clean_label[:, None]).any(1)),
        recovery_ground_truth=frac(rec_adv.top1 == truth),
        recovery_ground_truth_top5=frac((rec_adv.top5 == truth[:, None]).any(1)),
        n_clean=int(correct.sum()),
        harm=frac(changed & flagged.bool()),
        harm_unconditional=frac(changed),
    )
