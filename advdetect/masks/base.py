"""What every mask method shares: its result, how it picks the class to explain, and its interface.

Every method (meaningful, extremal, robust perturbation, and the two-game masks) implements
:class:`Explainer`, as captum's attribution methods do: the constructor takes the model and the
configuration, ``attribute(images, target=None)`` takes the data and returns a
:class:`MaskResult`, and ``perturb(images, masks)`` applies masks the method's way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .config import MaskConfig

DEFAULT_BATCH = {"cpu": 32, "cuda": 512}  # images optimised together; cpu: best of 16-256 in scripts/bench_masks.py


@dataclass
class MaskResult:
    """Masks (1 = kept, 0 = perturbed) with what they did to the model."""

    masks: torch.Tensor  # float32 N x 1 x H x W in [0, 1]
    targets: torch.Tensor  # int64 N, the class each mask explains
    prob_before: torch.Tensor  # N, target probability on the image
    prob_after: torch.Tensor  # N, target probability on the perturbed image (no noise, no jitter)
    iterations: torch.Tensor  # int64 N, iterations each image used
    config: MaskConfig = field(default_factory=MaskConfig)
    low: torch.Tensor | None = None  # the optimised low-resolution masks the result upsamples (meaningful masks)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def deletion_ratio(self) -> torch.Tensor:
        """prob_after / prob_before per image (deletion succeeds when small)."""
        return self.prob_after / self.prob_before.clamp(min=1e-12)

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self),
            "mean_iterations": self.iterations.float().mean().item() if len(self) else 0.0,
            "mean_mask": self.masks.mean().item() if len(self) else 0.0,
            "deleted_fraction": (self.deletion_ratio <= 0.1).float().mean().item() if len(self) else 0.0,
        }


class Explainer(Protocol):
    """A mask method: ``Method(model, config).attribute(images, target=None) -> MaskResult``."""

    config: MaskConfig

    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None,
                  progress: bool = False) -> MaskResult:
        """Masks for ``images`` (N x C x H x W in [0, 1]) explaining ``target`` (default: the top prediction)."""
        ...

    def perturb(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` with ``masks`` (1 = kept) applied by this method's perturbation."""
        ...


def check_images(images: torch.Tensor) -> torch.Tensor:
    """``images`` as float32 N x C x H x W, detached; a ValueError for any other shape."""
    if images.dim() != 4:
        raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
    return images.detach().float()


def resolve_targets(probs: torch.Tensor, target: torch.Tensor | int | None) -> torch.Tensor:
    """The class each mask explains: the top prediction (``None``), one class for all, or one per image."""
    n = probs.shape[0]
    if target is None:
        return probs.argmax(1)
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=probs.device)
    targets = torch.as_tensor(target, device=probs.device).long().view(-1)
    if targets.shape[0] != n:
        raise ValueError(f"target has {targets.shape[0]} entries for {n} images")
    return targets
