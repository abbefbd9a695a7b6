"""Gradients through the real mask optimisation (``UnrolledMaps``), on a tiny fixed model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdetect.detector import MaskDetector
from advdetect.detector.inputs import maps_for_result
from advdetect.errors import OptionError
from advdetect.evaluation.adaptive import AdaptiveConfig, adaptive_candidates
from advdetect.evaluation.unrolled import UnrolledMaps
from advdetect.masks import MaskConfig, make_explainer
from advdetect.models.wrapper import ModelInfo, ModelWrapper

INPUTS = ("masks", "residual", "confidence")


def config(game: str = "delete") -> MaskConfig:
    return MaskConfig(game=game, iterations=20, upsample=2, min_iterations=5, check_every=5)


def model_state(model):
    return model.training, [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("game", ["delete", "preserve", "both"])
def test_maps_match_the_real_pipeline_and_differentiate_through_the_optimisation(tiny_model, tiny_images, game):
    explainer = make_explainer(tiny_model, config(game))
    x = tiny_images[:6]
    real = maps_for_result(INPUTS, x, explainer.attribute(x))
    unrolled = UnrolledMaps(explainer, INPUTS, unroll=3)
    tiny_model.train()
    before = model_state(tiny_model)
    xx = x.clone().requires_grad_(True)
    maps = unrolled(xx)
    assert model_state(tiny_model) == before
    masks = real.shape[1] - 4
    assert maps.shape == real.shape
    # the unrolled steps move the real masks by about one optimiser step, no more
    assert float((maps[:, :masks] - real[:, :masks]).detach().abs().mean()) < config(game).lr
    planes, real_planes = maps[:, masks:].detach(), real[:, masks:]  # residual, prob before, after, iterations
    torch.testing.assert_close(planes[:, [0, 1, 3]], real_planes[:, [0, 1, 3]], atol=1e-5, rtol=1e-4)
    assert float((planes[:, 2] - real_planes[:, 2]).abs().max()) < 0.05  # prob after: of the moved masks
    # the mask channels alone carry a gradient to the image: it flows through the optimisation's steps
    (grad,) = torch.autograd.grad(maps[:, :masks].sum(), xx)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def smooth_model() -> ModelWrapper:
    """A tiny convnet without max-pooling, so its input gradient is smooth (finite differences hold)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 64, 10))
    info = ModelInfo("smooth", tuple(f"c{i}" for i in range(10)), (16, 16), (0.5,) * 3, (0.25,) * 3, "smooth-sha")
    return ModelWrapper(net, info).eval().double()


def test_unrolled_gradient_matches_finite_differences(tiny_images):
    model = smooth_model()
    explainer = make_explainer(model, config())
    unrolled = UnrolledMaps(explainer, ("masks",), unroll=3, step=0.01)
    x = tiny_images[:3].double()
    targets = model(x).argmax(1)
    p0 = model(x).softmax(1).gather(1, targets[:, None]).squeeze(1)
    # a start inside (0, 1): away from the clamp's and the area term's kinks, where no derivative exists
    low = 0.3 + 0.4 * torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = lambda z: unrolled._descend(explainer, z, low, targets, p0).sum()  # noqa: E731
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xx), xx)
    h = 1e-4
    numeric = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
    # 1%: the class term is computed in float32 (loss.class_term), the rest in float64
    assert float((grad * direction).sum()) == pytest.approx(float(numeric.detach()), rel=1e-2)
    assert abs(float(numeric)) > 1e-3  # the check is not between two zeros


def test_warm_start_state_and_reset(tiny_model, tiny_images, monkeypatch):
    explainer = make_explainer(tiny_model, config())
    unrolled = UnrolledMaps(explainer, INPUTS, unroll=1, refine=5)
    x = tiny_images[:5]
    first = unrolled(x).detach()
    calls = {"cold": 0, "warm": 0}
    cold, warm = explainer.attribute, unrolled.warm[0].attribute

    def count(name, fn):
        def wrapped(images, *args, **kwargs):
            calls[name] += len(images)
            return fn(images, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(explainer, "attribute", count("cold", cold))
    monkeypatch.setattr(unrolled.warm[0], "attribute", count("warm", warm))
    unrolled(x + 0.001)  # the same classes: every image warm-starts from the last call's masks
    assert calls == {"cold": 0, "warm": 5}
    unrolled.reset()
    again = unrolled(x).detach()  # after reset: the full optimisation, as the first call
    assert calls == {"cold": 5, "warm": 5}
    torch.testing.assert_close(again, first)
    unrolled(tiny_images[5:8])  # another batch size: cold
    assert calls == {"cold": 8, "warm": 5}


def test_refuses_masks_it_cannot_differentiate(tiny_model):
    with pytest.raises(OptionError, match="meaningful"):
        UnrolledMaps(make_explainer(tiny_model, MaskConfig(method="extremal", game="preserve")), ("masks",))
    with pytest.raises(OptionError, match="unroll"):
        UnrolledMaps(make_explainer(tiny_model, config()), ("masks",), unroll=0)


def test_pgd_through_the_unrolled_pipeline_stays_in_budget(tiny_model, tiny_images):
    gen = torch.Generator().manual_seed(0)
    det = MaskDetector(epochs=1, batch_size=32, inputs=",".join(INPUTS)).fit(torch.rand(40, 5, 32, 32, generator=gen),
                                                                 torch.arange(40) % 2)
    unrolled = UnrolledMaps(make_explainer(tiny_model, config()), INPUTS, unroll=2, refine=3)
    x = tiny_images[:4]
    y = tiny_model.predict(x)
    eps = 4 / 255
    candidates = adaptive_candidates(tiny_model, unrolled, det, x, y, AdaptiveConfig(eps=eps, steps=3, restarts=2))
    assert len(candidates) == 2
    for adv in candidates:
        assert float((adv - x).abs().max()) <= eps + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
        assert not torch.equal(adv, x)
