"""Perturbation masks, with the pieces apart: perturbation operator (:mod:`.perturbation`),
mask parameterization (:mod:`.parameterization`), loss (:mod:`.loss`), optimiser loop
(:mod:`.engine`) and their settings (:mod:`.config`). Three methods share the interface
``Method(model, config).attribute(images, target=None) -> MaskResult`` and ``perturb``:
meaningful perturbation (:mod:`.engine`), extremal perturbation (:mod:`.extremal`) and
robust perturbation (:mod:`.robust`); :func:`make_explainer` picks one from the config
(meaningful ``game="both"``: both games' masks as two channels, :mod:`.stacked`)."""

from __future__ import annotations

from torch import nn

from .config import MaskConfig
from .engine import MaskResult, MeaningfulPerturbation, compute_masks
from .extremal import ExtremalPerturbation
from .robust import RobustPerturbation, class_distortion_score
from .stacked import StackedPerturbation


def make_explainer(model: nn.Module, config: MaskConfig | None = None):
    """The mask method ``config.method`` names, on ``model``."""
    config = config or MaskConfig()
    if config.method == "meaningful" and config.game == "both":
        return StackedPerturbation(model, config)
    cls = {"meaningful": MeaningfulPerturbation, "extremal": ExtremalPerturbation,
           "robust": RobustPerturbation}[config.method]
    return cls(model, config)


__all__ = ["ExtremalPerturbation", "MaskConfig", "MaskResult", "MeaningfulPerturbation", "RobustPerturbation",
           "StackedPerturbation", "class_distortion_score", "compute_masks", "make_explainer"]
