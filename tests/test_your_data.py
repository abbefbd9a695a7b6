"""The whole pipeline on data that is not CIFAR-10: scikit-learn's digits as a PNG folder and a
1-channel CNN exported with torch.export (scripts/make_digits.py), run from other directories."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from advdetect.cli import main

from .conftest import REPO

DIGITS_MODEL = REPO / "data" / "digits" / "digits-cnn.pt2"
pytestmark = [pytest.mark.skipif(not DIGITS_MODEL.is_file(), reason="digits model not built (scripts/make_digits.py)"),
              pytest.mark.slow]
FAST = ["--iterations", "30"]


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def json_lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def _make_digits():
    spec = importlib.util.spec_from_file_location("make_digits", REPO / "scripts" / "make_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """``digits/`` (the PNG folder), ``digits.pt2`` + sidecar, and a detector trained from there in ``det/``."""
    root = tmp_path_factory.mktemp("digits-work")
    _make_digits().write_digits_folder(root / "digits")
    shutil.copy(DIGITS_MODEL, root / "digits.pt2")
    shutil.copy(DIGITS_MODEL.with_name(DIGITS_MODEL.name + ".json"), root / "digits.pt2.json")
    return root


@pytest.fixture(scope="module")
def trained(workspace) -> dict:
    import os

    cwd = os.getcwd()
    os.chdir(workspace)  # relative paths, as the README's command
    try:
        result = run("train", "--model", "digits.pt2", "--data", "digits/", "--out", "det/", "--attack", "bim",
                     "--n", "120", "--n-eval", "60", "--n-calibration", "60", "--fast-n", "120", "--fast-epochs", "3",
                     "--json", *FAST)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_on_digits_records_the_folder_and_its_split(workspace, trained):
    meta = json.loads((workspace / "det" / "detector.json").read_text())
    assert meta["classifier"]["name"] == str((workspace / "digits.pt2").resolve())
    assert meta["classifier"]["mean"] == [0.5]  # one channel
    assert meta["data"] == {"dataset": "folder", "path": str((workspace / "digits").resolve()), "classes_file": None,
                            "split_seed": 0, "test_fraction": 0.3}
    images = meta["images"]
    fit, cal, held = (set(images[k]["ids"]) for k in ("fit", "calibration", "held_out"))
    assert len(fit) == 120 and len(cal) == 60 and len(held) == 60
    assert not fit & cal and not fit & held and not cal & held
    bim = trained["metrics"]["bim"]
    assert bim["n_clean"] > 40 and bim["n_adversarial"] > 10  # the classifier works and the attack does
    assert 0 <= bim["roc_auc"] <= 1 and trained["mask_config"]["upsample"] == 2  # 32 px: the tuned settings


def test_evaluate_detect_and_recover_from_another_directory(workspace, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    det, digits = str(workspace / "det"), str(workspace / "digits")
    report = run("evaluate", "--detector", det, "--data", digits, "--out", "rep", "--n", "60", "--attacks", "fgsm",
                 "--eps", "8/255", "--baselines", "grad_cam,occlusion,raw_image", "--no-adaptive", "--json")
    assert report.exit_code == 0, report.output
    r = json.loads(report.stdout.strip().splitlines()[-1])
    assert r["data"]["path"] == str(Path(digits).resolve()) and "fgsm@8/255" in r["attacks"]
    assert (tmp_path / "rep" / "report.html").is_file()
    assert set(r["images"]["ids"]) == set(trained["images"]["held_out"]["ids"])  # the held-out images, recorded
    # baselines on 1-channel images; Grad-CAM can't see inside an exported program: left out, with a note
    assert r["baselines"]["methods"] == ["masks", "occlusion", "raw_image"]
    assert any("Grad-CAM left out" in note for note in r["baselines"]["notes"])
    # one image more than the held-out ones: the detector's calibration images are passed over, by content id
    again = run("evaluate", "--detector", det, "--out", "rep2", "--n", "61", "--attacks", "fgsm", "--eps", "8/255",
                "--baselines", "", "--no-adaptive", "--json")
    assert again.exit_code == 0, again.output
    ids = json.loads(again.stdout.strip().splitlines()[-1])["images"]
    assert set(ids["ids"]) > set(trained["images"]["held_out"]["ids"]) and len(ids["ids"]) == 61
    assert not set(ids["ids"]) & set(trained["images"]["calibration"]["ids"]) and ids["reserved_skipped"] == 60

    nested = tmp_path / "incoming" / "deeper"
    nested.mkdir(parents=True)
    for name in ("0/0000.png", "3/0003.png", "7/0007.png"):
        shutil.copy(Path(digits) / name, nested / name.replace("/", "-"))
    (tmp_path / "incoming" / "readme.txt").write_text("not an image")
    found = run("detect", "incoming", "--detector", det, "--json")
    assert found.exit_code == 0, found.output
    rows = json_lines(found)  # JSON Lines: one object per image
    assert [Path(r["image"]).name for r in rows] == ["0-0000.png", "3-0003.png", "7-0007.png"]
    assert all(set(r) >= {"label", "score", "adversarial"} for r in rows)
    assert [r["label"] for r in rows] == ["0", "3", "7"]
    recovered = run("recover", "incoming", "--detector", det, "--json", "--out", "figures")
    assert recovered.exit_code == 0, recovered.output
    assert len(json_lines(recovered)) == 3 and len(list((tmp_path / "figures").glob("*.png"))) == 3


def test_bad_files_in_a_folder_are_reported_and_the_rest_judged(workspace, trained, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(next((workspace / "digits" / "1").iterdir()), folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copy(next((workspace / "digits" / "2").iterdir()), folder / "c.png")
    result = run("detect", str(folder), "--detector", str(workspace / "det"), "--json")
    assert result.exit_code == 2  # judged the rest, then said something was wrong
    assert [Path(r["image"]).name for r in json_lines(result)] == ["a.png", "c.png"]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "b.png" in errors[0] and errors[0].startswith("advdetect: error: ")


def test_sidecar_that_disagrees_with_the_model_is_refused(workspace, tmp_path):
    shutil.copy(workspace / "digits.pt2", tmp_path / "m.pt2")
    sidecar = json.loads((workspace / "digits.pt2.json").read_text())
    cases = {"channels": (dict(sidecar, channels=3), "model fails on a 1x3x32x32 input"),
             "classes": (dict(sidecar, classes=["a", "b"]), "10 outputs but 2 class names"),
             "sha256": (dict(sidecar, sha256="0" * 64), "checksum mismatch")}
    for name, (meta, needle) in cases.items():
        (tmp_path / "m.pt2.json").write_text(json.dumps(meta))
        result = run("explain", str(next((workspace / "digits" / "4").iterdir())), "--model",
                     str(tmp_path / "m.pt2"), "--iterations", "2")
        assert result.exit_code == 2 and needle in result.output, (name, result.output)


def test_classes_that_do_not_match_the_model(workspace, tmp_path):
    folder = tmp_path / "letters"
    for name in ("a", "b", "c"):
        (folder / name).mkdir(parents=True)
        shutil.copy(next((workspace / "digits" / "1").iterdir()), folder / name / "x.png")
    result = run("attack", "--model", str(workspace / "digits.pt2"), "--data", str(folder), "--out",
                 str(tmp_path / "set"), "--attack", "fgsm", "--n", "3")
    assert result.exit_code == 2
    assert "3 class folders" in result.output and "10 classes; pass --classes" in result.output
