"""The detector's score combined with the classifier's log-probability gap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from advdetect.detector.margin import CombinedDetector, MarginCombination, WithGap, log_prob_gap


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
    maps = WithGap(maps_of, model=_Module(classifier))(x)
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
