from __future__ import annotations

import pytest
import torch

from advdetect.data import load_cifar10
from advdetect.masks import MaskConfig, MeaningfulPerturbation, compute_masks
from advdetect.models import load_model

from ..conftest import SHARED_DATA, needs_builtin, needs_cuda, needs_shared

FAST = MaskConfig(iterations=30, early_stop=False, batch_size=8)


def test_shape_range_and_targets(tiny_model, tiny_images):
    r = compute_masks(tiny_model, tiny_images[:10], config=FAST)
    assert r.masks.shape == (10, 1, 16, 16) and r.masks.dtype == torch.float32
    assert r.masks.min() >= 0 and r.masks.max() <= 1
    assert torch.equal(r.targets, tiny_model.predict(tiny_images[:10]))
    assert r.iterations.tolist() == [30] * 10
    r2 = compute_masks(tiny_model, tiny_images[:3], target=4, config=FAST)
    assert r2.targets.tolist() == [4, 4, 4]


def test_fixed_seed_gives_same_masks_and_other_seed_differs(tiny_model, tiny_images):
    cfg = FAST.replace(jitter=1.0, noise=0.05)
    a = compute_masks(tiny_model, tiny_images[:6], config=cfg).masks
    b = compute_masks(tiny_model, tiny_images[:6], config=cfg).masks
    c = compute_masks(tiny_model, tiny_images[:6], config=cfg.replace(seed=1)).masks
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("jitter,noise", [(0.0, 0.0), (1.0, 0.05)])
def test_batched_equals_one_at_a_time(tiny_model, tiny_images, jitter, noise):
    # Equal up to float reordering: conv kernels sum in a batch-size-dependent order (~1e-7),
    # and Adam's normalised step can magnify that where a gradient is ~0. Coupling between
    # images (a shared loss scale, batch statistics) shows up at 1e-2 and above.
    cfg = FAST.replace(jitter=jitter, noise=noise)
    x = tiny_images[:9]
    batched = compute_masks(tiny_model, x, config=cfg.replace(batch_size=4))  # chunks of 4, 4, 1
    for i in range(len(x)):
        alone = compute_masks(tiny_model, x[i:i + 1], config=cfg.replace(batch_size=1))
        assert torch.allclose(batched.masks[i], alone.masks[0], atol=1e-4), i
        assert batched.iterations[i] == alone.iterations[0]


def test_early_stopping_is_per_image_and_batch_independent(tiny_model, tiny_images):
    cfg = MaskConfig(iterations=200, early_stop=True, check_every=10, min_iterations=20, tol=0.05, stop_ratio=0.9,
                     batch_size=5)
    x = tiny_images[:12]
    r = compute_masks(tiny_model, x, config=cfg)
    assert r.iterations.min() < 200 and (r.iterations % 10 == 0).all()
    single = [compute_masks(tiny_model, x[i:i + 1], config=cfg.replace(batch_size=1)) for i in (0, 7)]
    for i, s in zip((0, 7), single):
        assert r.iterations[i] == s.iterations[0]
        assert torch.allclose(r.masks[i], s.masks[0], atol=1e-4)


def test_model_left_unchanged(tiny_model, tiny_images):
    tiny_model.train()
    flags = [p.requires_grad for p in tiny_model.parameters()]
    running = tiny_model.net[1].running_mean.clone()
    compute_masks(tiny_model, tiny_images[:4], config=FAST)
    assert tiny_model.training and [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    assert torch.equal(running, tiny_model.net[1].running_mean)


def test_bad_inputs(tiny_model, tiny_images):
    explainer = MeaningfulPerturbation(tiny_model, FAST)
    with pytest.raises(ValueError, match="N x C x H x W"):
        explainer.attribute(tiny_images[0])
    with pytest.raises(ValueError, match="target has 2 entries"):
        explainer.attribute(tiny_images[:3], target=torch.tensor([1, 2]))


def test_preservation_game_keeps_less_than_everything(tiny_model, tiny_images):
    r = compute_masks(tiny_model, tiny_images[:4], config=FAST.replace(game="preserve", l1_coeff=0.5))
    assert r.masks.mean() < 0.5


@needs_cuda
def test_cuda_matches_cpu(tiny_images):
    from ..conftest import make_tiny_model

    model = make_tiny_model()
    cpu = compute_masks(model, tiny_images[:4], config=FAST)
    gpu = compute_masks(model.cuda(), tiny_images[:4].cuda(), config=FAST)
    assert gpu.masks.device.type == "cuda"
    assert torch.allclose(cpu.masks, gpu.masks.cpu(), atol=1e-3)


@needs_shared
@needs_builtin
def test_deletion_quality_on_builtin_model():
    """Item 4: for >= 90% of correctly classified test images, the perturbed image's target
    probability is at most 10% of the original (default configuration, early stopping on)."""
    model = load_model("cifar10-cnn")
    data = load_cifar10("test", n=96, seed=123, data_dir=SHARED_DATA)
    correct = model.predict(data.images) == data.labels
    r = compute_masks(model, data.images)
    quality = (r.deletion_ratio[correct] <= 0.1).float().mean().item()
    assert quality >= 0.9, f"deletion quality {quality:.3f}"
    assert r.masks.shape == (96, 1, 32, 32) and 0 <= r.masks.min() and r.masks.max() <= 1
