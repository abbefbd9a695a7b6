"""The real mask optimisation as a differentiable function of the image: gradients through its last iterations.

The adaptive attacker's surrogate (:class:`~.adaptive.MaskSurrogate`) only imitates the masks. This
module differentiates the optimisation itself (truncated unrolling, as in bilevel optimisation and
in attacks on optimisation-based defenses): for the current images it runs the real mask method
without gradients, then ``unroll`` more of its own descent steps on the mask objective *with* the
graph kept, so the final masks depend on the image through every term of the objective (the blur of
the image, the classifier on the blended image, the class score) and the attacker's gradient sees how
the optimised mask would move as the image moves. The detector's other inputs (the residual plane,
the target probability before and after the mask) are computed from the image and those masks, also
differentiably; the share of iterations used (a step function) is taken from the real run.

A PGD attack calls this once per step on images that move little, so after the first call each call
warm-starts the optimisation from the previous call's masks and runs ``refine`` iterations instead of
the whole budget (images whose explained class changed start cold, with the full optimisation). The
attacker judges its candidates on the real pipeline afterwards (:func:`~.adaptive.evaluate_adaptive`),
so these approximations can weaken the attack but never flatter the detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from ..detector.inputs import detector_maps
from ..errors import OptionError
from ..masks import MeaningfulPerturbation, TwoGamePerturbation
from ..masks.meaningful import floor_score
from ..masks.parameterization import base_grid, upsample
from ..masks.perturbation import blend
from ..models.wrapper import frozen


class UnrolledMaps(nn.Module):
    """Images -> the detector's maps of ``explainer``'s masks, differentiable through ``unroll`` descent steps.

    ``explainer``: a meaningful-perturbation method (one game, robust perturbation, or both games);
    ``inputs``: what the detector reads. ``refine``: iterations of the warm-started optimisation between
    calls (0: always the full optimisation from the game's start). ``step``: each unrolled step moves
    the mask by about this much per pixel (gradient normalised per image); default the optimiser's
    learning rate over ``unroll``, so the unrolled steps together move it about as far as one Adam step.
    Stateful: the masks of the last call are the next call's start for the images whose explained class
    is unchanged (same batch size); :meth:`reset` forgets them (a new attack run).
    """

    def __init__(self, explainer, inputs: Sequence[str], unroll: int = 5, refine: int = 10,
                 step: float | None = None) -> None:
        super().__init__()
        parts = explainer.parts if isinstance(explainer, TwoGamePerturbation) else [explainer]
        if not all(isinstance(part, MeaningfulPerturbation) for part in parts):
            raise OptionError(f"gradients through the mask optimisation need meaningful-perturbation masks "
                              f"(delete, preserve, both or robust), not {explainer.config.method!r}")
        if unroll < 1 or refine < 0:
            raise OptionError(f"unroll must be >= 1 and refine >= 0, got {unroll} and {refine}")
        self.parts, self.inputs, self.unroll, self.refine = parts, tuple(inputs), unroll, refine
        self.model = explainer.model
        self.budget = explainer.config.iterations
        self.step = step if step is not None else parts[0].config.lr / unroll
        self.warm = [type(part)(part.model, part.config.replace(iterations=max(refine, 1), early_stop=False))
                     for part in parts]
        self.reset()

    def reset(self) -> None:
        """Forget the masks of the last call: the next call runs the full optimisation."""
        self._low: list[torch.Tensor] | None = None
        self._targets: torch.Tensor | None = None
        self._iterations: list[torch.Tensor] | None = None

    def _optimised(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per game, the optimised low-resolution masks of ``x`` and the iterations the real run used."""
        cold = torch.ones(len(x), dtype=torch.bool, device=x.device)
        if self._low is not None and self._targets is not None and len(self._targets) == len(x) and self.refine:
            cold = self._targets.to(x.device) != targets
        lows, iterations = [], []
        for k, (part, warm) in enumerate(zip(self.parts, self.warm)):
            low = torch.empty(0)
            its = torch.zeros(len(x), dtype=torch.long, device=x.device)
            if (~cold).any():
                idx = (~cold).nonzero().flatten()
                res = warm.attribute(x[idx], target=targets[idx], init=self._low[k][idx])
                low = torch.empty(len(x), *res.low.shape[1:], device=x.device)
                low[idx] = res.low
                its[idx] = self._iterations[k].to(x.device)[idx]
            if cold.any():
                idx = cold.nonzero().flatten()
                res = part.attribute(x[idx], target=targets[idx])
                if low.numel() == 0:
                    low = torch.empty(len(x), *res.low.shape[1:], device=x.device)
                low[idx] = res.low
                its[idx] = res.iterations
            lows.append(low)
            iterations.append(its)
        self._low, self._targets, self._iterations = lows, targets.detach(), iterations
        return lows, iterations

    def _descend(self, part: MeaningfulPerturbation, x: torch.Tensor, low: torch.Tensor, targets: torch.Tensor,
                 p0: torch.Tensor) -> torch.Tensor:
        """``unroll`` normalised gradient steps of ``part``'s objective from ``low``, keeping the graph to ``x``."""
        cfg = part.config
        idx = torch.arange(len(x), device=x.device)
        grid = base_grid(tuple(x.shape[-2:]), x.device, x.dtype)
        ref = part._reference(x, idx)
        batch = SimpleNamespace(x=x, ref=ref, target=targets, p0=p0, log_floor=floor_score(p0, cfg.floor, cfg.score),
                                aux=part._aux(x, targets), idx=idx)
        mask = low.detach().clone().requires_grad_(True)
        for _ in range(self.unroll):  # (forward runs these under enable_grad: a no_grad caller still gets masks)
            up = upsample(mask, grid)
            logits = part._forward(blend(x, ref, up))
            loss = part._loss(mask, up, logits, batch, None)
            (grad,) = torch.autograd.grad(loss.sum(), mask, create_graph=True)
            scale = grad.pow(2).flatten(1).mean(1).add(1e-12).sqrt().view(-1, 1, 1, 1)
            mask = (mask - self.step * grad / scale).clamp(0, 1)
        return upsample(mask, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with frozen(self.model):  # eval mode (as the real pipeline runs it), the caller's state restored after
            return self._maps(x)

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.model(x).float().softmax(1)
        targets = probs.argmax(1)
        lows, iterations = self._optimised(x.detach(), targets.detach())
        p0 = probs.gather(1, targets[:, None]).squeeze(1)
        with torch.enable_grad():
            masks = [self._descend(part, x, low, targets, p0.detach()) for part, low in zip(self.parts, lows)]
        deletion = self.parts[-1]  # both games: channel 1 is the deletion mask, whose prob_after the maps read
        after = self.model(deletion.perturb(x, masks[-1])).float().softmax(1).gather(1, targets[:, None]).squeeze(1)
        return detector_maps(self.inputs, torch.cat(masks, 1), images=x, prob_before=p0, prob_after=after,
                             iterations=sum(iterations), budget=self.budget)


__all__ = ["UnrolledMaps"]
