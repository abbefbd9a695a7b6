"""Extremal and robust perturbation: the area constraint, cross-checking, batching, selection."""

from __future__ import annotations

import pytest
import torch

from advdetect.masks import (ExtremalPerturbation, MaskConfig, MeaningfulPerturbation, RobustPerturbation,
                             class_distortion_score, make_explainer)
from advdetect.masks.loss import area_loss, area_target
from advdetect.masks.parameterization import MaxConvGenerator
from advdetect.masks.perturbation import blur_pyramid, pyramid_blend

from ..conftest import SHARED_DATA, needs_builtin, needs_shared

AREA_TOLERANCE = 0.05  # |mean mask - a| and |fraction of pixels above 0.5 - a|


@pytest.fixture(scope="module")
def cifar():
    from advdetect.data import load_dataset
    from advdetect.models import load_model

    model = load_model("cifar10-cnn")
    images = load_dataset("cifar10", split="test", n=16, seed=5, data_dir=SHARED_DATA).images
    return model, images


def test_make_explainer_and_validation():
    model = torch.nn.Identity()
    assert isinstance(make_explainer(model, MaskConfig()), MeaningfulPerturbation)
    assert isinstance(make_explainer(model, MaskConfig(method="extremal")), ExtremalPerturbation)
    assert isinstance(make_explainer(model, MaskConfig(method="robust")), RobustPerturbation)
    with pytest.raises(ValueError, match="unknown mask method"):
        MaskConfig(method="gradcam")
    with pytest.raises(ValueError, match="robust perturbation is a deletion method"):
        MaskConfig(method="robust", game="preserve")
    with pytest.raises(ValueError, match="unknown game 'dual'"):
        MaskConfig(game="dual")
    with pytest.raises(ValueError, match="area"):
        MaskConfig(method="extremal", area=1.5)
    assert "area" not in MaskConfig().to_dict() and MaskConfig(method="extremal").to_dict()["area"] == 0.2
    assert MaskConfig(method="extremal", game="dual").kind == "extremal-dual"


def test_generator_pyramid_and_area_pieces():
    gen = MaxConvGenerator((16, 16), step=4, sigma=2.0, device=torch.device("cpu"))
    params = torch.zeros(2, 1, *gen.grid)
    params[0, 0, 2, 2] = 1.0
    mask = gen(params)
    assert mask.shape == (2, 1, 16, 16) and float(mask[1].max()) == 0.0
    assert float(mask[0, 0, 8, 8]) == pytest.approx(1.0, abs=0.02) and float(mask[0, 0, 0, 0]) < 0.05  # a smooth blob
    x = torch.rand(1, 3, 16, 16)
    pyr = blur_pyramid(x, 4.0, 5)
    assert torch.allclose(pyramid_blend(pyr, torch.ones(1, 1, 16, 16)), x)
    assert torch.allclose(pyramid_blend(pyr, torch.zeros(1, 1, 16, 16)), pyr[:, 0])
    r = area_target(100, 0.2, torch.device("cpu"))
    exact = torch.zeros(1, 1, 10, 10)
    exact.view(-1)[:20] = 1
    assert r.sum() == 20 and float(area_loss(exact, r)) == 0.0 and float(area_loss(torch.ones(1, 1, 10, 10), r)) > 0.5


@needs_shared
@needs_builtin
@pytest.mark.parametrize("game,area", [("preserve", 0.2), ("delete", 0.1), ("dual", 0.15)])
def test_extremal_masks_meet_the_area(cifar, game, area):
    model, images = cifar
    cfg = MaskConfig(method="extremal", game=game, area=area, iterations=120)
    r = ExtremalPerturbation(model, cfg).attribute(images[:8])
    region = 1 - r.masks if game == "delete" else r.masks  # the salient region of area a
    assert abs(float(region.mean()) - area) < AREA_TOLERANCE
    assert abs(float((region > 0.5).float().mean()) - area) < AREA_TOLERANCE
    if game == "preserve":  # a fifth of the image keeps most of the class
        assert float((r.prob_after / r.prob_before).median()) > 0.5
    if game == "delete":
        assert float((r.prob_after / r.prob_before).median()) < 0.5


@needs_shared
@needs_builtin
def test_cross_checking_keeps_non_target_predictions(cifar):
    """Measured on the built-in model: robust masks distort the other classes less than plain deletion."""
    model, images = cifar
    scores = {}
    for cfg in (MaskConfig(), MaskConfig(method="robust")):
        ex = make_explainer(model, cfg)
        r = ex.attribute(images)
        scores[cfg.method] = class_distortion_score(model, images, ex.perturb(images, r.masks), r.targets)
        assert float((r.prob_after / r.prob_before).median()) < 0.05  # both still delete the class
    assert float(scores["robust"].mean()) < 0.75 * float(scores["meaningful"].mean()), scores
    assert float(scores["robust"].median()) < float(scores["meaningful"].median())


@pytest.mark.parametrize("cfg", [MaskConfig(method="extremal", iterations=15, batch_size=8),
                                 MaskConfig(method="robust", iterations=20, batch_size=8)])
def test_batched_equals_one_at_a_time(tiny_model, tiny_images, cfg):
    x = tiny_images[:6]
    batched = make_explainer(tiny_model, cfg).attribute(x)
    alone = torch.cat([make_explainer(tiny_model, cfg).attribute(x[i:i + 1]).masks for i in range(len(x))])
    assert torch.allclose(batched.masks, alone, atol=1e-4)


@pytest.mark.parametrize("cfg", [MaskConfig(iterations=10), MaskConfig(game="both", iterations=10),
                                 MaskConfig(method="extremal", iterations=5), MaskConfig(method="robust", iterations=5)])
def test_methods_work_under_no_grad(tiny_model, tiny_images, cfg):
    # inference code often runs under torch.no_grad(); the mask loops differentiate the mask all the same
    x = tiny_images[:3]
    explainer = make_explainer(tiny_model, cfg)
    with torch.no_grad():
        inside = explainer.attribute(x)
    assert torch.equal(inside.masks, explainer.attribute(x).masks) and not inside.masks.requires_grad
    assert torch.is_grad_enabled()


def test_methods_leave_the_model_unchanged(tiny_model, tiny_images):
    tiny_model.train()
    flags = [p.requires_grad for p in tiny_model.parameters()]
    for cfg in (MaskConfig(method="extremal", iterations=3), MaskConfig(method="robust", iterations=3)):
        make_explainer(tiny_model, cfg).attribute(tiny_images[:2])
    assert tiny_model.training and [p.requires_grad for p in tiny_model.parameters()] == flags


@needs_shared
@needs_builtin
def test_both_games_stack_the_masks_each_game_gives_alone(cifar):
    """game="both": channel 0 is exactly the preservation mask, channel 1 exactly the deletion mask."""
    from advdetect.masks import TwoGamePerturbation

    model, images = cifar
    cfg = MaskConfig(game="both", iterations=30, batch_size=4)
    explainer = make_explainer(model, cfg)
    assert isinstance(explainer, TwoGamePerturbation) and cfg.kind == "both"
    both = explainer.attribute(images[:6])
    alone = {g: MeaningfulPerturbation(model, cfg.replace(game=g)).attribute(images[:6]) for g in ("preserve", "delete")}
    assert both.masks.shape == (6, 2, 32, 32)
    assert torch.equal(both.masks[:, :1], alone["preserve"].masks) and torch.equal(both.masks[:, 1:], alone["delete"].masks)
    assert not torch.equal(alone["preserve"].masks, alone["delete"].masks)
    assert torch.equal(both.targets, alone["delete"].targets) and torch.equal(both.prob_after, alone["delete"].prob_after)
    assert torch.equal(both.iterations, alone["preserve"].iterations + alone["delete"].iterations)
    deleter = make_explainer(model, cfg.replace(game="delete"))
    assert torch.equal(explainer.perturb(images[:6], both.masks), deleter.perturb(images[:6], alone["delete"].masks))


def test_both_games_validation():
    from advdetect.masks import TwoGamePerturbation

    with pytest.raises(ValueError, match="make_explainer"):
        MeaningfulPerturbation(torch.nn.Identity(), MaskConfig(game="both"))
    with pytest.raises(ValueError, match="game='both'"):
        TwoGamePerturbation(torch.nn.Identity(), MaskConfig())
    with pytest.raises(ValueError, match="unknown game 'both'"):
        MaskConfig(method="extremal", game="both")
    with pytest.raises(ValueError, match="unknown game 'both'"):
        MaskConfig(method="robust", game="both")
