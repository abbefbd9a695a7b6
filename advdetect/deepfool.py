"""DeepFool (Moosavi-Dezfooli et al. 2016) over a whole batch at once.

torchattacks' ``DeepFool`` runs one image at a time, with one backward pass per class per image and
step: at ~0.8 s an image on the 2-core CPU it was most of the cost of attacking a training set.
This is the same algorithm, step for step as torchattacks 3.5 does it, for every image of the batch
together: at each step every image still classified as its label is linearised, the nearest wrong
class's boundary is found from the logit differences and gradient differences, and the image moves
``(1 + overshoot)`` times the distance to it, clamped to [0, 1]; an image stops as soon as the model
no longer predicts its label (it is then returned as it is), or when a step leaves it exactly where
it was (torchattacks' overshoot scales each step, not the total, so an image that lands on a boundary
with a logit gap of zero stays there: torchattacks repeats that same step until ``steps``).

The class gradients come from one backward pass per class over the batch (the images are
independent in eval mode, so the gradient of the batch's summed logit is each image's own), and
the nearest boundary is kept as a running minimum over the classes, so memory stays a few copies of
the batch whatever the number of classes. One deliberate difference: a wrong class whose gradient
equals the label's (a 0/0 or 1/0 distance) is skipped, where torchattacks would return a NaN image.
"""

from __future__ import annotations

import torch
from torch import nn


class BatchedDeepFool:
    """``BatchedDeepFool(model, steps=50, overshoot=0.02)(images, labels)``: images in [0, 1]."""

    def __init__(self, model: nn.Module, steps: int = 50, overshoot: float = 0.02) -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if overshoot < 0:
            raise ValueError(f"overshoot must be non-negative, got {overshoot}")
        self.model, self.steps, self.overshoot = model, steps, overshoot

    def set_device(self, device: torch.device) -> None:
        """Kept for the torchattacks interface: the device follows the images."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adv = images.detach().clone()
        labels = labels.to(images.device)
        active = torch.arange(len(adv), device=adv.device)
        for _ in range(self.steps):
            if len(active) == 0:
                break
            moved, still = self._step(adv[active], labels[active])
            adv[active] = moved
            active = active[still]
        return adv

    def _step(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DeepFool step for each image: (the moved images, which ones go on: still correct, and moved)."""
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            correct = logits.argmax(1) == label
            n, classes = logits.shape
            rows = torch.arange(n, device=x.device)
            w0 = torch.autograd.grad(logits[rows, label].sum(), x, retain_graph=True)[0]
            f0 = logits.detach()[rows, label]
            best = torch.full((n,), float("inf"), device=x.device)
            step = torch.zeros_like(x)
            for k in range(classes):
                wk = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < classes)[0]
                w_prime = wk - w0
                f_prime = (logits.detach()[:, k] - f0).abs()
                norm = w_prime.flatten(1).norm(dim=1)
                value = torch.nan_to_num(f_prime / norm, nan=float("inf"), posinf=float("inf"))
                value[label == k] = float("inf")
                nearer = value < best  # strict: the first class of a tie, as torch.min picks
                best = torch.where(nearer, value, best)
                scale = (f_prime / norm.square()).view(-1, *[1] * (x.dim() - 1))
                step = torch.where(nearer.view_as(scale), scale * w_prime, step)
        x = x.detach()
        go = correct.view(-1, *[1] * (x.dim() - 1))
        moved = torch.where(go, torch.clamp(x + (1 + self.overshoot) * step, 0, 1), x)
        # an image this step leaves exactly where it was would take the same step at every later one
        return moved, correct & (moved != x).flatten(1).any(dim=1)
