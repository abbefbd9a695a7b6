"""Perturbation masks, with the pieces apart as in TorchRay: perturbation operators
(:mod:`.perturbation`), mask parameterizations (:mod:`.parameterization`), losses (:mod:`.loss`),
the per-sample optimiser (:mod:`.optimizer`) and the settings (:mod:`.config`). Every method
implements :class:`~.base.Explainer` (``Method(model, config).attribute(images, target=None) ->
MaskResult`` and ``perturb``): meaningful perturbation (:mod:`.meaningful`), extremal
perturbation (:mod:`.extremal`), robust perturbation (:mod:`.robust`) and both meaningful
games as two channels (:mod:`.two_games`); :func:`make_explainer` picks one from the config."""

from __future__ import annotations

from torch import nn

from .base import Explainer, MaskResult
from .config import MaskConfig
from .extremal import ExtremalPerturbation
from .meaningful import MeaningfulPerturbation, compute_masks
from .robust import RobustPerturbation, class_distortion_score
from .two_games import TwoGamePerturbation


def make_explainer(model: nn.Module, config: MaskConfig | None = None) -> Explainer:
    """The mask method ``config.method`` names, on ``model``."""
    config = config or MaskConfig()
    if config.method == "meaningful" and config.game == "both":
        return TwoGamePerturbation(model, config)
    cls = {"meaningful": MeaningfulPerturbation, "extremal": ExtremalPerturbation,
           "robust": RobustPerturbation}[config.method]
    return cls(model, config)


__all__ = ["Explainer", "ExtremalPerturbation", "MaskConfig", "MaskResult", "MeaningfulPerturbation",
           "RobustPerturbation", "TwoGamePerturbation", "class_distortion_score", "compute_masks", "make_explainer"]
