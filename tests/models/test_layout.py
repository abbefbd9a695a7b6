"""Channels-last weights for inference: kept only where the outputs stay the same."""

from __future__ import annotations

import torch
from torch import nn

from advdetect.models.layout import prefer_channels_last

from ..conftest import make_tiny_model


class ViewsItsFeatures(nn.Module):
    """A forward that calls .view on a feature map: it breaks on channels-last strides."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).view(x.shape[0], -1))


def test_a_convnet_is_converted_and_gives_the_same_outputs():
    model = make_tiny_model()
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    assert prefer_channels_last(model, lambda: model(x))
    conv = model.net[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # still a parameter, still trainable


def test_a_module_that_breaks_on_channels_last_is_left_contiguous():
    module = ViewsItsFeatures().eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        before = module(x)
    assert not prefer_channels_last(module, lambda: module(x))
    assert module.conv.weight.is_contiguous()
    with torch.no_grad():
        assert torch.equal(module(x), before)


def test_a_module_whose_outputs_change_is_converted_back():
    module = make_tiny_model()
    calls = iter([torch.zeros(2), torch.ones(2)])  # "outputs" that disagree before and after
    assert not prefer_channels_last(module, lambda: next(calls))
    assert all(p.is_contiguous() for p in module.parameters())
    assert not prefer_channels_last(nn.Linear(3, 2), lambda: torch.zeros(1))  # no 4-D weights: nothing to do
