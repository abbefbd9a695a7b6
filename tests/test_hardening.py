"""Adversarial training of the fast detector against the white-box adaptive attacker."""

from __future__ import annotations

import pytest
import torch

from advdetect.detector import MaskDetector
from advdetect.errors import OptionError
from advdetect.fastpath import FastPath, fit_fast_detector
from advdetect.hardening import HardeningConfig, adaptive_examples, harden_fast_path
from advdetect.masks import MaskConfig
from advdetect.masks.amortized import AmortizedMasks, mask_net_for

from .conftest import make_tiny_model

CONFIG = MaskConfig(iterations=20)


def fitted_fast_path(model, clean: torch.Tensor) -> tuple[FastPath, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A fast path (untrained mask network) whose detector is fitted on clean against noisy images."""
    torch.manual_seed(0)
    fast = FastPath(AmortizedMasks(model, mask_net_for(model.info, CONFIG, width=8), CONFIG),
                    MaskDetector(epochs=2, batch_size=16, inputs="masks,residual,confidence"))
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    clean_maps, noisy_maps = fast.maps(clean)[0], fast.maps(noisy)[0]
    fit_fast_detector(fast.detector, clean_maps[:48], [noisy_maps[:48]], clean_maps[48:], seed=0)
    return fast, clean_maps[:48], [noisy_maps[:48]], clean_maps[48:]


def test_adaptive_examples_stay_in_budget_and_report_what_they_did():
    model = make_tiny_model()
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fast, *_ = fitted_fast_path(model, x)
    config = HardeningConfig(rounds=1, eps=(4 / 255, 16 / 255), steps=8)
    adv, fooled, passes = adaptive_examples(fast, x[:16], config, seed=0)
    slot_eps = torch.tensor([config.eps[i % 2] for i in range(16)])
    assert ((adv - x[:16]).abs().amax((1, 2, 3)) <= slot_eps + 1e-6).all() and 0 <= adv.min() and adv.max() <= 1
    assert torch.equal(fooled, model.predict(adv) != model.predict(x[:16]))
    assert not (passes & ~fooled).any()
    scores = fast.scores(adv)
    assert torch.equal(passes, fooled & (scores <= fast.detector.threshold_))
    assert fooled.float().mean() > 0.5  # a random classifier at up to 16/255 is easy to fool


def test_a_round_refits_on_what_fooled_the_classifier_and_leaves_the_fast_path_alone(monkeypatch):
    model = make_tiny_model()
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fast, clean_maps, adv_sets, cal_maps = fitted_fast_path(model, x)
    before = {k: v.clone() for k, v in fast.detector._fitted().state_dict().items()}
    threshold = fast.detector.threshold_
    config = HardeningConfig(rounds=1, eps=(8 / 255,), steps=10, adaptive_share=0.25)
    adv, fooled, passes = adaptive_examples(fast, x[:48], config, seed=0)  # what round 1 will craft
    assert fooled.sum() >= 12
    fits = []
    original_fit = MaskDetector.fit

    def spy(self, X, y):
        fits.append((X.clone(), torch.as_tensor(y).clone()))
        return original_fit(self, X, y)

    monkeypatch.setattr(MaskDetector, "fit", spy)
    hardened = harden_fast_path(fast, x[:48], clean_maps, adv_sets, cal_maps, config)
    # the refit: the clean maps against a positive class that is a quarter adaptive, three quarters the old attacks
    (X, y), = fits
    assert torch.equal(X[y == 0], clean_maps) and int((y == 1).sum()) == 48
    adaptive_maps = fast.maps(adv[fooled])[0]
    positives = X[y == 1]
    from_adaptive = [bool((adaptive_maps - p).abs().amax((1, 2, 3)).min() < 1e-5) for p in positives]
    from_old = [bool((adv_sets[0] - p).abs().amax((1, 2, 3)).min() < 1e-5) for p in positives]
    assert sum(from_adaptive) == 12 and sum(from_old) == 36
    # the caller's fast path is untouched; the new detector is calibrated on the same clean maps
    assert fast.detector.threshold_ == threshold
    assert all(torch.equal(v, before[k]) for k, v in fast.detector._fitted().state_dict().items())
    assert hardened.detector is not fast.detector and hardened.explainer is fast.explainer
    assert hardened.detector.get_params() == fast.detector.get_params()
    flagged = torch.as_tensor(hardened.detector.decision_function(cal_maps)) > hardened.detector.threshold_
    assert flagged.float().mean() <= hardened.detector.fpr
    entry, = config.history
    assert entry["round"] == 1 and entry["attacked"] == 48 and entry["adaptive_maps"] == int(fooled.sum())
    assert entry["success_before_refit"] == pytest.approx(float(passes.float().mean()))


@pytest.mark.parametrize("bad", [dict(rounds=-1), dict(eps=()), dict(eps=(0.0,)), dict(steps=0),
                                 dict(adaptive_share=1.0)])
def test_bad_hardening_settings_are_refused(bad):
    with pytest.raises(OptionError):
        HardeningConfig(**bad)
