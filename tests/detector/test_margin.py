"""The detector's score combined with the classifier's log-probability gap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from advdetect.detector.margin import (CombinedDetector, MarginCombination, WithEvidence, blur_shift,
                                       classifier_evidence, log_prob_gap)
from advdetect.masks.perturbation import gaussian_blur

from ..conftest import make_tiny_model


def two_sided(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Clean gaps around e^2 - 1; adversarial ones either near 0 or far above; scores carry no signal."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.expm1(2 + 0.4 * torch.randn(n, generator=gen))
    low = torch.expm1(0.3 * torch.rand(n // 2, generator=gen))
    high = torch.expm1(3.5 + 0.3 * torch.rand(n - n // 2, generator=gen))
    gaps = torch.cat([clean, low, high])
    scores = torch.randn(2 * n, generator=gen)
    return scores, gaps, np.r_[np.zeros(n), np.ones(n)]


def test_log_prob_gap_is_the_top_two_log_probabilities_apart() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 2.5]])
    logp = logits.log_softmax(1)
    expected = torch.stack([logp[0, 0] - logp[0, 1], logp[1, 1] - logp[1, 2]])
    assert torch.allclose(log_prob_gap(logits), expected)
    with pytest.raises(ValueError, match="N x K"):
        log_prob_gap(torch.zeros(4))


def test_the_combination_catches_gaps_too_small_and_too_large() -> None:
    scores, gaps, y = two_sided()
    combination = MarginCombination().fit(scores, gaps, y)
    assert combination.fit(scores, gaps, y) is combination
    held_scores, held_gaps, held_y = two_sided(seed=1)
    auc = roc_auc_score(held_y, combination.decision_function(held_scores, held_gaps))
    assert auc > 0.95  # neither the score (no signal) nor a one-sided gap threshold gets there
    assert roc_auc_score(held_y, held_gaps.numpy()) < 0.8 and roc_auc_score(held_y, -held_gaps.numpy()) < 0.8


def test_calibration_flags_at_most_the_rate_asked_for() -> None:
    scores, gaps, y = two_sided()
    combination = MarginCombination(fpr=0.1).fit(scores, gaps, y)
    clean_scores, clean_gaps, cy = two_sided(seed=2)
    clean = cy == 0
    combination.calibrate(clean_scores[clean], clean_gaps[clean])
    flagged = combination.decision_function(clean_scores[clean], clean_gaps[clean]) > combination.threshold_
    assert 0.05 < flagged.mean() <= 0.1 and combination.calibration_fpr_ == 0.1
    combination.calibrate(clean_scores[clean], clean_gaps[clean], fpr=0.2)
    assert combination.calibration_fpr_ == 0.2
    assert MarginCombination.from_dict(combination.to_dict()).calibration_fpr_ == 0.2


def test_it_saves_as_json_and_loads_the_same_decisions() -> None:
    scores, gaps, y = two_sided()
    combination = MarginCombination().fit(scores, gaps, y).calibrate(scores[y == 0], gaps[y == 0])
    loaded = MarginCombination.from_dict(json.loads(json.dumps(combination.to_dict())))
    assert loaded.threshold_ == combination.threshold_
    np.testing.assert_allclose(loaded.decision_function(scores, gaps), combination.decision_function(scores, gaps),
                               rtol=1e-6)
    broken = combination.to_dict() | {"coef": [1.0, 2.0]}
    for bad in ({"format": "something else"}, broken, combination.to_dict() | {"threshold": "high"}, [1, 2]):
        with pytest.raises(ValueError):
            MarginCombination.from_dict(bad)


def test_bad_options_and_unfitted_use_say_what_is_wrong() -> None:
    scores, gaps, y = two_sided()
    with pytest.raises(ValueError, match="fpr"):
        MarginCombination(fpr=1.5).fit(scores, gaps, y)
    with pytest.raises(ValueError, match="both classes"):
        MarginCombination().fit(scores, gaps, np.zeros(len(scores)))
    with pytest.raises(RuntimeError, match="not fitted"):
        MarginCombination().decision_function(scores, gaps)
    with pytest.raises(RuntimeError, match="calibrate"):
        MarginCombination().fit(scores, gaps, y).to_dict()


class MeanNet(nn.Module):
    """Stands in for the detector network: a score per map (a real linear read of the maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(3.0))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.weight * maps.mean((1, 2, 3))


class FittedStub:
    def __init__(self) -> None:
        self.network_ = MeanNet()

    def _fitted(self) -> nn.Module:
        return self.network_

    def input_names(self) -> tuple[str, ...]:
        return ("masks",)


def test_the_combined_detector_reads_maps_with_a_gap_plane_and_is_differentiable() -> None:
    scores, gaps, y = two_sided()
    combination = MarginCombination().fit(scores, gaps, y).calibrate(scores[y == 0], gaps[y == 0])
    model = nn.Linear(3 * 4 * 4, 5)
    classifier = lambda x: model(x.flatten(1))  # noqa: E731
    maps_of = nn.Upsample(size=8)
    detector = CombinedDetector(FittedStub(), combination)
    x = torch.rand(6, 3, 4, 4, requires_grad=True)
    maps = WithEvidence(maps_of, model=_Module(classifier), combination=combination)(x)
    assert maps.shape == (6, 4, 8, 8)
    expected = combination.decision_function(FittedStub().network_(maps_of(x)).detach(),
                                             log_prob_gap(classifier(x)).detach())
    np.testing.assert_allclose(detector.decision_function(maps.detach()), expected, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(detector._fitted()(maps).sum(), x)
    assert grad.abs().sum() > 0
    assert detector.threshold_ == combination.threshold_
    with pytest.raises(ValueError, match="calibrate"):
        CombinedDetector(FittedStub(), MarginCombination().fit(scores, gaps, y))


class _Module(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_classifier_evidence_is_the_gap_then_one_blur_shift_per_sigma() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    evidence = classifier_evidence(net, x, (0.75, 1.5))
    assert evidence.shape == (6, 3)
    p = net(x).softmax(1)
    for column, sigma in zip((1, 2), (0.75, 1.5)):
        by_hand = 0.5 * (p - net(gaussian_blur(x, sigma)).softmax(1)).abs().sum(1)
        assert torch.allclose(evidence[:, column], by_hand, atol=1e-6)
        assert torch.allclose(blur_shift(net(x), net(gaussian_blur(x, sigma))), by_hand, atol=1e-6)
    assert torch.allclose(evidence[:, 0], log_prob_gap(net(x)))
    assert (evidence[:, 1:] >= 0).all() and (evidence[:, 1:] <= 1).all()
    grad, = torch.autograd.grad(evidence[:, 1:].sum(), x)  # an attacker can differentiate the shifts
    assert grad.abs().sum() > 0
    assert classifier_evidence(net, x).shape == (6, 1)


def with_shift(seed: int, n: int = 600) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Gaps and scores carry no signal; the blur shift is small on clean images, large on adversarial ones."""
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.expm1(2 + 0.4 * torch.randn(2 * n, generator=gen))
    shift = torch.cat([0.1 * torch.rand(n, generator=gen), 0.08 + 0.5 * torch.rand(n, generator=gen)])
    return torch.randn(2 * n, generator=gen), torch.stack([gaps, shift], 1), np.r_[np.zeros(n), np.ones(n)]


def test_the_blur_shift_is_read_when_asked_for_and_saved_with_its_sigmas() -> None:
    scores, evidence, y = with_shift(0)
    held_scores, held_evidence, held_y = with_shift(1)
    combination = MarginCombination(squeeze=(1.0,)).fit(scores, evidence, y)
    assert roc_auc_score(held_y, combination.decision_function(held_scores, held_evidence)) > 0.95
    gap_only = MarginCombination().fit(scores, evidence[:, 0], y)
    assert roc_auc_score(held_y, gap_only.decision_function(held_scores, held_evidence[:, 0])) < 0.65
    combination.calibrate(scores[y == 0], evidence[y == 0])
    data = json.loads(json.dumps(combination.to_dict()))
    assert data["params"]["squeeze"] == [1.0] and len(data["coef"]) == 4
    loaded = MarginCombination.from_dict(data)
    assert loaded.squeeze == (1.0,) and loaded.n_evidence == 2
    np.testing.assert_allclose(loaded.decision_function(held_scores, held_evidence),
                               combination.decision_function(held_scores, held_evidence), rtol=1e-6)
    with pytest.raises(ValueError, match="N x 2"):  # the gap alone is not what it was fitted on
        combination.decision_function(held_scores, held_evidence[:, 0])
    for bad in ({"squeeze": []}, {"squeeze": [-1.0]}, {"squeeze": [1.0, 2.0]}, {"squeeze": "wide"}):
        with pytest.raises(ValueError):
            MarginCombination.from_dict(data | {"params": data["params"] | bad})
    with pytest.raises(ValueError, match="positive"):
        MarginCombination(squeeze=(0.0,)).fit(scores, evidence, y)


def test_a_combination_saved_before_squeeze_existed_still_loads() -> None:
    scores, gaps, y = two_sided()
    data = MarginCombination().fit(scores, gaps, y).calibrate(scores[y == 0], gaps[y == 0]).to_dict()
    data["params"] = {"fpr": 0.05, "C": 1.0}  # what margin.json held before: no squeeze
    loaded = MarginCombination.from_dict(data)
    assert loaded.squeeze == () and loaded.n_evidence == 1
    assert loaded.decision_function(scores, gaps).shape == (len(scores),)


def test_squeeze_option_parsing() -> None:
    from advdetect.detector.margin import SQUEEZE_SIGMAS, parse_squeeze
    from advdetect.errors import OptionError

    assert parse_squeeze("0.75,1.5") == (0.75, 1.5) == SQUEEZE_SIGMAS and parse_squeeze("none") == ()
    assert parse_squeeze("") == () and parse_squeeze((2,)) == (2.0,)
    from advdetect.cli import train  # the CLI spells its default out (it starts without torch)

    assert parse_squeeze(next(p.default for p in train.params if p.name == "squeeze")) == SQUEEZE_SIGMAS
    for bad in ("-1", "wide", "0"):
        with pytest.raises(OptionError, match="--squeeze"):
            parse_squeeze(bad)
        with pytest.raises(OptionError, match="--noise"):
            parse_squeeze(bad, "--noise")


def class_skewed(seed: int, n: int = 1200) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Clean images of class 0 score higher than those of class 1 (class 2: only 10 images); adversarial ones
    score higher still. Evidence: the gap (no signal), then the predicted class."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.cat([torch.zeros(n // 2), torch.ones(n // 2 - 10), torch.full((10,), 2.0)])
    clean = torch.randn(n, generator=gen) + 1.5 * (classes == 0)
    adv = torch.randn(n, generator=gen) + 3.0
    gaps = torch.expm1(2 + 0.4 * torch.randn(2 * n, generator=gen))
    evidence = torch.stack([gaps, torch.cat([classes, classes])], 1)
    return torch.cat([clean, adv]), evidence, np.r_[np.zeros(n), np.ones(n)]


def test_per_class_calibration_keeps_every_class_at_the_rate_asked_for() -> None:
    scores, evidence, y = class_skewed(0)
    held_scores, held_evidence, held_y = class_skewed(1)
    clean, held_clean = y == 0, held_y == 0
    plain = MarginCombination(fpr=0.05).fit(scores, evidence[:, 0], y).calibrate(scores[clean], evidence[clean, 0])
    plain_flags = plain.decision_function(held_scores[held_clean], held_evidence[held_clean, 0]) > plain.threshold_
    per = MarginCombination(fpr=0.05, per_class=True).fit(scores, evidence, y)
    per.calibrate(scores[clean], evidence[clean], n_classes=4)
    flags = per.decision_function(held_scores[held_clean], held_evidence[held_clean]) > per.threshold_
    held_classes = held_evidence[held_clean, 1].numpy()
    # one threshold: the false positives pile up on class 0 (half the images, nearly all the flags)
    assert plain_flags[held_classes == 0].mean() > 0.08 and plain_flags[held_classes == 1].mean() < 0.02
    for c in (0, 1):
        assert 0.02 < flags[held_classes == c].mean() < 0.09  # held out: at the rate asked for, within noise
    on_calibration = per.decision_function(scores[clean], evidence[clean]) > per.threshold_
    cal_classes = evidence[clean, 1].numpy()
    assert all(on_calibration[cal_classes == c].mean() <= 0.05 for c in (0, 1))
    offsets = per.class_offsets_.numpy()
    assert offsets.shape == (4,) and offsets[0] > 0 > offsets[1]
    assert offsets[2] == 0 and offsets[3] == 0  # too few images (10 < 2/fpr), never seen: the global threshold
    # the verdict is the combined score shifted by the predicted class's offset
    base = plain.__class__(fpr=0.05).fit(scores, evidence[:, 0], y).decision_function(held_scores, held_evidence[:, 0])
    shifted = per.decision_function(held_scores, held_evidence)
    np.testing.assert_allclose(shifted, base - offsets[held_evidence[:, 1].long().numpy()], rtol=1e-5, atol=1e-5)
    unseen = held_evidence.clone()
    unseen[:, 1] = 7  # a class beyond the offsets keeps the global threshold
    np.testing.assert_allclose(per.decision_function(held_scores, unseen), base, rtol=1e-5, atol=1e-5)
    assert per.get_params()["per_class"] is True


def test_per_class_calibration_survives_json_and_refuses_malformed_offsets() -> None:
    scores, evidence, y = class_skewed(0)
    per = MarginCombination(per_class=True).fit(scores, evidence, y).calibrate(scores[y == 0], evidence[y == 0])
    data = json.loads(json.dumps(per.to_dict()))
    assert data["params"]["per_class"] is True and len(data["class_offsets"]) == 3
    loaded = MarginCombination.from_dict(data)
    np.testing.assert_allclose(loaded.decision_function(scores, evidence), per.decision_function(scores, evidence),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="N x 2"):  # it reads the class: the gap alone is not enough
        loaded.decision_function(scores, evidence[:, 0])
    for bad in ({"class_offsets": [0.0, float("nan"), 1.0]}, {"class_offsets": "many"},
                {"params": data["params"] | {"per_class": "yes"}}, {"params": "per_class"}):
        with pytest.raises(ValueError, match="margin combination|per_class"):
            MarginCombination.from_dict(data | bad)
    missing = {k: v for k, v in data.items() if k != "class_offsets"}
    with pytest.raises(ValueError, match="malformed"):
        MarginCombination.from_dict(missing)
    with pytest.raises(ValueError, match="n_classes"):
        MarginCombination(per_class=True).fit(scores, evidence, y).calibrate(scores[y == 0], evidence[y == 0],
                                                                             n_classes=2)


def test_classifier_evidence_carries_the_predicted_class_when_asked() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(6, 3, 8, 8)
    evidence = classifier_evidence(net, x, (1.0,), with_class=True)
    assert evidence.shape == (6, 3)
    assert torch.equal(evidence[:, 2].long(), net(x).argmax(1))
    assert torch.allclose(evidence[:, :2], classifier_evidence(net, x, (1.0,)))
    combination = MarginCombination(squeeze=(1.0,), per_class=True)
    assert combination.n_evidence == 3 and torch.equal(combination.evidence(net, x), evidence)


def test_noise_evidence_is_the_softmax_shift_under_one_fixed_pattern() -> None:
    from advdetect.detector.margin import noise_pattern

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x = torch.rand(6, 3, 8, 8)
    evidence = classifier_evidence(net, x, (1.0,), noise=(0.05, 0.2))
    assert evidence.shape == (6, 4)
    pattern = noise_pattern((3, 8, 8), "cpu")
    for column, sigma in ((2, 0.05), (3, 0.2)):
        by_hand = 0.5 * (net(x).softmax(1) - net((x + sigma * pattern).clamp(0, 1)).softmax(1)).abs().sum(1)
        assert torch.allclose(evidence[:, column], by_hand, atol=1e-6)
    # deterministic, and an image's evidence does not depend on the batch it is judged in: up to float rounding
    # (on some CPUs the stacked classifier call's matrix product sums in an order that depends on its row
    # count: 2.5e-7 seen); images coupled by the batch would differ by orders of magnitude more
    again = classifier_evidence(net, x, (1.0,), noise=(0.05, 0.2))
    assert torch.equal(again, evidence)
    assert torch.allclose(classifier_evidence(net, x[:2], (1.0,), noise=(0.05, 0.2)), evidence[:2], atol=1e-6)
    assert not torch.equal(noise_pattern((3, 8, 8), "cpu"), torch.zeros(3, 8, 8))
    combination = MarginCombination(squeeze=(1.0,), noise=(0.05, 0.2), per_class=True)
    assert combination.n_evidence == 5 and combination.n_features == 3 + 1 + 4
    assert torch.equal(combination.evidence(net, x)[:, :4], evidence)


def interacting(seed: int, n: int = 800) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Adversarial exactly where the score and the noise shift are both high or both low (an interaction a
    linear combination of the features cannot express); the gap carries no signal."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2 * n, generator=gen)
    shift = torch.exp(torch.randn(2 * n, generator=gen) - 4)  # log-normal around e^-4
    y = ((scores > 0) == (torch.log(shift) > -4)).numpy().astype(int)
    gaps = torch.expm1(2 + 0.4 * torch.randn(2 * n, generator=gen))
    return scores, torch.stack([gaps, shift], 1), y


def test_the_mlp_combiner_reads_what_a_linear_one_cannot_and_round_trips() -> None:
    scores, evidence, y = interacting(0)
    held_scores, held_evidence, held_y = interacting(1)
    linear = MarginCombination(noise=(0.01,)).fit(scores, evidence, y)
    mlp = MarginCombination(noise=(0.01,), hidden=16).fit(scores, evidence, y)
    assert roc_auc_score(held_y, linear.decision_function(held_scores, held_evidence)) < 0.65
    assert roc_auc_score(held_y, mlp.decision_function(held_scores, held_evidence)) > 0.9
    again = MarginCombination(noise=(0.01,), hidden=16).fit(scores, evidence, y)  # seeded: the same fit
    np.testing.assert_array_equal(again.decision_function(held_scores, held_evidence),
                                  mlp.decision_function(held_scores, held_evidence))
    # differentiable for the white-box attacker
    s, e = held_scores[:5].clone().requires_grad_(True), held_evidence[:5].clone().requires_grad_(True)
    mlp.torch_decision(s, e).sum().backward()
    assert s.grad.abs().sum() > 0 and e.grad.abs().sum() > 0
    mlp.calibrate(scores[y == 0], evidence[y == 0])
    data = json.loads(json.dumps(mlp.to_dict()))
    assert data["params"]["hidden"] == 16 and data["params"]["noise"] == [0.01] and len(data["mlp"]) == 3
    assert "coef" not in data and "intercept" not in data  # the MLP judges: no logistic weights stored
    loaded = MarginCombination.from_dict(data)
    legacy = MarginCombination.from_dict(data | {"coef": [0.0] * 5, "intercept": 0.0})  # older files: not read
    assert legacy.threshold_ == mlp.threshold_ and not hasattr(legacy, "coef_")
    np.testing.assert_allclose(loaded.decision_function(held_scores, held_evidence),
                               mlp.decision_function(held_scores, held_evidence), rtol=1e-5, atol=1e-5)
    assert loaded.threshold_ == mlp.threshold_
    wrong_shape = [[[0.0] * 3] * 16, [0.0] * 16]
    for bad in ({"mlp": None}, {"mlp": data["mlp"][:2]}, {"mlp": [wrong_shape, *data["mlp"][1:]]},
                {"mlp": [[data["mlp"][0][0], [float("nan")] * 16], *data["mlp"][1:]]},
                {"params": data["params"] | {"hidden": -1}}, {"params": data["params"] | {"noise": [0.0]}}):
        with pytest.raises(ValueError, match="malformed|hidden|noise"):
            MarginCombination.from_dict(data | bad)
    with pytest.raises(ValueError, match="hidden"):
        MarginCombination(hidden=1.5).fit(scores, evidence[:, 0], y)
    with pytest.raises(RuntimeError, match="not fitted"):
        MarginCombination(noise=(0.01,), hidden=16).decision_function(held_scores, held_evidence)


def counting_model():
    """A tiny classifier and the list its forward hook fills with each call's batch size."""
    model = make_tiny_model()
    sizes: list[int] = []
    model.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    return model, sizes


def test_a_small_batch_s_variants_share_one_classifier_call_and_give_the_same_evidence(monkeypatch):
    """The blurred and noisy copies of a small batch are stacked into one classifier call (a batch-1 verdict
    pays one call, not three); a large batch keeps one call per copy; the evidence is the same either way."""
    from advdetect.detector import margin as margin_module

    model, sizes = counting_model()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        sizes.clear()
        stacked = classifier_evidence(model, x, (0.75, 1.5), logits, noise=(0.01,))
        assert sizes == [9]  # three copies of three images, one call
        monkeypatch.setattr(margin_module, "VARIANT_BATCH", 3)
        sizes.clear()
        alone = classifier_evidence(model, x, (0.75, 1.5), logits, noise=(0.01,))
        assert sizes == [3, 3, 3]  # at most VARIANT_BATCH images a call: one copy each
    assert torch.allclose(stacked, alone, atol=1e-6)
    monkeypatch.setattr(margin_module, "VARIANT_BATCH", 256)
    with torch.no_grad():  # an empty batch: still one column per copy
        assert classifier_evidence(model, x[:0], (0.75, 1.5), logits[:0], noise=(0.01,)).shape == (0, 4)


def test_without_logits_the_images_join_their_copies_classifier_call():
    """logits_and_evidence with no logits: the images and their three copies in one call, the same logits and
    evidence as a separate call for the images (a batch-1 verdict pays one classifier call less)."""
    from advdetect.detector.margin import logits_and_evidence

    model, sizes = counting_model()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        separate = classifier_evidence(model, x, (0.75, 1.5), logits, noise=(0.01,), with_class=True)
        sizes.clear()
        got_logits, together = logits_and_evidence(model, x, (0.75, 1.5), noise=(0.01,), with_class=True)
        assert sizes == [8]  # 2 images + 3 copies of each
        assert torch.allclose(got_logits, logits, atol=1e-6) and torch.allclose(together, separate, atol=1e-6)
        sizes.clear()
        assert torch.allclose(classifier_evidence(model, x, (0.75, 1.5), noise=(0.01,), with_class=True), separate,
                              atol=1e-6) and sizes == [8]
