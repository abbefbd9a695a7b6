"""Baseline heatmaps, the adaptive attacker's surrogate and PGD, on a tiny fixed model."""

from __future__ import annotations

import pytest
import torch

from advdetect.detector import MaskDetector
from advdetect.evaluation.adaptive import AdaptiveConfig, adaptive_pgd, evaluate_adaptive, train_surrogate
from advdetect.masks import MaskConfig, make_explainer
from advdetect.evaluation.config import EvaluateConfig, Spec, eps_tag, parse_settings, sweep
from advdetect.evaluation.heatmaps import HEATMAP_METHODS, heatmaps
from advdetect.evaluation.report import json_safe


def model_state(model):
    return model.training, [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("method", HEATMAP_METHODS)
def test_heatmaps_shape_range_and_model_untouched(tiny_model, tiny_images, method):
    tiny_model.train()
    before = model_state(tiny_model)
    maps = heatmaps(tiny_model, tiny_images[:8], method)
    assert model_state(tiny_model) == before
    channels = 3 if method == "raw_image" else 1
    assert maps.shape == (8, channels, 16, 16) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    if method != "raw_image":
        assert torch.allclose(maps.flatten(1).amax(1), torch.ones(8))  # each map scaled to its maximum
        assert float(maps.std()) > 0


def test_heatmaps_follow_the_target(tiny_model, tiny_images):
    a = heatmaps(tiny_model, tiny_images[:4], "saliency", targets=torch.zeros(4, dtype=torch.long))
    b = heatmaps(tiny_model, tiny_images[:4], "saliency", targets=torch.full((4,), 3))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("image_channels", [3, 1])  # RGB and grayscale classifiers
def test_surrogate_learns_a_mapping(image_channels):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(600, image_channels, 16, 16, generator=gen)
    masks = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 3, 1, 1)  # a learnable target
    net, stats = train_surrogate(images, masks, epochs=30, seed=0)
    constant = float((masks - masks.mean()).abs().mean())
    assert stats["val_l1"] < 0.5 * constant, (stats, constant)
    assert not any(p.requires_grad for p in net.parameters())


def test_adaptive_pgd_stays_in_budget_and_fools(tiny_model, tiny_images):
    gen = torch.Generator().manual_seed(0)
    det = MaskDetector(epochs=1, batch_size=32).fit(torch.rand(40, 1, 16, 16, generator=gen), torch.arange(40) % 2)
    surrogate, _ = train_surrogate(tiny_images, tiny_images.mean(1, keepdim=True), epochs=1)
    x = tiny_images[:16]
    y = tiny_model.predict(x)
    before = model_state(tiny_model)
    eps = 8 / 255
    adv = adaptive_pgd(tiny_model, surrogate, det, x, y, AdaptiveConfig(eps=eps, steps=10, restarts=2))
    assert model_state(tiny_model) == before
    assert float((adv - x).abs().max()) <= eps + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert (tiny_model.predict(adv) != y).float().mean() > 0.5
    with pytest.raises(ValueError, match="eps"):
        AdaptiveConfig(eps=0)


def attacked_setup(model, images):
    """16 images, a detector fitted on their masks vs masks of noisy copies, a surrogate, the mask settings."""
    gen = torch.Generator().manual_seed(1)
    x = images[:16]
    y = model.predict(x)
    mask_config = MaskConfig(iterations=20, early_stop=False)
    explainer = make_explainer(model, mask_config)
    clean_masks = explainer.attribute(x).masks
    noisy_masks = explainer.attribute((x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)).masks
    det = MaskDetector(epochs=3, batch_size=16, seed=0).fit(torch.cat([clean_masks, noisy_masks] * 2),
                                                           torch.arange(64) // 16 % 2)
    surrogate, _ = train_surrogate(x, clean_masks, epochs=2)
    return x, y, mask_config, explainer, det, surrogate


def test_adaptive_success_never_drops_when_warm_started(tiny_model, tiny_images):
    """Candidates are judged on the real pipeline and the smaller eps's result is one of them."""
    x, y, mask_config, explainer, det, surrogate = attacked_setup(tiny_model, tiny_images)
    small, adv_small = evaluate_adaptive(tiny_model, surrogate, det, mask_config, x, y,
                                         AdaptiveConfig(eps=2 / 255, steps=5))
    large, adv_large = evaluate_adaptive(tiny_model, surrogate, det, mask_config, x, y,
                                         AdaptiveConfig(eps=8 / 255, steps=5), init=adv_small)
    assert float((adv_large - x).abs().max()) <= 8 / 255 + 1e-6

    def succeeds(adv):
        scores = torch.as_tensor(det.decision_function(explainer.attribute(adv).masks))
        return (tiny_model.predict(adv) != y) & (scores <= det.threshold_)

    assert 0 < small.success < 1  # a case where keeping the warm start matters
    assert large.success >= small.success
    assert bool((succeeds(adv_large) | ~succeeds(adv_small)).all())  # every image that succeeded still does
    assert succeeds(adv_large).float().mean() == pytest.approx(large.success)
    # an image the warm start already carries past classifier and detector is kept as it is, not attacked again
    settled = succeeds(adv_small)
    assert small.attacked == len(x) and large.attacked == int((~settled).sum())
    assert torch.equal(adv_large[settled], adv_small[settled])


def test_more_attacker_settings_never_lower_success(tiny_model, tiny_images):
    """Each (lam, kappa) run keeps the best images so far: adding settings can only add successes."""
    from advdetect.evaluation.adaptive import adaptive_sweep

    x, y, mask_config, _, det, surrogate = attacked_setup(tiny_model, tiny_images)
    rows = {}
    for settings in (((1.0, 2.0),), ((1.0, 2.0), (0.3, 2.0), (3.0, 0.0))):
        config = EvaluateConfig(n=40, n_baseline=8, n_methods=8, adaptive_n=16, adaptive_eps=(1 / 255, 4 / 255),
                                adaptive_steps=4, adaptive_settings=settings)
        rows[len(settings)] = adaptive_sweep(tiny_model, surrogate, det, mask_config, x, y, config, False, None,
                                             iterations_check=False)["sweep"]
    for one, three in zip(rows[1], rows[3]):
        assert three["success"] >= one["success"] and three["settings"] == [[1.0, 2.0], [0.3, 2.0], [3.0, 0.0]]
        assert three["restarts"] > one["restarts"]
    assert parse_settings("1:2, 0.3:2") == ((1.0, 2.0), (0.3, 2.0))
    for bad in ("1", "a:b", "", "-1:2"):
        with pytest.raises(ValueError, match="lam:kappa"):
            parse_settings(bad)
    with pytest.raises(ValueError, match="adaptive_settings"):
        EvaluateConfig(adaptive_settings=())


def test_multi_targeted_runs_aim_for_the_next_classes_and_never_lower_success(tiny_model, tiny_images):
    """A targeted run drives the image into its target class; adding targeted runs can only add successes."""
    from advdetect.evaluation.adaptive import adaptive_candidates, adaptive_sweep, next_classes

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, -1.0, 0.0]])
    assert next_classes(logits, 2).tolist() == [[3, 2], [1, 3]]
    with pytest.raises(ValueError, match="at most 3"):
        next_classes(logits, 4)
    x, y, mask_config, _, det, surrogate = attacked_setup(tiny_model, tiny_images)
    aim = next_classes(tiny_model.logits(x), 2)[:, 1]  # the third-ranked class of each image
    cfg = AdaptiveConfig(eps=32 / 255, steps=20, lam=0.0, targets=aim)
    adv, = adaptive_candidates(tiny_model, surrogate, None, x, y, cfg)
    hit = tiny_model.predict(adv) == aim
    untargeted, = adaptive_candidates(tiny_model, surrogate, None, x, y, AdaptiveConfig(eps=32 / 255, steps=20,
                                                                                         lam=0.0))
    assert hit.float().mean() >= 0.8 and hit.float().mean() > (tiny_model.predict(untargeted) == aim).float().mean()
    rows = {}
    for targets in (0, 2):
        config = EvaluateConfig(n=40, n_baseline=8, n_methods=8, adaptive_n=16, adaptive_eps=(1 / 255, 4 / 255),
                                adaptive_steps=4, adaptive_targets=targets)
        rows[targets] = adaptive_sweep(tiny_model, surrogate, det, mask_config, x, y, config, False, None,
                                       iterations_check=False)["sweep"]
    for plain, targeted in zip(rows[0], rows[2]):
        assert targeted["success"] >= plain["success"] and targeted["targets"] == 2
        # each setting (three by default): untargeted, then two targeted runs (each also starting from the best
        # images so far)
        assert targeted["restarts"] == plain["restarts"] + len(config.adaptive_settings) * 2 * 2
    with pytest.raises(ValueError, match="adaptive_targets"):
        EvaluateConfig(adaptive_targets=-1)


def test_settled_images_leave_the_batch_with_the_same_result(tiny_model, tiny_images):
    """On deterministic attacked maps an image whose gradient is zero (both loss terms met) stops being
    computed: the candidates equal a run that keeps every image, with fewer images passed through."""
    from advdetect.evaluation.adaptive import adaptive_candidates

    x, y, _, _, det, surrogate = attacked_setup(tiny_model, tiny_images)

    class Counted(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, deterministic: bool) -> None:
            super().__init__()
            self.inner, self.deterministic, self.images = inner, deterministic, 0

        def forward(self, images):
            self.images += len(images)
            return self.inner(images)

    cfg = AdaptiveConfig(eps=32 / 255, steps=15, restarts=2, kappa=0.5, kappa_detector=-1e3)  # reachable aims
    runs = {}
    for deterministic in (False, True):
        maps = Counted(surrogate, deterministic)
        runs[deterministic] = adaptive_candidates(tiny_model, maps, det, x, y, cfg), maps.images
    (every, passed_every), (settled, passed_settled) = runs[False], runs[True]
    assert passed_every == 2 * 15 * len(x) and passed_settled < passed_every
    for a, b in zip(every, settled):
        assert torch.allclose(a, b, atol=1e-6)


def test_eot_averages_each_step_over_fresh_draws(tiny_model, tiny_images):
    """With eot=R the attacked maps are called R times per step (each call draws afresh); on a deterministic
    pipeline that changes nothing (the sign of R equal gradients is the sign of one)."""
    from advdetect.evaluation.adaptive import adaptive_candidates

    x = tiny_images[:16]
    y = tiny_model.predict(x)
    weights = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    class Linear:  # a detector whose score is a fixed linear function of its maps
        threshold_ = -1e6  # every image is over it: the detector term is active throughout

        def _fitted(self):
            return Score()

    class Score(torch.nn.Module):
        def forward(self, maps):
            return (maps * weights).flatten(1).sum(1)

    class Maps(torch.nn.Module):  # multiplicative noise: each draw changes the gradient
        def __init__(self, noise: float) -> None:
            super().__init__()
            self.calls, self.noise = 0, noise

        def forward(self, images):
            self.calls += 1
            return images * (1 + self.noise * torch.randn_like(images))

    runs = {}
    for eot in (1, 3):
        maps = Maps(0.0)
        runs[eot], = adaptive_candidates(tiny_model, maps, Linear(), x, y, AdaptiveConfig(eps=8 / 255, steps=5, eot=eot,
                                                                                          lam=100.0))
        assert maps.calls == 5 * eot
    assert torch.equal(runs[1], runs[3])
    torch.manual_seed(0)
    noisy, = adaptive_candidates(tiny_model, Maps(2.0), Linear(), x, y, AdaptiveConfig(eps=8 / 255, steps=5, eot=3,
                                                                                       lam=100.0))
    assert not torch.equal(noisy, runs[3])  # the draws do reach the gradient
    with pytest.raises(ValueError, match="eot"):
        AdaptiveConfig(eot=0)


def test_classifier_alone_sanity_check(tiny_model, tiny_images):
    """The report's check that the same PGD fools the undefended classifier: all images at a large eps,
    not at a tiny one (so the check can fail)."""
    from advdetect.evaluation.adaptive import adaptive_candidates, adaptive_sweep, classifier_alone

    x, y, mask_config, _, det, surrogate = attacked_setup(tiny_model, tiny_images)
    assert classifier_alone(tiny_model, x, y, 32 / 255, 10, 1) == 1.0
    assert classifier_alone(tiny_model, x, y, 0.2 / 255, 10, 1) < 0.5
    tiny_model.train()
    config = EvaluateConfig(n=40, n_baseline=8, n_methods=8, adaptive_n=16, adaptive_eps=(0.2 / 255, 32 / 255),
                            adaptive_steps=10, adaptive_settings=((1.0, 2.0),))
    sanity = adaptive_sweep(tiny_model, surrogate, det, mask_config, x, y, config, False, None,
                            iterations_check=False)["sanity"]
    assert sanity["classifier_alone_at_largest_eps"] == 1.0
    assert tiny_model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="needs the detector"):
        adaptive_candidates(tiny_model, surrogate, None, x, y, AdaptiveConfig(eps=8 / 255, lam=1.0))


def test_sweep_and_config():
    cfg = EvaluateConfig(attacks=("fgsm", "cw"), eps=(8 / 255, 4 / 255))
    assert [s.key for s in sweep(cfg)] == ["fgsm@4/255", "fgsm@8/255", "cw"]
    assert Spec("pgd", 8 / 255).dirname == "pgd-8-255" and eps_tag(0.03) == "0.03"
    with pytest.raises(Exception, match="unknown attack"):
        EvaluateConfig(attacks=("nope",))
    with pytest.raises(ValueError, match="adaptive_n"):
        EvaluateConfig(n=20, adaptive_n=50)
    assert json_safe({"a": float("nan"), "b": (1.0, float("inf"))}) == {"a": None, "b": [1.0, None]}


def test_white_box_attack_on_the_fast_path(tiny_model, tiny_images):
    """The fast path is differentiable end to end: the attacker needs no surrogate, and what it is judged on
    is the real fast path."""
    from advdetect.evaluation.adaptive import FastPathMaps
    from advdetect.fastpath import FastPath
    from advdetect.masks.amortized import AmortizedMasks, mask_net_for

    config = MaskConfig(iterations=20)
    torch.manual_seed(0)
    explainer = AmortizedMasks(tiny_model, mask_net_for(tiny_model.info, config, width=8), config)
    gen = torch.Generator().manual_seed(2)
    det = MaskDetector(epochs=2, batch_size=16, seed=0, inputs="masks,residual,confidence").fit(
        torch.rand(64, 5, 32, 32, generator=gen), torch.arange(64) % 2)
    det.calibrate(torch.rand(32, 5, 32, 32, generator=gen))
    fast = FastPath(explainer, det)
    x = tiny_images[:12]
    y = tiny_model.predict(x)
    maps, result = fast.maps(x)
    differentiable = FastPathMaps(fast)(x)
    assert torch.allclose(differentiable[:, :-1], maps[:, :-1], atol=1e-5)  # all but the (unrounded) iteration share
    assert (differentiable[:, -1] - maps[:, -1]).abs().max() <= 0.5 / config.iterations + 1e-6
    before = model_state(tiny_model)
    outcome, adv = evaluate_adaptive(tiny_model, FastPathMaps(fast), det, config, x, y,
                                     AdaptiveConfig(eps=32 / 255, steps=10, restarts=1),
                                     real_maps=lambda images: fast.maps(images)[0])
    assert model_state(tiny_model) == before and float((adv - x).abs().max()) <= 32 / 255 + 1e-6
    passes = fast.scores(adv) <= det.threshold_
    real = ((tiny_model.predict(adv) != y) & passes).float().mean()
    assert outcome.success == pytest.approx(float(real)) and outcome.fooled > 0.5
