"""Both meaningful-perturbation games read together: ``game="both"``.

The discriminator sees more than either mask alone when it gets the preservation mask (the
smallest region that keeps the class) and the deletion mask (the smallest region whose blur
removes it) of the same image as two channels. Each channel is exactly the mask its own game
gives with the same settings, so a cached mask set of either game stays valid.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OptionError
from .base import MaskResult
from .config import BOTH_CHANNELS, MaskConfig
from .meaningful import MeaningfulPerturbation


class TwoGamePerturbation:
    """Masks N x 2 x H x W: channel 0 the preservation mask, channel 1 the deletion mask.

    ``targets`` and ``prob_before`` are the images' (shared by both games); ``prob_after``
    is the deletion channel's (the target's probability once the deletion mask is applied)
    and ``iterations`` the sum over both games. :meth:`perturb` applies the deletion channel.
    """

    def __init__(self, model: nn.Module, config: MaskConfig | None = None) -> None:
        config = config or MaskConfig(game="both")
        if config.method != "meaningful" or config.game != "both":
            raise OptionError(f"TwoGamePerturbation makes game='both' meaningful masks, got method={config.method!r} "
                             f"game={config.game!r}; use make_explainer(model, config)")
        self.model = model
        self.config = config
        self.parts = [MeaningfulPerturbation(model, config.replace(game=game)) for game in BOTH_CHANNELS]

    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None,
                  progress: bool = False) -> MaskResult:
        preserve, delete = (part.attribute(images, target, progress) for part in self.parts)
        return MaskResult(masks=torch.cat([preserve.masks, delete.masks], 1), targets=delete.targets,
                          prob_before=delete.prob_before, prob_after=delete.prob_after,
                          iterations=preserve.iterations + delete.iterations, config=self.config)

    def perturb(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` with the deletion channel of ``masks`` applied (one-channel masks: applied as they are)."""
        return self.parts[1].perturb(images, masks[:, -1:])
