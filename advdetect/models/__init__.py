"""Classifiers behind one wrapper: images in [0, 1] in, logits out."""

from .registry import BUILTIN_MODELS, check_same_classifier, load_model, load_recorded_model, resolve_model
from .wrapper import ModelInfo, ModelWrapper, eval_mode, frozen

__all__ = ["BUILTIN_MODELS", "ModelInfo", "ModelWrapper", "check_same_classifier", "eval_mode", "frozen", "load_model",
           "load_recorded_model", "resolve_model"]
