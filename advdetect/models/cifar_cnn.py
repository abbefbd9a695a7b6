"""The built-in CIFAR-10 classifier's architecture (``cifar10-cnn``).

A small fast convnet: a 2x2 patch-whitening stem, three conv groups (conv, max-pool,
BatchNorm, GELU, conv, BatchNorm, GELU) and a global max-pool into a linear head. It takes
*normalized* images; :class:`advdetect.models.wrapper.ModelWrapper` adds the normalization.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(cout),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.GELU(),
        )


class CifarCNN(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (64, 128, 256), stem_width: int = 24,
                 num_classes: int = 10, logit_scale: float = 1.0 / 9.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem_width, 2, padding=0, bias=True)
        self.stem_act = nn.GELU()
        self.groups = nn.Sequential(
            ConvGroup(stem_width, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2])
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem_act(self.stem(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale
