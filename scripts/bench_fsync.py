"""What flushing every artifact to disk (fsync of the file and its directory) costs.

    python scripts/bench_fsync.py              # about 20 seconds

Writes small JSON files (manifests) and shard-sized safetensors files through
``advdetect.storage`` with the flushes on, and again with them replaced by a no-op, and prints
one JSON line: milliseconds per write of each kind, both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect import storage  # noqa: E402


def timed(write, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        write(i)
    return 1000 * (time.perf_counter() - start) / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json-files", type=int, default=200)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--shard-mb", type=float, default=12.0, help="a 512-image 32x32 mask shard is about 4 MB, "
                                                                "a 256-image attack shard about 6 MB")
    args = p.parse_args()
    shard = {"x": torch.rand(int(args.shard_mb * 2**20 / 4))}
    result = {}
    real = storage._fsync
    for mode in ("fsync", "no_fsync"):
        storage._fsync = real if mode == "fsync" else (lambda path, directory=False: None)
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            result[f"json_ms_{mode}"] = round(timed(lambda i: storage.write_json(Path(tmp) / f"m{i % 8}.json",
                                                                                  {"i": i}), args.json_files), 3)
            result[f"shard_ms_{mode}"] = round(timed(lambda i: storage.save_tensors(Path(tmp) / f"s{i % 4}.st",
                                                                                     shard), args.shards), 2)
    storage._fsync = real
    result.update(shard_mb=args.shard_mb, where=str(Path(".").resolve()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
