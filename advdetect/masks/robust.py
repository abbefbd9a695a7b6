"""Robust Perturbation: deletion masks with cross-checking (Kim et al., IEEE TIP 2021).

Plain deletion can "succeed" by distorting the prediction: blurring a region removes the
target class but also creates evidence for some other class. Robust Perturbation optimises
the mask with two branches that check each other:

* the **perturbed branch** (the region deleted) must lower the target class, as in the
  meaningful-perturbation deletion game, *while keeping the non-target predictions*: the
  KL divergence between the non-target class distribution of the image and that of the
  perturbed image is penalised (``cross_coeff``);
* the **preserved branch** (only the deleted region kept, the rest perturbed) must keep the
  target class (``preserve_coeff``), so the mask covers the class's own evidence.

Everything else (parameterization, area and TV terms, jitter, noise, early stopping,
continuous batching) is the meaningful-perturbation loop, so masks batch the same way.

The **class distortion score** measures what the cross-check prevents: how far the
non-target class distribution moved, as the total-variation distance between the
renormalised non-target probabilities before and after perturbation (0 = untouched,
1 = completely changed). This is our formulation of the paper's idea; the paper's own
metric may weigh classes differently.
"""

from __future__ import annotations

import torch

from .loss import class_term
from .meaningful import ActiveBatch, MeaningfulPerturbation
from .perturbation import blend


def non_target_log_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log of the softmax over the non-target classes (the target's entry is -inf)."""
    masked = logits.float().scatter(1, target.view(-1, 1), float("-inf"))
    return masked.log_softmax(1)


def class_distortion_score(model: torch.nn.Module, images: torch.Tensor, perturbed: torch.Tensor,
                           target: torch.Tensor) -> torch.Tensor:
    """Per image, total-variation distance between the non-target distributions (in [0, 1])."""
    with torch.no_grad():
        before = non_target_log_probs(model(images), target).exp()
        after = non_target_log_probs(model(perturbed), target).exp()
    return 0.5 * (before - after).abs().sum(1)


class RobustPerturbation(MeaningfulPerturbation):
    """Cross-checking deletion masks; ``MaskConfig(method="robust")`` selects it."""

    def _aux(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The image's non-target log-probabilities, with 0 in the target's place."""
        with torch.no_grad():
            return non_target_log_probs(self._forward(x), target).nan_to_num(neginf=0.0)

    def _loss(self, mask_low: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor, a: ActiveBatch,
              noise: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        base = super()._loss(mask_low, mask, logits, a, noise)
        # perturbed branch keeps the non-target predictions: KL(original || perturbed) over non-targets;
        # both log-distributions hold 0 in the target's place, so its term is 1 * (0 - 0) = 0
        after = non_target_log_probs(logits, a.target).nan_to_num(neginf=0.0)
        kl = (a.aux.exp() * (a.aux - after)).sum(1)
        # preserved branch: only the deleted region kept must still show the target class
        preserved = blend(a.x, a.ref, 1 - mask)
        if noise is not None:
            preserved = preserved + noise
        keep_target = class_term(self._forward(preserved), a.target, "preserve", cfg.score)
        return base + cfg.cross_coeff * kl + cfg.preserve_coeff * keep_target
