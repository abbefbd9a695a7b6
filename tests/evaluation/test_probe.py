"""The gradient probe: does an attacker's stand-in for the mask pipeline give a gradient that moves the real score?"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdetect.detector import MaskDetector
from advdetect.detector.inputs import maps_for_result
from advdetect.errors import OptionError
from advdetect.evaluation.probe import gradient_probe
from advdetect.evaluation.unrolled import UnrolledMaps
from advdetect.masks import MaskConfig, make_explainer

INPUTS = ("masks", "residual", "confidence")


@pytest.fixture(scope="module")
def detector() -> MaskDetector:
    gen = torch.Generator().manual_seed(0)
    return MaskDetector(epochs=1, batch_size=32, inputs=",".join(INPUTS)).fit(torch.rand(40, 5, 32, 32, generator=gen),
                                                                              torch.arange(40) % 2)


def smooth_maps() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Sigmoid())


def test_a_faithful_stand_in_agrees_and_its_gradient_lowers_the_real_score(detector, tiny_images):
    pipeline = smooth_maps()
    real = lambda x: pipeline(x).detach()  # noqa: E731
    pipeline.train()
    out = gradient_probe(pipeline, detector, real, tiny_images[:32], step=1 / 255, seed=0)
    assert pipeline.training and all(p.requires_grad for p in pipeline.parameters())  # the caller's module restored
    assert out["n"] == 32
    assert out["score_corr"] == pytest.approx(1.0, abs=1e-4) and out["score_mae"] < 1e-4
    assert out["gradient_lowers"] >= 0.9 and out["gradient_change"] < 0
    assert out["gradient_change"] < out["random_change"]
    assert 0.1 <= out["random_lowers"] <= 0.9  # a random step goes either way


def test_a_stand_in_with_the_wrong_gradient_shows_it(detector, tiny_images):
    pipeline = smooth_maps()
    real = lambda x: pipeline(x).detach()  # noqa: E731
    x0 = tiny_images[:32]
    wrong = nn.Module()
    wrong.forward = lambda x: pipeline(2 * x0 - x)  # right maps at x0, the input gradient negated
    out = gradient_probe(wrong, detector, real, x0)
    # agreement of the scores alone would not have told: the step is what shows the gradient is wrong
    assert out["score_corr"] == pytest.approx(1.0, abs=1e-4)
    assert out["gradient_lowers"] <= 0.1 and out["gradient_change"] > out["random_change"]


def test_unrolled_stand_in_is_reset_and_refusals(detector, tiny_model, tiny_images):
    explainer = make_explainer(tiny_model, MaskConfig(iterations=20, upsample=2, min_iterations=5, check_every=5))
    unrolled = UnrolledMaps(explainer, INPUTS, unroll=2, refine=3)
    real = lambda x: maps_for_result(INPUTS, x, explainer.attribute(x))  # noqa: E731
    out = gradient_probe(unrolled, detector, real, tiny_images[:6])
    assert unrolled._low is None  # the probe leaves no warm start behind for the next attack
    assert all(torch.isfinite(torch.tensor(float(v))) for v in out.values())
    assert out["score_corr"] > 0.5  # the unrolled maps start from the real optimum
    with pytest.raises(OptionError, match="step"):
        gradient_probe(unrolled, detector, real, tiny_images[:6], step=0)
    with pytest.raises(OptionError, match="at least 2"):
        gradient_probe(unrolled, detector, real, tiny_images[:1])
