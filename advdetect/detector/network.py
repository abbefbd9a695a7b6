"""A small AlexNet-style discriminator over mask heatmaps.

AlexNet's shape (five convolutions with max-pooling after the 1st, 2nd and 5th, then three
fully connected layers with dropout), scaled down for 32 x 32 single-channel masks: 3 x 3
kernels instead of 11/5, widths 32-64-96-96-64, 256-unit hidden layers. Larger masks are
pooled to 32 x 32 first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MASK_SIZE = 32


class MaskAlexNet(nn.Module):
    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 96, 96, 64), hidden: int = 256,
                 dropout: float = 0.5) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 16
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 8
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c5 * 16, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1),
        )

    def forward(self, masks: torch.Tensor, dropout_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Adversarial score (a logit) per map.

        ``dropout_masks`` (training only): one keep-mask per dropout layer, already scaled by
        1 / (1 - p), as :meth:`draw_dropout` makes them; without them dropout draws from torch's
        global generator as usual. Drawing them outside lets a data-parallel run give every
        sample the mask a single process would.
        """
        if masks.shape[-1] != MASK_SIZE or masks.shape[-2] != MASK_SIZE:
            masks = F.adaptive_avg_pool2d(masks, MASK_SIZE)
        x = self.features(masks)
        given = iter(dropout_masks) if dropout_masks is not None and self.training else None
        for layer in self.classifier:
            x = x * next(given) if given is not None and isinstance(layer, nn.Dropout) else layer(x)
        return x.squeeze(1)

    def draw_dropout(self, n: int, generator: torch.Generator, device: torch.device | str) -> list[torch.Tensor]:
        """Keep-masks for a batch of ``n`` samples, one per dropout layer, from ``generator`` (on CPU)."""
        masks = []
        for i, layer in enumerate(self.classifier):
            if isinstance(layer, nn.Dropout):
                width = next(m for m in self.classifier[i + 1:] if isinstance(m, nn.Linear)).in_features
                keep = (torch.rand(n, width, generator=generator) >= layer.p).float()
                masks.append((keep / (1 - layer.p) if layer.p < 1 else keep).to(device))
        return masks
