"""The detector's inputs: masks and evidence planes, built the same way when fitting and when deployed."""

from __future__ import annotations

import pytest
import torch

from advdetect.detector import MaskDetector, load_detector, save_detector
from advdetect.detector.inputs import (INPUTS, confidence_planes, detector_maps, input_channels, maps_for_result,
                                       parse_inputs, residual_map)
from advdetect.errors import AdvDetectError, OptionError
from advdetect.masks import MaskConfig, make_explainer

from ..conftest import make_tiny_model


def test_parse_inputs_orders_and_rejects():
    assert parse_inputs(None) == INPUTS
    assert parse_inputs("confidence, masks") == ("masks", "confidence")
    assert parse_inputs(["residual"]) == ("residual",)
    for bad in ("masks,colour", "", " , "):
        with pytest.raises(OptionError, match="choose from"):
            parse_inputs(bad)
    with pytest.raises(OptionError):
        MaskDetector(inputs="masks,nope").fit(torch.rand(8, 1, 32, 32), torch.arange(8) % 2)


def test_residual_shows_sign_noise_and_stays_in_range():
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=gen), size=32, mode="bicubic").clamp(0, 1)
    noisy = (smooth + 8 / 255 * torch.sign(torch.randn(smooth.shape, generator=gen))).clamp(0, 1)
    clean_r, noisy_r = residual_map(smooth), residual_map(noisy)
    assert clean_r.shape == (4, 1, 32, 32)
    assert float(noisy_r.mean()) > 3 * float(clean_r.mean())  # FGSM-like noise is what the plane shows
    assert 0 <= float(noisy_r.min()) and float(noisy_r.max()) <= 1
    big = residual_map(torch.rand(2, 1, 224, 224, generator=gen))  # grayscale, pooled to the detector's size
    assert big.shape == (2, 1, 32, 32)


def test_confidence_planes_are_constant():
    planes = confidence_planes(torch.tensor([0.9, 0.4]), torch.tensor([0.01, 0.2]), torch.tensor([30, 150]), 150)
    assert planes.shape == (2, 3, 32, 32)
    assert torch.allclose(planes[:, :, 5, 7], torch.tensor([[0.9, 0.01, 0.2], [0.4, 0.2, 1.0]]))
    assert bool((planes == planes[:, :, :1, :1]).all())


@pytest.mark.parametrize("names", [("masks",), ("masks", "residual"), ("masks", "confidence"), INPUTS])
def test_maps_have_the_channels_the_inputs_name(names):
    model = make_tiny_model()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    result = make_explainer(model, MaskConfig(iterations=5, min_iterations=1)).attribute(x)
    maps = maps_for_result(names, x, result)
    assert maps.shape == (3, input_channels(names), 32, 32)
    assert torch.allclose(maps[:, :1], torch.nn.functional.adaptive_avg_pool2d(result.masks, 32))
    with pytest.raises(ValueError, match="needs"):
        detector_maps(names + ("residual",) if "residual" not in names else names, result.masks)


def test_fitting_and_deployment_build_the_same_maps(tmp_path):
    """The stored sets (what train fits on) and a fresh mask of the same image give identical maps."""
    from advdetect.attacks import AttackConfig
    from advdetect.attackset import generate_attack_set
    from advdetect.maskset import compute_mask_set
    from advdetect.sources import Selection, TensorSource
    from advdetect.splits import load_split

    model = make_tiny_model(size=32)
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (6, 3, 32, 32), generator=gen, dtype=torch.uint8)
    source = TensorSource(pixels, torch.arange(6) % 10, model.info.classes, "t", (32, 32), 3)
    images = Selection(source, list(range(6)), {"dataset": "t", "split": "test", "seed": 0})
    config = MaskConfig(iterations=8, min_iterations=1)
    generate_attack_set(model, images, AttackConfig("fgsm"), tmp_path / "set", progress=False)
    compute_mask_set(model, tmp_path / "set", config=config, progress=False)
    split = load_split(tmp_path / "set", "delete", inputs=INPUTS)
    assert split.masks_clean.shape == (6, 5, 32, 32) and split.recovery_clean.shape[1] == 1
    fresh = maps_for_result(INPUTS, split.adv, make_explainer(model, config).attribute(split.adv))
    assert torch.allclose(fresh, split.masks_adv, atol=1e-5)
    streamed = load_split(tmp_path / "set", "delete", inputs=INPUTS, images=False, pool=32)  # what fitting reads
    assert torch.allclose(streamed.masks_adv, split.masks_adv) and torch.allclose(streamed.masks_clean, split.masks_clean)


def test_saved_detector_keeps_its_inputs_and_refuses_a_mismatch(tmp_path):
    X, y = torch.rand(16, 4, 32, 32), torch.arange(16) % 2
    det = MaskDetector(epochs=1, batch_size=8, inputs="masks,confidence").fit(X, y)
    identity = make_tiny_model().info.identity()
    save_detector(tmp_path / "ok", det, identity, MaskConfig())
    loaded, _ = load_detector(tmp_path / "ok")
    assert loaded.input_names() == ("masks", "confidence")
    assert torch.allclose(torch.as_tensor(loaded.decision_function(X)), torch.as_tensor(det.decision_function(X)))
    with pytest.raises(ValueError, match="cannot hold"):  # 2 channels cannot hold 3 planes and a mask
        MaskDetector(epochs=1, inputs="masks,confidence").fit(torch.rand(16, 2, 32, 32), y)
    import json

    meta_path = tmp_path / "ok" / "detector.json"
    meta = json.loads(meta_path.read_text())
    meta["params"]["inputs"] = "masks,residual,confidence"  # edited: 4 channels cannot hold 5 planes
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdvDetectError, match="cannot make"):
        load_detector(tmp_path / "ok")
