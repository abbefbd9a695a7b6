from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from advdetect.splits import load_attack_set
from advdetect.cli import main

from .conftest import SHARED_DATA, needs_builtin, needs_shared


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("command", ["", "attack"])
def test_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "nope"], "unknown model 'nope'; choose one of: cifar10-cnn"),
        (["--attack", "nope"], "unknown attack 'nope'; choose one of: fgsm, bim, pgd, mifgsm, ll-bim, cw, deepfool"),
        (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such directory"),
        (["--eps", "8/0"], "bad epsilon '8/0'"),
        (["--eps", "abc"], "bad epsilon 'abc'"),
    ],
)
@needs_builtin
def test_bad_names_exit_2_with_one_line(tmp_path, args, needle):
    result = run("attack", "--out", str(tmp_path / "o"), "--n", "4", "--data-dir", str(tmp_path), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_bad_device_choice(tmp_path):
    result = run("attack", "--out", str(tmp_path), "--device", "tpu")
    assert result.exit_code == 2 and "auto" in result.output


@needs_builtin
def test_missing_data_exit_2(tmp_path, monkeypatch):
    monkeypatch.setattr("advdetect.data._load_torchvision_cifar",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    result = run("attack", "--out", str(tmp_path / "o"), "--n", "4", "--data-dir", str(tmp_path / "empty"))
    assert result.exit_code == 2 and "CIFAR-10 not found" in result.output and "--data-dir" in result.output


@needs_shared
@needs_builtin
def test_attack_end_to_end_json(tmp_path):
    out = tmp_path / "bim"
    result = run("attack", "--model", "cifar10-cnn", "--attack", "bim", "--eps", "8/255", "--n", "32",
                 "--batch-size", "16", "--data-dir", str(SHARED_DATA), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("clean_accuracy", "adversarial_accuracy", "success_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert report["clean_accuracy"] >= 0.7 and report["success_rate"] >= 0.8
    data = load_attack_set(out)
    assert data.clean.shape == data.adv.shape == (32, 3, 32, 32)
    assert (data.adv - data.clean).abs().max() <= 8 / 255 + 1e-6
    assert data.manifest["metrics"]["success_rate"] == pytest.approx(report["success_rate"])
    # rerunning the same job reuses the finished shards and reports the same numbers
    again = run("attack", "--model", "cifar10-cnn", "--attack", "bim", "--eps", "8/255", "--n", "32",
                "--batch-size", "16", "--data-dir", str(SHARED_DATA), "--out", str(out), "--json")
    assert json.loads(again.stdout.strip().splitlines()[-1])["success_rate"] == report["success_rate"]
    # a different job into the same folder is refused instead of mixed
    other = run("attack", "--attack", "fgsm", "--n", "32", "--data-dir", str(SHARED_DATA), "--out", str(out))
    assert other.exit_code == 2 and "different job" in other.output


def test_attack_with_user_model_file_and_image_folder(tmp_path):
    import torch

    from .conftest import make_tiny_model
    from .test_data import make_folder

    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(make_tiny_model().net.eval(), torch.rand(1, 3, 16, 16)), str(path))
    folder = make_folder(tmp_path / "imgs", classes=[f"c{i}" for i in range(10)], per_class=2, size=(20, 20))
    out = tmp_path / "set"
    result = run("attack", "--model", str(path), "--mean", "0.5", "--std", "0.25", "--input-size", "16",
                 "--data", str(folder), "--attack", "fgsm", "--n", "8", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert load_attack_set(out).clean.shape == (8, 3, 16, 16)  # resized to the model's input size
    bad = run("attack", "--model", str(path), "--mean", "a,b", "--std", "0.25", "--input-size", "16",
              "--data", str(folder), "--out", str(tmp_path / "o2"))
    assert bad.exit_code == 2 and "bad --mean 'a,b'" in bad.output
