from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from advdetect.errors import AdvDetectError, UnknownNameError
from advdetect.models import load_model
from advdetect.storage import read_json

from ..conftest import REPO, make_tiny_model, needs_builtin


@needs_builtin
def test_builtin_model_loads_with_metadata():
    model = load_model("cifar10-cnn")
    meta = read_json(REPO / "data" / "models" / "cifar10-cnn.json")
    assert model.info.classes[0] == "airplane" and model.info.input_size == (32, 32)
    assert model.info.sha256 == meta["sha256"] and meta["test_accuracy"] >= 0.88
    assert not model.training
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownNameError, match="cifar10-cnn"):
        load_model("resnet9000")
    with pytest.raises(UnknownNameError, match="resnet18"):
        load_model("torchvision:resnet9000")


def test_torchvision_model_without_weights():
    model = load_model("torchvision:resnet18")
    assert model.info.input_size == (224, 224) and model.info.num_classes == 1000
    assert model.info.mean == (0.485, 0.456, 0.406)


def _tiny_net():
    return make_tiny_model().net.eval()


def test_export_program_roundtrip(tmp_path):
    net = _tiny_net()
    x = torch.rand(2, 3, 16, 16)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, str(path))
    (tmp_path / "tiny.pt2.json").write_text(json.dumps({"mean": [0.5], "std": [0.25], "input_size": [16, 16]}))
    model = load_model(str(path))
    assert model.info.num_classes == 10 and model.info.mean == (0.5, 0.5, 0.5)
    assert torch.allclose(model(x), net((x - 0.5) / 0.25), atol=1e-5)


def test_export_program_with_static_batch_is_explained(tmp_path):
    net = _tiny_net()
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 16, 16),)), str(path))
    with pytest.raises(AdvDetectError, match="dynamic batch"):
        load_model(str(path), mean=[0.5], std=[0.25], input_size=[16, 16])


def test_torchscript_roundtrip_with_explicit_normalization(tmp_path):
    net = _tiny_net()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 16, 16)), str(path))
    model = load_model(str(path), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], input_size=[16, 16])
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(model(x), net((x - 0.5) / 0.25), atol=1e-5)


def test_model_file_needs_normalization(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(_tiny_net(), torch.rand(1, 3, 16, 16)), str(path))
    with pytest.raises(AdvDetectError, match="--mean, --std and --input-size"):
        load_model(str(path))


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_file_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, str(path))
    with pytest.raises(AdvDetectError, match="not a TorchScript file"):
        load_model(str(path), mean=[0.5], std=[0.25], input_size=[16, 16])
    assert not (tmp_path / "PWNED").exists()


def test_missing_model_file(tmp_path):
    with pytest.raises(AdvDetectError, match="no such file"):
        load_model(str(tmp_path / "none.pt2"))


def _tiny_file(tmp_path):
    """A 16-px TorchScript model whose normalization was given on the command line (no sidecar)."""
    path = tmp_path / "models" / "tiny.pt"
    path.parent.mkdir()
    torch.jit.save(torch.jit.trace(_tiny_net(), torch.rand(1, 3, 16, 16)), str(path))
    return path


def test_model_file_recorded_by_absolute_path_and_sha(tmp_path, monkeypatch):
    from advdetect.models import load_recorded_model

    path = _tiny_file(tmp_path)
    monkeypatch.chdir(path.parent)
    identity = load_model("tiny.pt", mean=[0.5], std=[0.25], input_size=[16, 16]).info.identity()
    assert identity["name"] == str(path.resolve()) and identity["mean"] == [0.5] * 3

    monkeypatch.chdir(tmp_path)  # elsewhere, with no sidecar: the record alone loads it
    again = load_recorded_model(identity, "cpu", "detector d")
    assert again.info.identity() == identity

    retrained = make_tiny_model(seed=1).net.eval()  # the file is replaced by another model under the record
    torch.jit.save(torch.jit.trace(retrained, torch.rand(1, 3, 16, 16)), str(path))
    with pytest.raises(AdvDetectError, match="changed since"):
        load_recorded_model(identity, "cpu", "detector d")
    path.unlink()
    with pytest.raises(AdvDetectError, match="is missing; pass --model"):
        load_recorded_model(identity, "cpu", "detector d")


def test_detect_and_masks_find_a_model_file_from_another_directory(tmp_path, monkeypatch):
    """`masks --in` and `detect` without --model, run from a directory other than the model's."""
    from click.testing import CliRunner

    from advdetect.cli import main
    from advdetect.detector import MaskDetector, save_detector
    from advdetect.masks import MaskConfig

    path = _tiny_file(tmp_path)
    monkeypatch.chdir(path.parent)
    model = load_model("tiny.pt", mean=[0.5], std=[0.25], input_size=[16, 16])
    det = MaskDetector(epochs=1, batch_size=8).fit(torch.rand(16, 1, 16, 16), torch.arange(16) % 2)
    save_detector(tmp_path / "det", det, model.info.identity(), MaskConfig(iterations=3))
    runner = CliRunner()
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(image)
    assert runner.invoke(main, ["attack", "--model", "tiny.pt", "--mean", "0.5", "--std", "0.25", "--input-size",
                                "16", "--attack", "fgsm", "--n", "4", "--data", str(_folder(tmp_path)),
                                "--out", str(tmp_path / "set")]).exit_code == 0

    monkeypatch.chdir(tmp_path / "det")
    result = runner.invoke(main, ["detect", str(image), "--detector", str(tmp_path / "det"), "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["masks", "--in", str(tmp_path / "set"), "--iterations", "3", "--json"])
    assert result.exit_code == 0, result.output


def _folder(tmp_path):
    root = tmp_path / "folder"
    for cls in ("class_0", "class_1"):  # named after two of the model's classes
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (i * 90, 40, 200)).save(root / cls / f"{i}.png")
    return root
