"""How well an attacker's differentiable stand-in for the mask pipeline serves it: evidence that an attack is strong.

An adaptive attack is only as good as the gradient it follows. For the surrogate network or the
unrolled optimisation (:class:`~.unrolled.UnrolledMaps`), :func:`gradient_probe` measures on clean
images (a) how well the detector's score on the stand-in's maps agrees with its score on the real maps,
and (b) whether one signed step of the stand-in's gradient of the detector score lowers the *real*
score, beside one random signed step of the same size (the control a useless gradient would match).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..detector import MaskDetector
from ..device import seeded
from ..errors import OptionError
from ..models.wrapper import frozen


def gradient_probe(attacked: nn.Module, detector: MaskDetector, real_maps: Callable[[torch.Tensor], torch.Tensor],
                   images: torch.Tensor, step: float = 1 / 255, seed: int = 0) -> dict[str, float | int]:
    """Agreement of ``attacked``'s maps with ``real_maps`` on ``images`` (pixel space, [0, 1]) as the detector
    scores them, and what one signed gradient step of size ``step`` (L-inf) does to the real score.

    Returns ``score_corr`` and ``score_mae`` (stand-in vs real score), ``gradient_lowers`` /
    ``random_lowers`` (share of images whose real score went down after the gradient / a random signed
    step) and ``gradient_change`` / ``random_change`` (mean change of the real score)."""
    if not 0 < step <= 1:
        raise OptionError(f"step must be in (0, 1], got {step}")
    if len(images) < 2:
        raise OptionError("the probe needs at least 2 images (it reports a correlation)")
    reset = getattr(attacked, "reset", None)
    net = detector._fitted()
    x = images.to(next(net.parameters()).device).float()
    with torch.no_grad():
        real = torch.as_tensor(detector.decision_function(real_maps(x).cpu())).float()
    if reset is not None:
        reset()  # an unrolled stand-in starts from the full optimisation, not from another batch's masks
    with frozen(net), frozen(attacked):
        xx = x.clone().requires_grad_(True)
        with torch.enable_grad():
            approx = net(attacked(xx)).float().reshape(-1)
            (grad,) = torch.autograd.grad(approx.sum(), xx)
    if reset is not None:
        reset()
    with seeded(seed):
        random_sign = torch.randint(0, 2, x.shape, device=x.device).float() * 2 - 1

    def real_change(direction: torch.Tensor) -> torch.Tensor:
        moved = (x - step * direction).clamp(0, 1)
        with torch.no_grad():
            return torch.as_tensor(detector.decision_function(real_maps(moved).cpu())).float() - real

    along, control = real_change(grad.sign()), real_change(random_sign)
    approx = approx.detach().cpu()
    return {"n": len(x), "step": step, "score_corr": float(torch.corrcoef(torch.stack([approx, real]))[0, 1]),
            "score_mae": float((approx - real).abs().mean()),
            "gradient_lowers": float((along < 0).float().mean()), "gradient_change": float(along.mean()),
            "random_lowers": float((control < 0).float().mean()), "random_change": float(control.mean())}


__all__ = ["gradient_probe"]
