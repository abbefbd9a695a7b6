"""Amortized masks: the mask network, its training by the objective and by distillation, saving and loading."""

from __future__ import annotations

import json

import pytest
import torch

from advdetect.errors import AdvDetectError, OptionError
from advdetect.masks import MaskConfig, MeaningfulPerturbation
from advdetect.masks.amortized import AmortizedMasks, load_mask_net, mask_net_for, save_mask_net
from advdetect.masks.amortized_training import MaskNetFit, fit_mask_net

from ..conftest import SHARED_DATA, make_tiny_model, needs_builtin, needs_shared

CONFIG = MaskConfig(iterations=40)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_result_shapes_and_each_mask_as_alone():
    model = make_tiny_model()
    torch.manual_seed(0)
    net = mask_net_for(model.info, CONFIG)
    assert net.spec.low_shape == (8, 8)  # 16 px, upsample 2
    x = images()
    result = AmortizedMasks(model, net, CONFIG).attribute(x)
    assert result.masks.shape == (6, 1, 16, 16) and 0 <= result.masks.min() and result.masks.max() <= 1
    assert result.targets.tolist() == model.predict(x).tolist()
    assert ((0 <= result.iterations) & (result.iterations <= CONFIG.iterations)).all()
    for i in (0, 5):  # no batch statistics: an image's mask does not depend on the others
        alone = AmortizedMasks(model, net, CONFIG).attribute(x[i:i + 1])
        assert torch.allclose(alone.masks, result.masks[i:i + 1], atol=1e-6)
        assert alone.prob_after.item() == pytest.approx(result.prob_after[i].item(), abs=1e-6)
    # prob_after is the classifier's real probability on the image perturbed by the predicted mask
    explainer = AmortizedMasks(model, net, CONFIG)
    manual = model(explainer.perturb(x, result.masks)).softmax(1).gather(1, result.targets[:, None]).squeeze(1)
    assert torch.allclose(manual, result.prob_after, atol=1e-6)
    with pytest.raises(ValueError, match="meaningful deletion or preservation"):
        AmortizedMasks(model, net, CONFIG.replace(method="extremal"))


def test_distillation_learns_the_optimised_masks_and_leaves_the_model_alone():
    model = make_tiny_model().train()
    flags = [p.requires_grad for p in model.parameters()]
    x = images(48, seed=1)
    teacher = MeaningfulPerturbation(model.eval(), CONFIG).attribute(x)
    model.train()
    torch.manual_seed(0)
    net = mask_net_for(model.info, CONFIG, width=16)
    settings = MaskNetFit(loss="distill", epochs=150, batch_size=16, lr=5e-3)
    fit_mask_net(model, net, x, CONFIG, teacher_masks=teacher.masks, teacher_iterations=teacher.iterations,
                 settings=settings)
    predicted = AmortizedMasks(model, net, CONFIG).attribute(x).masks
    error = (predicted - teacher.masks).abs().mean()
    constant = (teacher.masks - teacher.masks.mean(0, keepdim=True)).abs().mean()  # the best image-blind guess
    shuffled = (predicted - teacher.masks.roll(1, 0)).abs().mean()  # another image's mask
    assert error < 0.6 * constant and error < 0.6 * shuffled, (error, constant, shuffled)
    assert settings.history[-1]["distill"] < settings.history[0]["distill"]
    assert settings.history[-1]["iterations"] < settings.history[0]["iterations"]
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


@needs_shared
@needs_builtin
def test_objective_training_deletes_the_class():
    """Trained on the mask objective alone (no teacher), the masks delete the class of real images."""
    from advdetect.data import load_cifar10
    from advdetect.models import load_model

    model, config = load_model("cifar10-cnn"), MaskConfig()
    x = load_cifar10("test", n=32, data_dir=SHARED_DATA, download=False).images
    torch.manual_seed(0)
    net = mask_net_for(model.info, config, width=16)
    start = AmortizedMasks(model, net, config).attribute(x)
    settings = MaskNetFit(loss="objective", epochs=20, batch_size=16, lr=3e-3)
    fit_mask_net(model, net, x, config, settings=settings)
    trained = AmortizedMasks(model, net, config).attribute(x)
    assert settings.history[-1]["objective"] < settings.history[0]["objective"]
    assert trained.deletion_ratio.mean() < 0.6 * start.deletion_ratio.mean(), (start.deletion_ratio.mean(),
                                                                              trained.deletion_ratio.mean())
    # a lower goal than the optimiser's stopping ratio keeps rewarding deletion past it: the whole-image
    # blur (mask 0) scores lower on the images it deletes below the stopping ratio, the same on the others
    from advdetect.masks.amortized_training import _objective

    explainer, zeros = AmortizedMasks(model, net, config), torch.zeros(len(x), 1, *net.spec.low_shape)
    with torch.no_grad():
        blurred = model(explainer.perturb(x, torch.zeros_like(x[:, :1]))).softmax(1)
        deleted = blurred.gather(1, trained.targets[:, None])[:, 0] < config.stop_ratio * trained.prob_before
        assert 0 < deleted.sum() < len(x)
        per_image = [torch.stack([_objective(model, explainer, x[i:i + 1], zeros[i:i + 1], trained.targets[i:i + 1],
                                             trained.prob_before[i:i + 1], config, goal) for i in range(len(x))])
                     for goal in (None, 0.001)]
    assert (per_image[1][deleted] < per_image[0][deleted] - 1e-3).all()
    assert torch.allclose(per_image[1][~deleted], per_image[0][~deleted])
    # and fit_mask_net trains on it: one epoch from the trained network, with and without the goal
    import copy

    losses = []
    for goal in (None, 0.001):
        run = MaskNetFit(loss="objective", epochs=1, batch_size=16, lr=1e-6, goal=goal)
        fit_mask_net(model, copy.deepcopy(net), x, config, settings=run)
        losses.append(run.history[0]["objective"])
    assert losses[1] < losses[0] - 1e-3, losses
    with pytest.raises(OptionError, match="goal"):
        MaskNetFit(goal=1.5)
    with pytest.raises(OptionError, match="teacher_masks"):
        fit_mask_net(model, net, x, config, settings=MaskNetFit(loss="distill", epochs=1))
    with pytest.raises(OptionError, match="unknown mask network loss"):
        MaskNetFit(loss="magic")


def test_save_load_round_trip_and_damaged_files(tmp_path):
    model = make_tiny_model()
    torch.manual_seed(0)
    net = mask_net_for(model.info, CONFIG)
    save_mask_net(tmp_path, net)
    loaded, meta = load_mask_net(tmp_path)
    x = images(3)
    targets = torch.tensor([0, 1, 2])
    probs = torch.full((3, 10), 0.1)
    assert torch.equal(loaded(x, targets, probs)[0], net.eval()(x, targets, probs)[0])
    meta_path = tmp_path / "mask_net.json"
    good = meta_path.read_text()
    meta_path.write_text(json.dumps({**json.loads(good), "weights": "../elsewhere.safetensors"}))
    with pytest.raises(AdvDetectError, match="damaged mask network"):
        load_mask_net(tmp_path)
    meta_path.write_text(json.dumps({**json.loads(good), "spec": {"in_channels": "x"}}))
    with pytest.raises(AdvDetectError, match="damaged mask network"):
        load_mask_net(tmp_path)
    meta_path.write_text(good)
    weights = tmp_path / "mask_net.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(AdvDetectError):
        load_mask_net(tmp_path)
    with pytest.raises(AdvDetectError, match="no mask network"):
        load_mask_net(tmp_path / "nothing")


def test_a_warm_start_from_the_constant_is_the_plain_optimisation():
    model = make_tiny_model()
    x = images(4, seed=5)
    plain = MeaningfulPerturbation(model, CONFIG).attribute(x)
    ones = torch.ones(4, 1, 8, 8)  # deletion starts from 1 everywhere
    warm = MeaningfulPerturbation(model, CONFIG).attribute(x, init=ones)
    assert torch.equal(plain.masks, warm.masks) and torch.equal(plain.iterations, warm.iterations)
    with pytest.raises(ValueError, match="low resolution"):
        MeaningfulPerturbation(model, CONFIG).attribute(x, init=torch.ones(4, 1, 16, 16))


def test_refinement_starts_from_the_predicted_masks():
    model = make_tiny_model()
    torch.manual_seed(0)
    net = mask_net_for(model.info, CONFIG)
    explainer = AmortizedMasks(model, net, CONFIG)
    x = images(5, seed=6)
    predicted = explainer.attribute(x)
    refined = explainer.attribute(x, refine=15)
    assert refined.iterations.tolist() == [15] * 5 and torch.equal(refined.targets, predicted.targets)
    probs = model(x).softmax(1)
    low, _ = explainer.predict(x, predicted.targets, probs)
    by_hand = MeaningfulPerturbation(model, CONFIG.replace(iterations=15, early_stop=False, check_every=10)).attribute(
        x, target=predicted.targets, init=low)
    assert torch.allclose(refined.masks, by_hand.masks, atol=1e-6)
    alone = explainer.attribute(x[2:3], refine=15)  # each image's refinement is its own
    assert torch.allclose(alone.masks, refined.masks[2:3], atol=1e-5)
    assert not torch.allclose(refined.masks, predicted.masks, atol=1e-3)
    assert (refined.deletion_ratio <= predicted.deletion_ratio + 1e-6).float().mean() >= 0.6
    with pytest.raises(ValueError, match="refine"):
        explainer.attribute(x, refine=-1)
