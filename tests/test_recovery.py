"""Label recovery: the light-blur and mask methods, ruling out the flagged label, the metrics."""

from __future__ import annotations

import pytest
import torch

from advdetect.masks import MaskConfig, make_explainer
from advdetect.masks.perturbation import gaussian_blur
from advdetect.recovery import PAPER_RECOVERY, RECOVERY_METHODS, RecoveryConfig, recover, recovery_metrics


def test_config_validates_and_round_trips():
    assert RecoveryConfig.from_dict(RecoveryConfig(sigma=1.5).to_dict()) == RecoveryConfig(sigma=1.5)
    with pytest.raises(ValueError, match="unknown recovery method 'magic'"):
        RecoveryConfig(method="magic")
    with pytest.raises(ValueError, match="sigma"):
        RecoveryConfig(sigma=0)
    with pytest.raises(ValueError, match="unknown recovery settings: colour"):
        RecoveryConfig.from_dict({"colour": 1})


def test_blur_classifies_the_blurred_image(tiny_model, tiny_images):
    x = tiny_images[:8]
    tiny_model.train()
    rec = recover(tiny_model, x, config=RecoveryConfig(sigma=1.0, exclude_flagged=False))
    assert tiny_model.training  # the caller's mode is restored
    assert torch.allclose(rec.images, gaussian_blur(x, 1.0))
    assert torch.allclose(rec.logits, tiny_model.logits(gaussian_blur(x, 1.0)), atol=1e-6)
    assert torch.equal(rec.top5, rec.logits.topk(5, 1).indices)


def test_flagged_prediction_is_ruled_out_only_where_flagged(tiny_model, tiny_images):
    x = tiny_images[:8]
    plain = recover(tiny_model, x, config=RecoveryConfig(exclude_flagged=False))
    predicted = plain.top1.clone()  # rule out exactly the label recovery would give
    flagged = torch.tensor([True, False] * 4)
    rec = recover(tiny_model, x, config=RecoveryConfig(), predicted=predicted, flagged=flagged)
    assert torch.equal(rec.logits, plain.logits)
    assert bool((rec.top1[flagged] != predicted[flagged]).all())
    assert bool((rec.top5[flagged] != predicted[flagged, None]).all())
    assert torch.equal(rec.top5[~flagged], plain.top5[~flagged])
    assert torch.equal(rec.top5[flagged, 0], plain.top5[flagged, 1])  # the runner-up moves up
    # probabilities: renormalised over the classes left, 0 for the ruled-out one
    assert torch.allclose(rec.probs.sum(1), torch.ones(8))
    assert bool((rec.probs[flagged].gather(1, predicted[flagged, None]) == 0).all())
    assert torch.allclose(rec.probs[~flagged], plain.logits[~flagged].softmax(1))


def test_mask_method_applies_the_mask(tiny_model, tiny_images):
    x = tiny_images[:4]
    cfg = MaskConfig(iterations=10, early_stop=False)
    masks = make_explainer(tiny_model, cfg).attribute(x).masks
    rec = recover(tiny_model, x, masks, PAPER_RECOVERY, cfg)
    assert torch.allclose(rec.images, make_explainer(tiny_model, cfg).perturb(x, masks))
    with pytest.raises(ValueError, match="needs the images' deletion masks"):
        recover(tiny_model, x, None, PAPER_RECOVERY, cfg)


def test_metrics_count_recovery_and_harm(tiny_model, tiny_images):
    x = tiny_images[:16]
    clean_pred = tiny_model.predict(x)
    labels = clean_pred.clone()
    labels[:2] = (labels[:2] + 1) % 10  # two misclassified clean images
    adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    adv_pred = (clean_pred + 1) % 10  # pretend every attack succeeded with the next class
    masks = torch.ones(16, 1, 16, 16)
    flagged = torch.tensor([True] * 4 + [False] * 12)
    m = recovery_metrics(tiny_model, x, adv, labels, clean_pred, adv_pred, masks, masks, clean_flagged=flagged,
                         mask_config=MaskConfig())
    assert m.method == "blur" and m.n_clean == 14 and m.n_adversarial == 14
    # flagged clean images lose their prediction (it is ruled out): harm = flagged correct images
    assert m.harm == pytest.approx(2 / 14)
    plain = recover(tiny_model, x[2:], config=RecoveryConfig(exclude_flagged=False))
    assert m.harm_unconditional == pytest.approx(float((plain.top1 != clean_pred[2:]).float().mean()))
    # all-ones masks keep the image: the paper's recovery gives back the adversarial image's own label
    assert m.mask_recovery_top1 == pytest.approx(float((tiny_model.predict(adv[2:]) == clean_pred[2:]).float().mean()))
    rec = recover(tiny_model, adv[2:], config=RecoveryConfig(), predicted=adv_pred[2:])
    assert m.recovery_top1 == pytest.approx(float((rec.top1 == clean_pred[2:]).float().mean()))


def test_metrics_of_the_deployed_pipeline_count_flagged_images_only(tiny_model, tiny_images):
    x = tiny_images[:16]
    clean_pred = tiny_model.predict(x)
    adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    adv_pred = (clean_pred + 1) % 10
    masks = torch.ones(16, 1, 16, 16)
    adv_flagged = torch.tensor([True] * 6 + [False] * 10)
    m = recovery_metrics(tiny_model, x, adv, clean_pred, clean_pred, adv_pred, masks, masks,
                         mask_config=MaskConfig(), adv_flagged=adv_flagged)
    rec = recover(tiny_model, adv, config=RecoveryConfig(), predicted=adv_pred)
    hit = rec.top1 == clean_pred
    assert m.n_flagged == 6 and m.recovery_top1 == pytest.approx(float(hit.float().mean()))
    assert m.flagged_recovery_top1 == pytest.approx(float(hit[:6].float().mean()))
    assert m.pipeline_recovery_top1 == pytest.approx(float(hit[:6].sum()) / 16)
    assert recovery_metrics(tiny_model, x, adv, clean_pred, clean_pred, adv_pred, masks, masks,
                            mask_config=MaskConfig()).n_flagged is None


@pytest.mark.parametrize("method", RECOVERY_METHODS)
def test_recover_figure_shows_what_produced_the_numbers(quick_detector, tmp_path, monkeypatch, method):
    """The third panel is the image recovery classified, titled with the recovered label and its probability."""
    from PIL import Image

    import advdetect.plots
    from advdetect.inference import recover_image

    drawn = {}
    monkeypatch.setattr(advdetect.plots, "explanation_figure", lambda *args, **kwargs: drawn.update(args=args,
                                                                                                     kwargs=kwargs))
    path = tmp_path / "a.png"
    pixels = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    result = recover_image(path, quick_detector, out=tmp_path / "fig.png", device="cpu", method=method)
    image, mask, shown = drawn["args"][:3]
    titles = drawn["kwargs"]["panel_titles"]
    top = result["recovered_top5"][0]
    assert titles[2] == f"recovered input: {top['class']} ({top['probability']:.1%})"
    if method == "blur":
        assert torch.allclose(shown, gaussian_blur(image[None], 0.75)[0], atol=1e-6)
        assert titles[1].startswith("mask the detector read")
    else:
        assert not torch.allclose(shown, gaussian_blur(image[None], 0.75)[0], atol=1e-3)
        assert titles[1].startswith("deletion mask applied back")


def test_cli_offers_every_method():
    from click.testing import CliRunner

    from advdetect.cli import main

    for command, option in (("recover", "--method"), ("train", "--recovery")):
        help_text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert f"{option} [{'|'.join(RECOVERY_METHODS)}]" in help_text, command
