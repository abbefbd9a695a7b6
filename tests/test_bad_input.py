"""Bad input never crashes: one line on stderr naming the problem, exit code 2, nothing half-written.

Each case builds its own broken input in a temporary directory, runs the real command line
in-process and checks the exit code, that stderr is exactly one line without a traceback,
and that the line names the problem.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from advdetect.cli import main

from .conftest import BUILTIN_WEIGHTS, SHARED_DATA, make_tiny_model, needs_builtin, needs_shared

pytestmark = needs_builtin


@pytest.fixture(scope="module")
def detector(quick_detector) -> Path:
    return quick_detector


def png(path: Path, mode: str = "RGB", size: tuple[int, int] = (32, 32), dtype=np.uint8) -> Path:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size, dtype=np.uint16)).save(path)
    elif mode == "F":
        Image.fromarray(rng.random(size, dtype=np.float32), mode="F").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A tiny file that claims to be 20000 x 20000 (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def truncated(path: Path, fmt: str) -> Path:
    full = path.with_suffix(".full")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, format=fmt)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def nan_tiff(path: Path) -> Path:
    arr = np.zeros((32, 32), dtype=np.float32)
    arr[3, 4] = np.nan
    Image.fromarray(arr, mode="F").save(path, format="TIFF")
    return path


def tiny_model_file(tmp: Path, name: str = "tiny.pt") -> Path:
    path = tmp / name
    torch.jit.save(torch.jit.trace(make_tiny_model().net.eval(), torch.rand(1, 3, 16, 16)), str(path))
    return path


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("no images here")
    return path


def tampered_detector(tmp: Path, detector: Path, how: str) -> Path:
    out = tmp / "det"
    out.mkdir()
    for f in detector.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    if how == "weights":
        data = bytearray((out / "detector.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (out / "detector.safetensors").write_bytes(bytes(data))
    elif how == "json":
        (out / "detector.json").write_text('{"format": "advdetect.detector/1", "classifier": ')
    elif how == "field":
        meta = json.loads((out / "detector.json").read_text())
        del meta["threshold"]
        (out / "detector.json").write_text(json.dumps(meta))
    elif how == "traversal":
        meta = json.loads((out / "detector.json").read_text())
        meta["weights"] = "../../etc/passwd"
        (out / "detector.json").write_text(json.dumps(meta))
    elif how == "other-classifier":
        meta = json.loads((out / "detector.json").read_text())
        meta["classifier"]["sha256"] = "0" * 64
        (out / "detector.json").write_text(json.dumps(meta))
    return out


def tampered_builtin(tmp: Path) -> Path:
    out = tmp / "models"
    out.mkdir()
    for f in BUILTIN_WEIGHTS.parent.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    weights = out / BUILTIN_WEIGHTS.name
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return out


def not_writable(tmp: Path) -> Path:
    """A directory this process cannot create files in (root ignores modes, so use /sys there)."""
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        if not Path("/sys").is_dir():
            pytest.skip("running as root and no read-only /sys to write into")
        return Path("/sys/advdetect-test-out")
    return ro / "out"


# Each case: (id, args builder(tmp, detector) -> argv, expected code, substring of the one stderr line)
Case = tuple[str, Callable[[Path, Path], list[str]], int, str]

CASES: list[Case] = [
    ("missing-image", lambda t, d: ["detect", str(t / "nope.png"), "--detector", str(d)], 2, "no such file"),
    ("folder-without-images", lambda t, d: ["detect", str(_empty_dir(t / "empty")), "--detector", str(d)], 2,
     "folder holds no images"),
    ("empty-file", lambda t, d: ["detect", str(_touch(t / "e.png")), "--detector", str(d)], 2, "empty (0 bytes)"),
    ("not-an-image", lambda t, d: ["detect", str(_text(t / "x.png")), "--detector", str(d)], 2, "not a readable image"),
    ("truncated-png", lambda t, d: ["detect", str(truncated(t / "t.png", "PNG")), "--detector", str(d)], 2,
     "corrupt or truncated"),
    ("truncated-jpeg", lambda t, d: ["detect", str(truncated(t / "t.jpg", "JPEG")), "--detector", str(d)], 2,
     "corrupt or truncated"),
    ("decompression-bomb", lambda t, d: ["detect", str(huge_png(t / "bomb.png")), "--detector", str(d)], 2,
     "pixel limit"),
    ("image-over-pixel-limit", lambda t, d: ["detect", str(huge_png(t / "big.png", 9000, 9000)), "--detector",
                                             str(d)], 2, "9000x9000, over the 64,000,000-pixel limit"),
    ("nan-pixels", lambda t, d: ["detect", str(nan_tiff(t / "nan.tiff")), "--detector", str(d)], 2,
     "NaN or infinite"),
    ("missing-detector", lambda t, d: ["detect", str(png(t / "a.png")), "--detector", str(t / "none")], 2,
     "not a detector"),
    ("detector-for-other-classifier", lambda t, d: ["detect", str(png(t / "a.png")), "--detector",
                                                    str(tampered_detector(t, d, "other-classifier"))], 2,
     "was built for classifier"),
    ("tampered-detector-weights", lambda t, d: ["detect", str(png(t / "a.png")), "--detector",
                                                str(tampered_detector(t, d, "weights"))], 2, "checksum mismatch"),
    ("corrupt-detector-json", lambda t, d: ["detect", str(png(t / "a.png")), "--detector",
                                            str(tampered_detector(t, d, "json"))], 2, "not valid JSON"),
    ("detector-json-missing-field", lambda t, d: ["detect", str(png(t / "a.png")), "--detector",
                                                  str(tampered_detector(t, d, "field"))], 2,
     "'threshold' is missing or malformed"),
    ("detector-weights-path-traversal", lambda t, d: ["recover", str(png(t / "a.png")), "--detector",
                                                      str(tampered_detector(t, d, "traversal"))], 2,
     "must be a file beside it"),
    ("unknown-model", lambda t, d: ["detect", str(png(t / "a.png")), "--detector", str(d), "--model", "resnet9000"], 2,
     "unknown model 'resnet9000'"),
    ("unknown-attack", lambda t, d: ["attack", "--attack", "fgsx", "--out", str(t / "o")], 2, "unknown attack 'fgsx'"),
    ("eps-division-by-zero", lambda t, d: ["attack", "--eps", "8/0", "--out", str(t / "o")], 2, "bad epsilon '8/0'"),
    ("eps-negative", lambda t, d: ["attack", "--eps", "-1", "--out", str(t / "o")], 2, "bad epsilon '-1'"),
    ("eps-not-a-number", lambda t, d: ["attack", "--eps", "abc", "--out", str(t / "o")], 2, "bad epsilon 'abc'"),
    ("n-zero", lambda t, d: ["attack", "--n", "0", "--out", str(t / "o")], 2, "Invalid value for '--n'"),
    ("unknown-option", lambda t, d: ["detect", "--frobnicate", "x.png"], 2, "No such option '--frobnicate'"),
    ("masks-on-non-attack-set", lambda t, d: ["masks", "--in", str(t)], 2, "not an attack set"),
    ("explain-unknown-class", lambda t, d: ["explain", str(png(t / "a.png")), "--target", "unicorn"], 2,
     "unicorn"),
    ("pickled-model-file", lambda t, d: ["explain", str(png(t / "a.png")), "--model", str(_pickle(t / "m.pt")),
                                         "--mean", "0.5", "--std", "0.25", "--input-size", "16"], 2,
     "does not unpickle"),
    ("tampered-model-file", lambda t, d: ["explain", str(png(t / "a.png")), "--model", str(_tampered_pt(t))], 2,
     "checksum mismatch"),
    ("model-cannot-take-size", lambda t, d: ["explain", str(png(t / "a.png")), "--model", str(tiny_model_file(t)),
                                             "--mean", "0.5", "--std", "0.25", "--input-size", "8"], 2,
     "model fails on a 1x3x8x8 or 1x1x8x8 input"),
    ("model-cannot-take-channels", lambda t, d: ["explain", str(png(t / "a.png")), "--model",
                                                 str(tiny_model_file(t)), "--mean", "0.5,0.5,0.5,0.5",
                                                 "--std", "0.25", "--input-size", "16"], 2,
     "channels must be 1 or 3, got 4"),
    ("figure-in-unwritable-dir", lambda t, d: ["explain", str(png(t / "a.png")), "--iterations", "5", "--out",
                                               str(not_writable(t) / "fig.png")], 2, "cannot write"),
    ("out-under-a-file", lambda t, d: ["explain", str(png(t / "a.png")), "--iterations", "5", "--out",
                                       str(_touch(t / "file") / "fig.png")], 2, "cannot write"),
]


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _text(path: Path) -> Path:
    path.write_text("this is not an image\n" * 10)
    return path


def _pickle(path: Path) -> Path:
    torch.save(make_tiny_model().net, str(path))  # a pickled module: must be refused, never executed
    return path


def _tampered_pt(tmp: Path) -> Path:
    from advdetect.storage import sha256_file

    path = tiny_model_file(tmp)
    (tmp / "tiny.pt.json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [16, 16],
                                                  "sha256": sha256_file(path)}))
    with open(path, "ab") as f:
        f.write(b"\0")
    return path


def invoke(argv: list[str]):
    return CliRunner().invoke(main, argv)


@pytest.mark.parametrize("name,build,code,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(tmp_path, detector, name, build, code, needle):
    before = _snapshot(tmp_path)
    argv = build(tmp_path, detector)
    made = _snapshot(tmp_path) - before  # inputs the case itself created
    result = invoke(argv)
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("advdetect: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert _snapshot(tmp_path) - before - made == set(), "the failed command left files behind"


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if os.access(p.parent, os.R_OK)}


def test_debug_shows_the_traceback(tmp_path, detector):
    result = invoke(["--debug", "detect", str(tmp_path / "nope.png"), "--detector", str(detector)])
    assert result.exit_code != 0 and result.exception is not None  # raised, not swallowed
    assert "no such file" in str(result.exception)


@pytest.mark.parametrize("mode,note", [("L", "converted grayscale to RGB"),
                                       ("RGBA", "dropped the alpha channel"),
                                       ("P", "converted palette image to RGB"),
                                       ("I;16", "16-bit"),
                                       ("F", "floating-point")])
def test_odd_modes_are_converted_and_reported(tmp_path, detector, mode, note):
    path = png(tmp_path / ("x.tiff" if mode == "F" else "x.png"), mode=mode, size=(40, 24))
    result = invoke(["detect", str(path), "--detector", str(detector), "--json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout.strip().splitlines()[-1])["notes"]  # JSON Lines: one object per image
    assert any(note in n for n in notes), notes
    assert any("resized from 24x40 to 32x32" in n for n in notes), notes


def test_tampered_builtin_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVDETECT_MODELS", str(tampered_builtin(tmp_path)))
    result = invoke(["explain", str(png(tmp_path / "a.png")), "--iterations", "5"])
    assert result.exit_code == 2 and "checksum mismatch" in result.stderr, result.output


@needs_shared
def test_full_disk_leaves_no_partial_shard(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing a shard: one line, exit 2, finished shards kept, no partial file."""
    import safetensors.torch

    out = tmp_path / "set"
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def filling_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard: half a file, then the disk is full
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", filling_disk)
    args = ["attack", "--attack", "fgsm", "--n", "24", "--batch-size", "8", "--data-dir", str(SHARED_DATA),
            "--out", str(out)]
    result = invoke(args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("advdetect: error: ") and "No space left on device" in line
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "shard-00000.safetensors"], names  # no temp file, no partial shard
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    again = invoke(args + ["--json"])  # space is back: the rerun finishes from the kept shard
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["n"] == 24


def test_internal_error_is_exit_1_with_one_line(tmp_path, detector, monkeypatch):
    import advdetect.inference

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(advdetect.inference, "iter_detections", broken)
    result = invoke(["detect", str(png(tmp_path / "a.png")), "--detector", str(detector)])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("advdetect: internal error: RuntimeError: simulated bug "
                                     "(rerun with --debug for a traceback)")


@pytest.mark.parametrize("raised,code,start", [
    (ValueError("simulated bug"), 1, "advdetect: internal error: ValueError: simulated bug"),
    (OSError(errno.EACCES, "Permission denied", "/var/lib/advdetect-internal/cache"), 1,
     "advdetect: internal error: PermissionError"),
    (OSError(errno.ENOSPC, "No space left on device", "/var/lib/advdetect-internal/cache"), 2,
     "advdetect: error: No space left on device"),
    ("option", 2, "advdetect: error: n must be at least 8"),
    ("user-path", 2, "advdetect: error: Permission denied"),
])
def test_only_the_users_input_is_exit_2(tmp_path, monkeypatch, raised, code, start):
    """Exit 2: bad option values, OS errors on paths the user gave, a full disk. Everything else is a bug: exit 1."""
    import advdetect.evaluation.harness
    from advdetect.errors import OptionError

    out = tmp_path / "report"

    def fails(*args, **kwargs):
        if raised == "option":
            raise OptionError("n must be at least 8 (it is split in halves), got 4")
        if raised == "user-path":
            raise OSError(errno.EACCES, "Permission denied", str(out / "report.html"))
        raise raised

    monkeypatch.setattr(advdetect.evaluation.harness, "run_evaluation", fails)
    result = invoke(["evaluate", "--detector", str(tmp_path), "--out", str(out)])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), lines
