"""The 224-pixel path: torchvision's resnet18 (seeded random weights) through explain, attack + masks and
a small train, with the paper's mask settings chosen for the input size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from advdetect.cli import main
from advdetect.masks import MaskConfig
from advdetect.splits import load_mask_set

MODEL = "torchvision:resnet18"
FAST = ["--iterations", "2"]
pytestmark = pytest.mark.slow  # end to end at 224 px


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ (10) and test/ (20) images of 64 px, filed under the class resnet18 gives them, and the
    --classes file naming those classes."""
    from advdetect.models import load_model

    root = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    model = load_model(MODEL)
    arrays = [np.array(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64),
                                                                                            Image.BILINEAR))
              for _ in range(30)]
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
        x = torch.nn.functional.interpolate(x, size=224, mode="bilinear", antialias=True)
        predicted = model(x).argmax(1).tolist()
    for i, (array, label) in enumerate(zip(arrays, predicted)):
        part = root / "data" / ("train" if i < 10 else "test") / f"k{label}"
        part.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(part / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({f"k{label}": label for label in set(predicted)}))
    return root


def test_settings_follow_the_input_size():
    assert MaskConfig.for_input_size((224, 224)) == MaskConfig.paper()
    assert MaskConfig.for_input_size((32, 32)) == MaskConfig() == MaskConfig.for_input_size(28)
    mid = MaskConfig.for_input_size(112, iterations=7)
    assert (mid.upsample, mid.blur_sigma, mid.jitter, mid.iterations) == (4, 5.0, 2.0, 7)
    assert not mid.early_stop and mid.score == "prob"  # the paper's objective from 64 px on


def test_explain_at_224_uses_the_papers_settings(folder, tmp_path):
    image = next((folder / "data" / "test").rglob("*.png"))
    result = run("explain", str(image), "--model", MODEL, "--json", "--out", str(tmp_path / "f.png"), *FAST)
    assert result.exit_code == 0, result.output
    r = last_json(result)
    assert r["mask_config"]["upsample"] == 8 and r["mask_config"]["blur_sigma"] == 10.0
    assert any("resized from 64x64 to 224x224" in n for n in r["notes"])
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_attack_masks_and_train_at_224(folder, tmp_path):
    data, classes = str(folder / "data"), str(folder / "classes.json")
    out = tmp_path / "set"
    attack = run("attack", "--model", MODEL, "--data", data, "--classes", classes, "--attack", "fgsm", "--n", "6",
                 "--out", str(out), "--json")
    assert attack.exit_code == 0, attack.output
    assert last_json(attack)["clean_accuracy"] == 1.0  # files are filed under the model's own labels
    masks = run("masks", "--in", str(out), "--json", *FAST)
    assert masks.exit_code == 0, masks.output
    assert load_mask_set(out)["clean_mask"].shape == (6, 1, 224, 224)
    assert last_json(masks)["config"]["upsample"] == 8
    train = run("train", "--model", MODEL, "--data", data, "--classes", classes, "--attack", "fgsm", "--n", "10",
                "--n-eval", "10", "--n-calibration", "10", "--out", str(tmp_path / "det"), "--json",
                "--fast-epochs", "2", *FAST)  # detect uses the 224 px fast path; its quality is not the point
    assert train.exit_code == 0, train.output
    report = last_json(train)
    assert report["mask_config"]["blur_sigma"] == 10.0 and report["metrics"]["fgsm"]["n_clean"] == 10
    detect = run("detect", str(folder / "data" / "test"), "--detector", str(tmp_path / "det"), "--json")
    assert detect.exit_code == 0, detect.output
    assert len(detect.stdout.strip().splitlines()) == 20
