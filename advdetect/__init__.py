"""advdetect: detect adversarial images from their meaningful-perturbation masks."""

__version__ = "0.1.0"
