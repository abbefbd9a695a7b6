from __future__ import annotations

import pytest
import torch

from advdetect.errors import AdvDetectError
from advdetect.storage import ShardStore, load_tensors, read_json, save_tensors, write_json


def test_tensors_roundtrip_and_checksum(tmp_path):
    path = tmp_path / "t.safetensors"
    digest = save_tensors(path, {"a": torch.arange(4.0)})
    assert torch.equal(load_tensors(path, sha256=digest)["a"], torch.arange(4.0))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AdvDetectError, match="checksum mismatch"):
        load_tensors(path, sha256=digest)


def test_not_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(AdvDetectError, match="not a valid safetensors"):
        load_tensors(path)


def test_json_atomic_and_errors(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp files left behind
    (tmp_path / "b.json").write_text("{")
    with pytest.raises(AdvDetectError, match="not valid JSON"):
        read_json(tmp_path / "b.json")


def test_shard_store_resume_and_job_mismatch(tmp_path):
    store = ShardStore(tmp_path)
    store.start({"job": 1})
    store.put("00000", {"x": torch.zeros(2, 3)})
    assert store.has("00000") and not store.has("00001")
    store2 = ShardStore(tmp_path)
    store2.start({"job": 1})  # same job: keeps finished shards
    assert store2.has("00000")
    store2.put("00001", {"x": torch.ones(1, 3)})
    assert store2.load_all()["x"].shape == (3, 3)
    with pytest.raises(AdvDetectError, match="different job"):
        ShardStore(tmp_path).start({"job": 2})
