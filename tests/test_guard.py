"""The warm API: Guard.load / check / recover / explain, its fast path, threads and bad input."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from advdetect import Guard
from advdetect.detector.inputs import maps_for_result
from advdetect.errors import AdvDetectError
from advdetect.fastpath import FastPath, load_fast_path, save_fast_path
from advdetect.imageio import save_image
from advdetect.masks import MaskConfig, make_explainer
from advdetect.masks.amortized import AmortizedMasks, mask_net_for
from advdetect.models import load_model

from .conftest import make_tiny_model, needs_builtin

pytestmark = needs_builtin
CONFIG = MaskConfig(iterations=10)


def batch(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_check_uses_the_fast_path_and_exact_the_optimised_masks(fast_quick_detector):
    guard = Guard.load(fast_quick_detector, device="cpu")
    x = batch()
    verdicts = guard.check(x)
    fast = guard.deployment.fast
    assert guard.path == verdicts.path == "fast"
    assert torch.allclose(verdicts.scores, fast.scores(x), atol=1e-6)
    assert torch.equal(verdicts.adversarial, verdicts.scores > fast.detector.threshold_)
    assert verdicts.labels.tolist() == guard.model.predict(x).tolist()
    assert [r["label_index"] for r in verdicts.rows()] == verdicts.labels.tolist()
    exact = Guard.load(fast_quick_detector, device="cpu", exact=True)
    deployed = exact.deployment
    expected = deployed.detector.decision_function(
        maps_for_result(deployed.detector.input_names(), x, make_explainer(deployed.model, deployed.mask_config)
                        .attribute(x)))
    got = exact.check(x)
    assert got.path == "exact" and torch.allclose(got.scores, torch.as_tensor(expected), atol=1e-5)
    recovered = exact.recover(x)
    assert recovered.top5.shape == (6, 5) and torch.equal(recovered.labels, recovered.top5[:, 0])
    flagged = recovered.verdicts.adversarial
    assert not (recovered.labels[flagged] == recovered.verdicts.labels[flagged]).any()  # ruled out
    assert torch.equal(recovered.pipeline_labels[~flagged], recovered.verdicts.labels[~flagged])
    assert torch.equal(recovered.pipeline_labels[flagged], recovered.labels[flagged])
    assert guard.explain(x[:2]).iterations.max() > 0 and guard.explain(x[:2], exact=False).masks.shape == (2, 1, 32, 32)


def test_threads_share_a_guard(fast_quick_detector):
    for exact in (False, True):
        guard = Guard.load(fast_quick_detector, device="cpu", exact=exact)
        x = batch(4)
        serial = guard.check(x).scores
        results: list = [None] * 4

        def work(i: int) -> None:
            results[i] = guard.check(x).scores

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r is not None and torch.allclose(r, serial, atol=1e-5) for r in results), exact


def test_your_model_is_left_as_it_was(fast_quick_detector):
    model = load_model("cifar10-cnn").train()
    guard = Guard.load(fast_quick_detector, model=model, device="cpu")
    guard.check(batch(2))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not guard.model.training and not any(p.requires_grad for p in guard.model.parameters())


def test_bad_input_gets_one_clear_error(fast_quick_detector, tmp_path):
    guard = Guard.load(fast_quick_detector, device="cpu")
    with pytest.raises(AdvDetectError, match="N x 3 x 32 x 32"):
        guard.check(torch.rand(2, 3, 16, 16))
    with pytest.raises(AdvDetectError, match=r"\[0, 1\]"):
        guard.check(batch(2) * 255)
    with pytest.raises(AdvDetectError, match="float32"):
        guard.check(batch(2).double())
    with pytest.raises(AdvDetectError):
        guard.check([tmp_path / "missing.png"])
    save_image(batch(1)[0], tmp_path / "a.png")
    assert len(guard.check([tmp_path / "a.png"]).labels) == 1 and len(guard.check(tmp_path / "a.png").labels) == 1


def test_fast_path_of_another_model_is_refused(fast_quick_detector, tmp_path):
    other = make_tiny_model()
    torch.manual_seed(0)
    out = tmp_path / "det"
    shutil.copytree(fast_quick_detector, out)
    shutil.rmtree(out / "fast")
    save_fast_path(out, FastPath(AmortizedMasks(other, mask_net_for(other.info, CONFIG), CONFIG),
                                 Guard.load(fast_quick_detector, device="cpu").deployment.fast.detector),
                   load_model("cifar10-cnn").info.identity())
    with pytest.raises(AdvDetectError, match="belongs to another model"):
        load_fast_path(out, load_model("cifar10-cnn"))


@pytest.fixture(params=[((), False, (), 0), ((0.75, 1.5), False, (), 0), ((0.75, 1.5), True, (), 0),
                        ((0.75,), False, (0.02,), 8)],
                ids=["gap", "gap+squeeze", "gap+squeeze+per-class", "gap+squeeze+noise, mlp"])
def margin_detector(fast_quick_detector, tmp_path, request):
    """The fast quick detector with a margin combination (the gap alone, or with blur shifts; with a
    threshold per class; with a noise shift and an MLP combiner) fitted on random images (plumbing, not
    quality)."""
    from advdetect.detector.margin import MarginCombination
    from advdetect.fastpath import fit_margin

    squeeze, per_class, noise, hidden = request.param
    out = tmp_path / "det"
    shutil.copytree(fast_quick_detector, out)
    fast = Guard.load(out, device="cpu").deployment.fast
    x = batch(40)
    maps, _ = fast.maps(x)
    config = MarginCombination(squeeze=squeeze, per_class=per_class, noise=noise, hidden=hidden)
    fast.margin = fit_margin(fast, x, maps, torch.arange(40) % 2 == 1, x[:20], maps[:20], config)
    assert fast.margin is not config and not hasattr(config, "mean_")  # the configuration is left as it was
    if per_class:  # 20 random images calibrate no class on its own (all offsets 0): offsets of every size
        assert fast.margin.class_offsets_.shape == (10,) and not fast.margin.class_offsets_.any()
        fast.margin.class_offsets_ = torch.linspace(-2, 2, 10, dtype=torch.float64)
    save_fast_path(out, fast, load_model("cifar10-cnn").info.identity())
    return out


def test_a_margin_combination_judges_the_fast_verdicts(margin_detector):
    from advdetect.detector.margin import log_prob_gap, noise_pattern
    from advdetect.evaluation.adaptive import fast_path_target
    from advdetect.masks.perturbation import gaussian_blur

    guard = Guard.load(margin_detector, device="cpu")
    fast = guard.deployment.fast
    assert fast.margin is not None and (margin_detector / "fast" / "margin.json").is_file()
    x = batch(8)
    verdicts = guard.check(x)
    # what the saved combination was fitted to read, by hand; the classifier sees the image and its copies in
    # one call, as the guard calls it (on some CPUs logits move by ~4e-6 with a call's batch size, and the MLP's
    # log-shift features magnify that to 1e-2)
    pattern = noise_pattern(tuple(x.shape[1:]), x.device)
    copies = [gaussian_blur(x, s) for s in fast.margin.squeeze] + \
        [(x + s * pattern).clamp(0, 1) for s in fast.margin.noise]
    logits, *shifted = guard.model.logits(torch.cat([x, *copies])).split(len(x))
    maps, _ = fast.maps(x, probs=logits.softmax(1))
    shifts = [(logits.softmax(1) - out.softmax(1)).abs().sum(1) / 2 for out in shifted]
    evidence = torch.stack([log_prob_gap(logits), *shifts], 1)
    scores = torch.as_tensor(fast.detector.decision_function(maps))
    expected = fast.margin._combined(scores, evidence)  # the combination's score, before any class offset
    if fast.margin.per_class:  # shifted by the predicted class's offset from the global threshold
        assert fast.margin.class_offsets_.abs().sum() > 0
        expected = expected - fast.margin.class_offsets_.float()[logits.argmax(1)]
    assert torch.allclose(verdicts.scores, expected, atol=1e-5)
    assert verdicts.threshold == pytest.approx(fast.margin.threshold_)
    assert fast.margin.threshold_ != pytest.approx(fast.detector.threshold_)  # the combination's, not the detector's
    assert torch.equal(verdicts.adversarial, verdicts.scores > fast.margin.threshold_)
    target, judge, real = fast_path_target(fast)  # the white-box attacker sees and is judged by the same thing
    assert torch.allclose(torch.as_tensor(judge.decision_function(real(x))), verdicts.scores, atol=1e-5)
    with torch.no_grad():
        attacked = judge._fitted()(target(x))
    assert torch.allclose(attacked, verdicts.scores, atol=0.05)  # iterations not rounded to whole ones there


def test_a_fast_path_saved_without_margin_drops_the_old_one_and_bad_files_are_refused(margin_detector):
    import json

    fast = Guard.load(margin_detector, device="cpu").deployment.fast
    path = margin_detector / "fast" / "margin.json"
    good = json.loads(path.read_text())
    for bad in ("{not json", json.dumps(good | {"threshold": float("nan")}), json.dumps(good | {"format": "x"})):
        path.write_text(bad)
        with pytest.raises(AdvDetectError, match="margin.json"):
            Guard.load(margin_detector, device="cpu")
    fast.margin = None
    save_fast_path(margin_detector, fast, load_model("cifar10-cnn").info.identity())
    assert not path.exists() and Guard.load(margin_detector, device="cpu").deployment.fast.margin is None


def test_channels_last_weights_give_the_verdicts_of_contiguous_ones(fast_quick_detector):
    """Guard.load converts its networks to channels-last (faster CPU convolutions) only where they give the
    same outputs; its verdicts, scores and masks then agree with a guard that keeps the default layout."""
    fast = Guard.load(fast_quick_detector, device="cpu")
    plain = Guard.load(fast_quick_detector, device="cpu", channels_last=False)
    assert fast.layout == {"classifier": True, "mask_net": True, "detector": True, "fast_detector": True}
    assert plain.layout == {} and plain.model.net.stem.weight.is_contiguous()
    assert fast.model.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = batch(16)
    a, b = fast.check(x), plain.check(x)
    assert torch.equal(a.labels, b.labels) and torch.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    ma, mb = fast.explain(x, exact=False), plain.explain(x, exact=False)
    assert torch.allclose(ma.masks, mb.masks, atol=1e-4) and torch.allclose(ma.prob_after, mb.prob_after, atol=1e-4)
    mine = load_model("cifar10-cnn")
    Guard.load(fast_quick_detector, model=mine, device="cpu")
    assert mine.net.stem.weight.is_contiguous()  # the caller's model is copied, never converted
