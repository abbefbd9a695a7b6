"""Adam written out per sample, shared by the mask loops.

Each image's mask (or mask parameters) has its own first and second moments and its own step
count, so an image gets the update optimising it alone would give, whichever batch it is in.
``t`` is the step count after this update: a number for a batch in lockstep, or a tensor with
one entry per image (broadcast against the parameters) when images step independently.
"""

from __future__ import annotations

import torch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@torch.no_grad()
def adam_direction(grad: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Update the moments ``m1``, ``m2`` in place with ``grad``; return Adam's bias-corrected step direction."""
    b1, b2 = ADAM_BETAS
    m1.mul_(b1).add_(grad, alpha=1 - b1)
    m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    return (m1 / (1 - b1 ** t)) / ((m2 / (1 - b2 ** t)).sqrt() + ADAM_EPS)
