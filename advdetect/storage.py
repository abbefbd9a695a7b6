"""Atomic, verifiable artifacts: safetensors shards plus a JSON manifest.

Nothing here unpickles: tensors are safetensors, everything else JSON. Every write goes to
a temporary file in the target directory, is flushed to the disk (``fsync``) and renamed into
place, and the directory is flushed after the rename, so neither a crash nor a power cut leaves
a half-written or empty file under the final name. A manifest lists each shard with its sha256, and
reading verifies it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .distributed import context
from .errors import AdvDetectError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success flush it to disk and rename it onto ``path``.

    The file is fsynced before the rename (else a power cut can leave the new name pointing at
    an empty file on file systems that reorder metadata before data) and the directory after it
    (else the rename itself can be lost).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise AdvDetectError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent, directory=True)
    except OSError as exc:
        raise AdvDetectError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


TMP_SUFFIX = ".tmp"


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) can't open directories; the file itself was flushed
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (directory and exc.errno in (errno.EINVAL, errno.EBADF)):  # directory fsync unsupported here
            raise
    finally:
        os.close(fd)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_stale_temp(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed process of this host left in ``directory``.

    Temporary names carry ``<host>-<pid>``; files of live processes (another rank still
    writing) and of other hosts are left alone. Returns what was removed.
    """
    directory = Path(directory)
    host = socket.gethostname()
    removed = []
    mine = re.compile(rf"\.{re.escape(host)}-(\d+)\.[^.]*{re.escape(TMP_SUFFIX)}$")
    for tmp in directory.glob(f".*{TMP_SUFFIX}") if directory.is_dir() else []:
        match = mine.search(tmp.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AdvDetectError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdvDetectError(f"{path}: not valid JSON ({exc})") from exc


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors as safetensors atomically; return the file's sha256."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


def load_tensors(path: str | os.PathLike, sha256: str | None = None,
                 names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (only the tensors ``names``, if given), verifying its sha256 when given."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdvDetectError(f"{path}: no such file")
    if sha256 is not None and sha256_file(path) != sha256:
        raise AdvDetectError(f"{path}: checksum mismatch (file corrupted or modified); delete it and recompute")
    try:
        with safe_open(str(path), framework="pt") as f:
            available = list(f.keys())
            missing = [n for n in names or () if n not in available]
            if missing:
                raise AdvDetectError(f"{path}: holds no tensor {missing[0]!r}; the file is from another job")
            return {name: f.get_tensor(name) for name in (names or available)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdvDetectError(f"{path}: not a valid safetensors file ({exc})") from exc


KILL_AFTER_SHARDS = "ADVDETECT_KILL_AFTER_SHARDS"
_shards_written = 0


def _crash_point() -> None:
    """Test hook: with ``$ADVDETECT_KILL_AFTER_SHARDS=k`` the process SIGKILLs itself right after its
    k-th recorded shard, a deterministic point to test resuming at (no timing involved)."""
    global _shards_written
    limit = os.environ.get(KILL_AFTER_SHARDS)
    if not limit:
        return
    _shards_written += 1
    if _shards_written >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


class ShardStore:
    """A directory of numbered safetensors shards described by ``manifest.json``.

    ``put(i, tensors)`` writes shard ``i`` and records it (with its sha256) in the manifest
    immediately, so an interrupted job can ask ``has(i)`` and continue where it stopped.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "shard") -> None:
        self.directory = Path(directory)
        self.prefix = prefix

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        return read_json(self.manifest_path)

    def start(self, header: dict[str, Any]) -> dict[str, Any]:
        """Open the store for a job described by ``header``.

        A manifest from an identical job is kept (its finished shards are reused); a
        different job's manifest is an error rather than silently mixed results. Under
        torchrun, rank 0 prepares the directory while the others wait.
        """
        ctx = context()
        if ctx.is_main:
            remove_stale_temp(self.directory)
            existing = self.manifest()
            if not existing:
                existing = {"job": header, "shards": {}, "complete": False}
                write_json(self.manifest_path, existing)
        ctx.barrier()
        existing = self.manifest()
        if existing.get("job") != header:
            raise AdvDetectError(
                f"{self.directory} already holds results of a different job; use another --out or delete it"
            )
        return existing

    def _rank_manifest(self, rank: int) -> Path:
        return self.directory / f"manifest.rank{rank}.json"

    def _rank_entries(self) -> dict[str, Any]:
        """Shards recorded by ranks of a distributed run and not merged yet."""
        entries: dict[str, Any] = {}
        for path in sorted(self.directory.glob("manifest.rank*.json")):
            entries.update(read_json(path).get("shards", {}))
        return entries

    def shard_name(self, key: str) -> str:
        return f"{self.prefix}-{key}.safetensors"

    def has(self, key: str) -> bool:
        entry = self.manifest().get("shards", {}).get(key) or self._rank_entries().get(key)
        return bool(entry) and (self.directory / entry["file"]).is_file()

    def put(self, key: str, tensors: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
        """Write shard ``key`` and record it: in the manifest, or under torchrun in this rank's own file.

        ``extra``: JSON-able facts about the shard kept in its manifest entry (see :meth:`extras`)."""
        name = self.shard_name(key)
        digest = save_tensors(self.directory / name, tensors)
        entry = {"file": name, "sha256": digest, "n": int(next(iter(tensors.values())).shape[0]), **(extra or {})}
        ctx = context()
        path = self._rank_manifest(ctx.rank) if ctx.enabled else self.manifest_path
        record = read_json(path) if path.exists() else {"shards": {}}
        record.setdefault("shards", {})[key] = entry
        write_json(path, record)
        _crash_point()

    def sync(self) -> None:
        """After every rank's shards: rank 0 merges the ranks' records into the manifest.

        Also merges records left by an interrupted distributed run, so a later run of any
        size continues from them.
        """
        ctx = context()
        ctx.barrier()
        if ctx.is_main:
            pending = sorted(self.directory.glob("manifest.rank*.json"))
            if pending:
                manifest = self.manifest()
                manifest.setdefault("shards", {}).update(self._rank_entries())
                manifest["shards"] = dict(sorted(manifest["shards"].items()))
                write_json(self.manifest_path, manifest)
                for path in pending:
                    path.unlink()
        ctx.barrier()

    def get(self, key: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Shard ``key`` (checksum verified): all its tensors, or only ``names``."""
        entry = self.manifest()["shards"][key]
        if not isinstance(entry, dict) or Path(str(entry.get("file"))).name != entry.get("file"):
            raise AdvDetectError(f"{self.manifest_path}: bad entry for shard {key}; the manifest is damaged")
        return load_tensors(self.directory / entry["file"], sha256=entry["sha256"], names=names)

    def names(self, key: str) -> list[str]:
        """The tensor names shard ``key`` holds (read from its header only)."""
        from safetensors import SafetensorError, safe_open

        path = self.directory / self.manifest()["shards"][key]["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise AdvDetectError(f"{path}: not a valid safetensors file ({exc})") from exc

    def keys(self) -> list[str]:
        """The recorded shards, in order."""
        manifest = self.manifest()
        if not manifest.get("shards"):
            raise AdvDetectError(f"{self.directory}: no {MANIFEST} with shards; is this an advdetect output folder?")
        return sorted(manifest["shards"])

    def extras(self, name: str) -> list[Any]:
        """The ``extra[name]`` lists recorded with the shards (see :meth:`put`), concatenated in shard order."""
        entries = {**self.manifest().get("shards", {}), **self._rank_entries()}
        return [item for key in sorted(entries) for item in entries[key].get(name, [])]

    def iter_shards(self, names: list[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard in order (only ``names`` of it): one shard in memory at a time."""
        for key in self.keys():
            yield self.get(key, names)

    def finish(self, **fields: Any) -> dict[str, Any]:
        ctx = context()
        manifest = self.manifest()
        manifest.update(fields)
        manifest["complete"] = True
        if ctx.is_main:
            write_json(self.manifest_path, manifest)
        ctx.barrier()
        return manifest

    def load_all(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Concatenate every shard (in key order) into one dict of tensors (only ``keys``, if given)."""
        parts = list(self.iter_shards(keys))
        names = keys or list(parts[0])
        return {name: torch.cat([p[name] for p in parts]) for name in names}
