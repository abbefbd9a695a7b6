"""The per-sample objective of the meaningful-perturbation games.

Everything returns one value per sample (shape N), so summing over the batch gives each
mask exactly the gradient it would get alone.
"""

from __future__ import annotations

import torch

GAMES = ("delete", "preserve")


def l1_term(mask: torch.Tensor, game: str) -> torch.Tensor:
    """Mean area perturbed (deletion: 1 - m) or kept (preservation: m), per sample."""
    area = (1 - mask) if game == "delete" else mask
    return area.abs().flatten(1).mean(1)


def tv_term(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Total variation with exponent beta: mean of |dm/dx|^beta + |dm/dy|^beta, per sample."""
    dx = (mask[..., :, 1:] - mask[..., :, :-1]).abs().pow(beta).flatten(1).mean(1)
    dy = (mask[..., 1:, :] - mask[..., :-1, :]).abs().pow(beta).flatten(1).mean(1)
    return dx + dy


SCORES = ("prob", "log_prob", "log_odds")


def class_term(logits: torch.Tensor, target: torch.Tensor, game: str, score: str = "prob",
               log_floor: torch.Tensor | None = None) -> torch.Tensor:
    """The class evidence to remove (deletion) or keep (preservation).

    ``prob`` is the paper's softmax probability (deletion drives it down, preservation
    drives ``1 - p`` down); ``log_prob`` uses ``log p`` (deletion) and ``-log p``
    (preservation), which keeps pushing once ``p`` is small; ``log_odds`` uses
    ``log(p / (1 - p))``, which also keeps its gradient on saturated, over-confident
    predictions. In the deletion game, ``log_floor`` (per sample, in the score's own units:
    log p, or log-odds) caps the reward: below it the class counts as deleted and only
    the mask's area and smoothness are optimised, so the mask settles at the smallest
    deletion that reaches the floor.
    """
    logits = logits.float()
    if score == "log_odds":
        # log(p / (1 - p)) = z_t - logsumexp of the other logits; its gradient does not vanish
        # when the softmax saturates (p == 1.0 in float32), unlike log p's.
        others = logits.scatter(1, target.view(-1, 1), float("-inf"))
        odds = logits.gather(1, target.view(-1, 1)).squeeze(1) - others.logsumexp(1)
        if log_floor is not None and game == "delete":
            odds = torch.maximum(odds, log_floor)
        return odds if game == "delete" else -odds
    logp = logits.log_softmax(1).gather(1, target.view(-1, 1)).squeeze(1)
    if log_floor is not None and game == "delete":
        logp = torch.maximum(logp, log_floor)
    if score == "log_prob":
        return logp if game == "delete" else -logp
    prob = logp.exp()
    return prob if game == "delete" else 1 - prob


def objective(mask_low: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, game: str,
              l1_coeff: float, tv_coeff: float, tv_beta: float, score: str = "prob",
              log_floor: torch.Tensor | None = None) -> torch.Tensor:
    """lambda1 * area + lambda2 * TV_beta(mask) + class term, one value per sample.

    Area and TV are taken on the low-resolution mask that is optimised (the upsampled mask
    is a fixed linear function of it), which keeps the loss cheap.
    """
    return (l1_coeff * l1_term(mask_low, game) + tv_coeff * tv_term(mask_low, tv_beta)
            + class_term(logits, target, game, score, log_floor))


def area_target(n_pixels: int, area: float, device: torch.device) -> torch.Tensor:
    """r_a sorted ascending: (1 - a) zeros, then a ones."""
    ones = int(round(area * n_pixels))
    return torch.cat([torch.zeros(n_pixels - ones, device=device), torch.ones(ones, device=device)])


def area_loss(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, mean squared difference between the sorted mask and r_a."""
    return ((mask.flatten(1).sort(dim=1).values - target) ** 2).mean(1)
