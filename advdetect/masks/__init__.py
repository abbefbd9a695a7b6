"""Meaningful-perturbation masks, with the pieces apart: perturbation operator
(:mod:`.perturbation`), mask parameterization (:mod:`.parameterization`), loss
(:mod:`.loss`), optimiser loop (:mod:`.engine`) and their settings (:mod:`.config`)."""

from .config import MaskConfig
from .engine import MaskResult, MeaningfulPerturbation, compute_masks

__all__ = ["MaskConfig", "MaskResult", "MeaningfulPerturbation", "compute_masks"]
