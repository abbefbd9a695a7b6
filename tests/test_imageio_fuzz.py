"""Fuzz the image loader: whatever the bytes, it returns a valid image or raises AdvDetectError."""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from advdetect.errors import AdvDetectError
from advdetect.imageio import load_image

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]
MODES = ["RGB", "L", "RGBA", "P", "1", "I;16", "F", "CMYK", "LA"]


def encode(fmt: str, mode: str, w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32), mode="F")
    else:
        img = base.convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this format can't hold this mode: fall back to RGB
        buf = io.BytesIO()
        base.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "spliced", "random"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=2048))
    data = encode(draw(st.sampled_from(FORMATS)), draw(st.sampled_from(MODES)),
                  draw(st.integers(1, 48)), draw(st.integers(1, 48)), draw(st.integers(0, 1000)))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flipped":
        out = bytearray(data)
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            out[pos] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "spliced":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
    return data


@pytest.mark.parametrize("size", [None, (32, 32)])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=image_bytes(), suffix=st.sampled_from([".png", ".jpg", ".bin", ""]))
def test_loader_returns_an_image_or_a_clean_error(data, suffix, size):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loaded = load_image(path, size=size)
            assert not caught, [str(w.message) for w in caught]  # nothing printed behind the user's back
        except AdvDetectError as exc:
            message = str(exc)
            assert message and "\n" not in message and str(path) in message
            return
        pixels = loaded.pixels
        assert pixels.dtype == torch.uint8 and pixels.dim() == 3 and pixels.shape[0] == 3
        if size is not None:
            assert tuple(pixels.shape[1:]) == size
        assert all(isinstance(n, str) for n in loaded.notes)
