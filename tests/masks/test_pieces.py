from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advdetect.masks import MaskConfig
from advdetect.masks.loss import class_term, l1_term, objective, tv_term
from advdetect.masks.parameterization import base_grid, low_res_shape, pixels_to_grid, upsample
from advdetect.masks.perturbation import blend, gaussian_blur, reference


def test_blur_keeps_constant_images_and_smooths_noise():
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noise, 2.0).std() < 0.5 * noise.std()
    assert torch.equal(gaussian_blur(noise, 0.0), noise)


@pytest.mark.parametrize("shape,sigma,mode", [((3, 3, 32, 32), 2.0, "mirror"), ((2, 1, 17, 23), 1.5, "mirror"),
                                              ((1, 3, 5, 5), 2.0, "nearest"), ((1, 2, 300, 40), 2.0, "mirror")])
def test_blur_is_scipys_gaussian_filter(shape, sigma, mode):
    """Both ways of blurring (matrix products up to 256 px a side, convolution beyond) give what scipy gives:
    torch's reflect padding is scipy's "mirror", the replicate fallback for tiny images its "nearest"."""
    from scipy.ndimage import gaussian_filter

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode=mode, truncate=3.0)
    assert torch.allclose(gaussian_blur(x, sigma), torch.from_numpy(expected), atol=1e-10)
    assert torch.allclose(gaussian_blur(x.float(), sigma).double(), torch.from_numpy(expected), atol=1e-6)


def test_blur_gradient_even_after_first_use_under_inference_mode():
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    with torch.inference_mode():
        gaussian_blur(x, 1.25)  # the cached operator is made here
    leaf = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 1.25), (leaf,))


def test_references_and_blend():
    x = torch.rand(2, 3, 8, 8)
    const = reference(x, "constant")
    assert torch.allclose(const[:, :, 0, 0], x.mean(dim=(2, 3)))
    assert torch.equal(reference(x, "constant", constant=0.0), torch.zeros_like(x))
    noisy = reference(x, "noise", generator=torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, x)
    ref = torch.zeros_like(x)
    assert torch.equal(blend(x, ref, torch.ones(2, 1, 8, 8)), x)
    assert torch.equal(blend(x, ref, torch.zeros(2, 1, 8, 8)), ref)
    with pytest.raises(ValueError, match="unknown perturbation"):
        reference(x, "sparkle")


def test_upsample_matches_bilinear_interpolation_and_shifts():
    low = torch.rand(3, 1, 4, 4)
    grid = base_grid((16, 16), low.device, low.dtype)
    expected = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(upsample(low, grid), expected, atol=1e-5)
    shifted = upsample(low, grid, pixels_to_grid(torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, -4.0]]), (16, 16)))
    assert torch.allclose(shifted[0, :, :, :8], expected[0, :, :, 4:12], atol=1e-5)  # moved by 4 px in x
    assert torch.allclose(shifted[1], expected[1], atol=1e-6)
    assert low_res_shape((32, 32), 4) == (8, 8) and low_res_shape((30, 30), 4) == (8, 8)


def test_loss_terms():
    ones = torch.ones(2, 1, 4, 4)
    assert torch.equal(l1_term(ones, "delete"), torch.zeros(2))
    assert torch.equal(l1_term(ones, "preserve"), torch.ones(2))
    assert torch.equal(tv_term(ones, 3.0), torch.zeros(2))
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1
    assert tv_term(stripes, 3.0).item() == pytest.approx(1.0)  # every x-step jumps by 1, no y-steps
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    p = torch.softmax(logits, 1)
    assert torch.allclose(class_term(logits, torch.tensor([0, 0]), "delete"), p[:, 0])
    assert torch.allclose(class_term(logits, torch.tensor([0, 0]), "preserve"), 1 - p[:, 0])
    assert torch.allclose(class_term(logits, torch.tensor([0, 0]), "delete", "log_prob"), p[:, 0].log())


def test_objective_is_per_sample():
    masks = torch.rand(4, 1, 4, 4)
    logits = torch.randn(4, 10)
    target = torch.randint(0, 10, (4,))
    batch = objective(masks, logits, target, "delete", 0.1, 0.2, 3.0)
    singles = torch.cat([objective(masks[i:i + 1], logits[i:i + 1], target[i:i + 1], "delete", 0.1, 0.2, 3.0)
                         for i in range(4)])
    assert torch.allclose(batch, singles)


@pytest.mark.parametrize("bad", [{"game": "hide"}, {"perturbation": "x"}, {"iterations": 0}, {"lr": 0},
                                 {"l1_coeff": -1}, {"score": "logit"}, {"floor": -0.1}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        MaskConfig(**bad)


def test_config_roundtrip_and_paper_preset():
    cfg = MaskConfig(iterations=7)
    assert MaskConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown mask settings"):
        MaskConfig.from_dict({"bogus": 1})
    paper = MaskConfig.paper()
    assert paper.upsample == 8 and paper.tv_beta == 3 and paper.iterations == 300 and not paper.early_stop


@pytest.mark.parametrize("score", ["prob", "log_prob", "log_odds"])
def test_floor_stops_the_push_exactly_at_floor_times_p0(score):
    from advdetect.masks.meaningful import floor_score

    p0 = torch.tensor([0.9])
    floor = floor_score(p0, 0.1, score)  # the class counts as deleted below p = 0.09
    target = torch.tensor([0])

    def grad_at(p: float) -> float:
        logits = torch.tensor([[torch.log(torch.tensor(p / (1 - p))).item(), 0.0]], requires_grad=True)
        class_term(logits, target, "delete", score, floor).sum().backward()
        return logits.grad.abs().sum().item()

    assert grad_at(0.2) > 0  # above the floor: still pushed down
    assert grad_at(0.05) == 0  # below the floor: nothing more to gain
