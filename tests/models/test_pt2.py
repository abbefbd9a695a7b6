"""Hostile ``.pt2`` archives: each hides a pickle (or native code) that torch.export.load would run.

Every archive is a real ``torch.export.save`` of a small model with one addition; the payload
creates a marker file when unpickled. advdetect must refuse each with exit code 2 and one line,
and the marker must never appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from advdetect.cli import main
from advdetect.errors import AdvDetectError
from advdetect.models import load_model
from advdetect.models.pt2 import vet_archive


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for any shell command)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def export_tiny(path: Path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    program = torch.export.export(net, (torch.zeros(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    Path(str(path) + ".json").write_text(json.dumps({"mean": [0.5], "std": [0.25], "input_size": [8, 8]}))
    return path


def tamper(src: Path, dst: Path, marker: Path, kind: str) -> Path:
    """Copy the archive ``src`` to ``dst`` with one hostile addition of ``kind``."""
    payload = pickle.dumps(Payload(str(marker)))
    zin = zipfile.ZipFile(src)
    root = zin.namelist()[0].split("/")[0]
    extra: dict[str, bytes] = {}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            rel = info.filename[len(root) + 1:]
            if rel == "data/constants/model_constants_config.json" and kind in ("opaque", "custom"):
                name = "opaque_obj_0" if kind == "opaque" else "custom_obj_0"
                config = json.loads(data)
                config["config"]["evil"] = {"path_name": name, "is_param": False, "use_pickle": True,
                                            "tensor_meta": None}
                data, extra[f"data/constants/{name}"] = json.dumps(config).encode(), payload
            if rel == "data/weights/model_weights_config.json" and kind == "pickled-weight":
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                data, extra[f"data/weights/{first['path_name']}"] = json.dumps(config).encode(), payload
            if rel == "data/sample_inputs/model.pt" and kind == "sample-inputs":
                data = payload
            if rel in extra:
                data = extra.pop(rel)
            zout.writestr(info.filename, data)
        if kind == "legacy-weights":
            extra["data/weights/model.pt"] = payload
        if kind == "aoti":
            extra["data/aotinductor/model/model.so"] = b"\x7fELF"
        for rel, data in extra.items():
            zout.writestr(f"{root}/{rel}", data)
    Path(str(dst) + ".json").write_text(Path(str(src) + ".json").read_text())
    return dst


@pytest.fixture(scope="module")
def clean_archive(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("pt2") / "model.pt2")


KINDS = ["opaque", "custom", "pickled-weight", "legacy-weights", "sample-inputs", "aoti"]


def test_the_opaque_archive_really_runs_code_in_plain_torch(clean_archive, tmp_path):
    """The attack is real: torch.export.load itself creates the marker (so the refusals below matter)."""
    marker = tmp_path / "PWNED"
    evil = tamper(clean_archive, tmp_path / "evil.pt2", marker, "opaque")
    code = f"import torch, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" \
           f"from test_pt2 import Payload\n" \
           f"try:\n    torch.export.load({str(evil)!r})\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300,
                   cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_archive_is_refused_and_nothing_runs(clean_archive, tmp_path, kind):
    marker = tmp_path / "PWNED"
    evil = tamper(clean_archive, tmp_path / f"{kind}.pt2", marker, kind)
    with pytest.raises(AdvDetectError, match="refused"):
        vet_archive(evil)
    with pytest.raises(AdvDetectError, match="refused"):
        load_model(str(evil))
    assert not marker.exists()


def test_cli_refuses_opaque_archive_with_exit_2(clean_archive, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tamper(clean_archive, tmp_path / "evil.pt2", marker, "opaque")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (120, 30, 200)).save(image)
    result = CliRunner().invoke(main, ["explain", str(image), "--model", str(evil), "--iterations", "2"])
    assert result.exit_code == 2, result.output
    assert "opaque" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_plain_export_loads_and_predicts(clean_archive):
    vet_archive(clean_archive)
    model = load_model(str(clean_archive))
    assert model(torch.rand(3, 3, 8, 8)).shape == (3, 10)


def test_sample_inputs_that_load_safely_pass(clean_archive):
    """The vetting runs the same weights_only load torch tries first, so a clean archive's inputs pass."""
    with zipfile.ZipFile(clean_archive) as z:
        name = next(n for n in z.namelist() if n.endswith("sample_inputs/model.pt"))
        torch.load(io.BytesIO(z.read(name)), weights_only=True)
