from __future__ import annotations

import pytest
import torch

from advdetect.errors import AdvDetectError
from advdetect.models.wrapper import ModelInfo, ModelWrapper, eval_mode, frozen, as_tuple


def test_normalization_lives_inside(tiny_model, tiny_images):
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    expected = tiny_model.net((tiny_images - mean) / 0.25)
    assert torch.allclose(tiny_model(tiny_images), expected, atol=1e-6)


def test_info_identity_and_dict(tiny_model):
    ident = tiny_model.info.identity()
    assert ident == {"name": "tiny", "sha256": "tiny-sha", "input_size": [16, 16], "num_classes": 10,
                     "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert tiny_model.info.to_dict()["mean"] == [0.5, 0.5, 0.5]


def test_check_input(tiny_model):
    tiny_model.check_input(torch.rand(2, 3, 16, 16))
    with pytest.raises(AdvDetectError, match="N x 3 x 16 x 16"):
        tiny_model.check_input(torch.rand(2, 1, 16, 16))
    with pytest.raises(AdvDetectError, match="NaN"):
        tiny_model.check_input(torch.full((1, 3, 16, 16), float("nan")))


def test_predict_restores_training_mode(tiny_model, tiny_images):
    tiny_model.train()
    before = tiny_model.net[1].running_mean.clone()
    tiny_model.predict(tiny_images)
    assert tiny_model.training
    assert torch.equal(before, tiny_model.net[1].running_mean)  # eval mode during predict


def test_frozen_restores_flags(tiny_model):
    tiny_model.net[0].weight.requires_grad_(False)
    tiny_model.train()
    with frozen(tiny_model):
        assert not any(p.requires_grad for p in tiny_model.parameters())
        assert not tiny_model.training
    assert not tiny_model.net[0].weight.requires_grad and tiny_model.net[0].bias.requires_grad
    assert tiny_model.training
    with eval_mode(tiny_model):
        pass
    assert all(m.training for m in tiny_model.modules())


def test_bad_normalization():
    info = ModelInfo("x", ("a",), (4, 4), (0.5,), (0.0,))
    with pytest.raises(ValueError, match="positive"):
        ModelWrapper(torch.nn.Identity(), info)
    assert as_tuple(0.5, 3, "mean") == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="1 or 3"):
        as_tuple([0.1, 0.2], 3, "mean")
