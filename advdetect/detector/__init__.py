"""The heatmap discriminator: network, estimator, metrics and persistence."""

from .detector import MaskDetector
from .io import load_detector, save_detector
from .metrics import detection_metrics, threshold_for_fpr, tpr_at_fpr
from .network import MaskAlexNet

__all__ = ["MaskAlexNet", "MaskDetector", "detection_metrics", "load_detector", "save_detector",
           "threshold_for_fpr", "tpr_at_fpr"]
