from __future__ import annotations

import pytest
import torch
import torchattacks

from advdetect.deepfool import BatchedDeepFool
from advdetect.models.wrapper import frozen


def test_batched_deepfool_takes_torchattacks_steps_for_every_image(tiny_model, tiny_images):
    labels = tiny_model.predict(tiny_images)
    labels[:4] = (labels[:4] + 1) % 10  # already wrong for these: both must return them untouched
    with frozen(tiny_model):
        reference = torchattacks.DeepFool(tiny_model, steps=50, overshoot=0.02)(tiny_images, labels)
        batched = BatchedDeepFool(tiny_model, steps=50, overshoot=0.02)(tiny_images, labels)
    assert batched.shape == tiny_images.shape and batched.dtype == torch.float32
    assert torch.equal(batched[:4], tiny_images[:4])
    moved = (batched - tiny_images).flatten(1).norm(dim=1)
    assert (moved[4:] > 0).all()
    # the same algorithm up to float rounding of a batched versus a one-image forward pass
    assert (batched - reference).abs().max() < 1e-5
    assert torch.allclose(moved, (reference - tiny_images).flatten(1).norm(dim=1), atol=1e-5)


def test_batched_deepfool_stops_each_image_when_it_is_misclassified(tiny_model, tiny_images):
    labels = tiny_model.predict(tiny_images)
    with frozen(tiny_model):
        one = BatchedDeepFool(tiny_model, steps=1)(tiny_images, labels)
        many = BatchedDeepFool(tiny_model, steps=50)(tiny_images, labels)
    fooled_in_one = tiny_model.predict(one) != labels
    assert fooled_in_one.any()
    # an image fooled by the first step is not moved again
    assert torch.allclose(many[fooled_in_one], one[fooled_in_one], atol=1e-6)
    assert (tiny_model.predict(many) != labels).float().mean() >= (tiny_model.predict(one) != labels).float().mean()


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"overshoot": -0.1}])
def test_batched_deepfool_rejects_bad_options(tiny_model, kwargs):
    with pytest.raises(ValueError):
        BatchedDeepFool(tiny_model, **kwargs)


class Tied(torch.nn.Module):
    """Classes 0 and 1 always have the same logit, above class 2's: DeepFool's step from class 0 is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, s, s - 1], dim=1)


def test_batched_deepfool_stops_an_image_its_step_leaves_where_it_was():
    model, images = Tied(), torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    adv = BatchedDeepFool(model, steps=50)(images, torch.zeros(3, dtype=torch.long))
    assert torch.equal(adv, images)
    assert model.calls == 1  # torchattacks would repeat the same zero step 50 times
