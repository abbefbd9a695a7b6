from __future__ import annotations

import numpy as np
import pytest
import torch

from advdetect.detector import MaskDetector, detection_metrics, load_detector, save_detector, threshold_for_fpr
from advdetect.errors import AdvDetectError
from advdetect.masks import MaskConfig


def synthetic_masks(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean: one smooth central blob deleted. Adversarial: scattered small holes."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    clean = []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=gen) * 10 + 11).tolist()
        r = float(torch.rand(1, generator=gen) * 4 + 5)
        clean.append(1 - torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    adv = (torch.rand(n, 8, 8, generator=gen) > 0.85).float()
    adv = 1 - torch.nn.functional.interpolate(adv[:, None], size=32, mode="bilinear", align_corners=False)[:, 0]
    X = torch.cat([torch.stack(clean), adv])[:, None]
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    return X, y


@pytest.fixture(scope="module")
def fitted():
    X, y = synthetic_masks(150)
    return MaskDetector(epochs=8, patience=3, seed=0).fit(X, y)


def test_fit_returns_self_and_learns(fitted):
    X, y = synthetic_masks(100, seed=1)
    assert fitted.score(X, y) > 0.9
    proba = fitted.predict_proba(X)
    assert proba.shape == (200, 2) and np.allclose(proba.sum(1), 1)
    assert fitted.history_ and fitted.n_features_in_ == (1, 32, 32)
    assert set(fitted.predict(X).tolist()) <= {0, 1}


def test_threshold_is_calibrated_to_fpr(fitted):
    X, y = synthetic_masks(400, seed=2)
    clean = X[y == 0]
    fitted.calibrate(clean, fpr=0.05)
    assert (fitted.decision_function(clean) > fitted.threshold_).mean() <= 0.05
    fitted.calibrate(clean, fpr=0.2)
    rate = (fitted.decision_function(clean) > fitted.threshold_).mean()
    assert 0.15 <= rate <= 0.2
    fitted.calibrate(clean, fpr=0.05)


def test_get_set_params():
    det = MaskDetector(epochs=3)
    params = det.get_params()
    assert params["epochs"] == 3 and params["fpr"] == 0.05
    assert det.set_params(lr=0.01) is det and det.lr == 0.01
    with pytest.raises(ValueError, match="unknown parameter"):
        det.set_params(bogus=1)


def test_bad_inputs():
    X, y = synthetic_masks(10)
    with pytest.raises(ValueError, match="both classes"):
        MaskDetector(epochs=1).fit(X, torch.zeros(len(X)))
    with pytest.raises(ValueError, match="val_fraction"):
        MaskDetector(val_fraction=1.5).fit(X, y)
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        MaskDetector(epochs=1).fit(torch.rand(20, 32), y)
    det = MaskDetector(epochs=1).fit(torch.rand(20, 3, 32, 32), y)  # C-channel maps (the raw-image baseline)
    assert det.decision_function(torch.rand(4, 3, 32, 32)).shape == (4,)
    with pytest.raises(ValueError, match="takes 3-channel maps"):
        det.decision_function(X)
    with pytest.raises(RuntimeError, match="not fitted"):
        MaskDetector().decision_function(X)


def test_save_load_roundtrip_and_classifier_check(fitted, tmp_path):
    ident = {"name": "tiny", "sha256": "abc", "input_size": [16, 16], "num_classes": 10}
    save_detector(tmp_path, fitted, ident, MaskConfig(iterations=5))
    loaded, meta = load_detector(tmp_path, classifier=ident)
    X, _ = synthetic_masks(20, seed=3)
    assert np.allclose(loaded.decision_function(X), fitted.decision_function(X), atol=1e-5)
    assert loaded.threshold_ == fitted.threshold_ and meta["mask_config"]["iterations"] == 5
    assert "torch" in meta["versions"]
    with pytest.raises(AdvDetectError, match="built for classifier tiny"):
        load_detector(tmp_path, classifier=dict(ident, sha256="other"))
    weights = tmp_path / "detector.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdvDetectError, match="checksum mismatch"):
        load_detector(tmp_path)


def test_metrics():
    labels = np.array([0] * 100 + [1] * 100)
    scores = np.concatenate([np.linspace(0, 1, 100), np.linspace(0.5, 1.5, 100)])
    t = threshold_for_fpr(scores[:100], 0.05)
    assert (scores[:100] > t).mean() <= 0.05
    m = detection_metrics(labels, scores, t)
    assert 0.5 < m["roc_auc"] < 1 and m["fpr_at_threshold"] <= 0.05
    assert m["tpr_at_5fpr"] == pytest.approx(m["tpr_at_threshold"])
    perfect = detection_metrics(labels, np.concatenate([np.zeros(100), np.ones(100)]), 0.5)
    assert perfect["accuracy"] == 1 and perfect["roc_auc"] == 1 and perfect["tpr_at_1fpr"] == 1
