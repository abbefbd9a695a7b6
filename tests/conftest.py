from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from advdetect.models.wrapper import ModelInfo, ModelWrapper

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
HAS_SHARED = (SHARED_DATA / "cifar10-jpeg" / "test").is_dir()
BUILTIN_WEIGHTS = REPO / "data" / "models" / "cifar10-cnn.safetensors"

# Under pytest-xdist (`make test` runs `-n 2`), each worker gets its share of the cores, and so do the
# processes a test starts: more torch threads than cores slows every one of them several times.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

needs_shared = pytest.mark.skipif(not HAS_SHARED, reason=f"CIFAR-10 copy not found at {SHARED_DATA}")
needs_builtin = pytest.mark.skipif(not BUILTIN_WEIGHTS.is_file(), reason="built-in weights not trained yet")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def make_tiny_model(seed: int = 0, num_classes: int = 10, size: int = 16) -> ModelWrapper:
    """A small fixed random convnet on size x size RGB inputs, normalization inside."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(16 * (size // 2) ** 2, num_classes),
    )
    info = ModelInfo("tiny", tuple(f"c{i}" for i in range(num_classes)), (size, size), (0.5, 0.5, 0.5),
                     (0.25, 0.25, 0.25), "tiny-sha")
    return ModelWrapper(net, info).eval()


@pytest.fixture
def tiny_model() -> ModelWrapper:
    return make_tiny_model()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def quick_detector(tmp_path_factory) -> Path:
    """A real detector for the built-in classifier, fitted in a second on random masks (10 mask iterations).

    For tests of plumbing, not of detection quality.
    """
    from advdetect.detector import MaskDetector, save_detector
    from advdetect.masks import MaskConfig
    from advdetect.models import load_model

    if not BUILTIN_WEIGHTS.is_file():
        pytest.skip("built-in weights not trained yet")
    out = tmp_path_factory.mktemp("quick-detector")
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(64, 1, 32, 32, generator=gen)
    y = torch.arange(64) % 2
    det = MaskDetector(epochs=1, batch_size=32).fit(X, y)
    save_detector(out, det, load_model("cifar10-cnn").info.identity(), MaskConfig(iterations=10))
    return out


@pytest.fixture(scope="session")
def fast_quick_detector(quick_detector, tmp_path_factory) -> Path:
    """The quick detector with a fast path (an untrained mask network, a detector fitted on random maps)."""
    import shutil

    from advdetect.detector import MaskDetector
    from advdetect.fastpath import FastPath, save_fast_path
    from advdetect.masks import MaskConfig
    from advdetect.masks.amortized import AmortizedMasks, mask_net_for
    from advdetect.models import load_model

    out = tmp_path_factory.mktemp("fast-detector") / "det"
    shutil.copytree(quick_detector, out)
    model = load_model("cifar10-cnn")
    torch.manual_seed(0)
    config = MaskConfig(iterations=10)
    net = mask_net_for(model.info, config)
    gen = torch.Generator().manual_seed(1)
    detector = MaskDetector(epochs=1, batch_size=32).fit(torch.rand(64, 1, 32, 32, generator=gen), torch.arange(64) % 2)
    detector.calibrate(torch.rand(32, 1, 32, 32, generator=gen))
    save_fast_path(out, FastPath(AmortizedMasks(model, net, config), detector), model.info.identity())
    return out
