"""Reading a user's ``torch.export`` archive (``.pt2``) without unpickling anything.

``torch.export.load`` unpickles in several places: "opaque object" constants with plain
``pickle.loads``, TorchScript custom objects with torch's own unpickler, tensors flagged
``use_pickle`` and legacy ``.pt`` weight or constant files with ``weights_only=False``, and the
sample inputs with ``weights_only=True`` but falling back to ``weights_only=False`` when that
fails; an archive with an AOTInductor package even loads a compiled shared library. A crafted
``.pt2`` can therefore run code while it is being loaded.

:func:`vet_archive` reads the archive's entry list and its weights and constants configs with
torch's own archive reader (the same parser the loader uses) *before* the file is handed to
torch, and refuses anything outside what a plain ``torch.export.save`` of an ordinary model
writes: raw tensor payloads, the program's JSON, the configs, extra text files and sample inputs
that load with ``weights_only=True``. :func:`load_program` then loads through ``load_pt2``
directly, so torch's fallback to the legacy (pickled) format never runs either. Nothing is
swapped in torch for the duration (no process-global patching).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from ..errors import AdvDetectError

# entries a plain torch.export.save writes, relative to the archive's root folder
_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PATTERNS = (
    re.compile(r"models/[^/]+\.json"),
    re.compile(r"data/weights/[^/]+_weights_config\.json"),
    re.compile(r"data/weights/weight_\d+"),
    re.compile(r"data/constants/[^/]+_constants_config\.json"),
    re.compile(r"data/constants/tensor_\d+"),
    re.compile(r"data/sample_inputs/[^/]+\.pt"),
    re.compile(r"extra/[^/]+"),
)
_REFUSED = (  # what an entry is when it is not allowed, for the error message
    ("opaque_obj_", "an opaque Python object (a pickle)"),
    ("custom_obj_", "a TorchScript custom object (pickled)"),
    ("data/aotinductor/", "an AOTInductor package (compiled native code)"),
    (".pt", "a legacy pickled weights or constants file"),
)


def _refuse(path: Path, why: str) -> AdvDetectError:
    return AdvDetectError(f"{path}: refused: {why}; advdetect loads only archives a plain torch.export.save "
                          "of an ordinary model writes (re-export it)")


def _what(name: str) -> str:
    for marker, meaning in _REFUSED:
        if marker in name:
            return meaning
    return "an entry torch.export.save does not write"


def vet_archive(path: Path) -> None:
    """Raise :class:`AdvDetectError` unless the archive at ``path`` holds nothing that unpickles or runs code."""
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        with PT2ArchiveReader(str(path)) as reader:
            _vet_entries(path, reader)
    except AdvDetectError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad zip or a missing entry
        raise AdvDetectError(f"{path}: not a torch.export archive ({type(exc).__name__}: {exc})".splitlines()[0]) \
            from exc


def _vet_entries(path: Path, reader) -> None:
    names = list(reader.get_file_names())
    if len(set(names)) != len(names):
        raise _refuse(path, "duplicate entry names")
    for name in names:
        if name not in _FIXED and not any(p.fullmatch(name) for p in _PATTERNS):
            raise _refuse(path, f"entry {name!r} is {_what(name)}")
    programs = [n[len("models/"):-len(".json")] for n in names if n.startswith("models/")]
    if not programs:
        raise _refuse(path, "no exported program inside")
    for program in programs:
        for config_name, folder, prefix in (
                (f"data/weights/{program}_weights_config.json", "data/weights/", "weight_"),
                (f"data/constants/{program}_constants_config.json", "data/constants/", "tensor_")):
            if config_name in names:
                _check_payload_config(path, reader, config_name, folder, prefix, set(names))
        sample = f"data/sample_inputs/{program}.pt"
        if sample in names:
            _check_weights_only(path, reader.read_bytes(sample), sample)


def _check_payload_config(path: Path, reader, config_name: str, folder: str, prefix: str, names: set[str]) -> None:
    try:
        config = json.loads(reader.read_string(config_name))
        entries = config["config"]
        if not isinstance(entries, dict):
            raise TypeError("config is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"{config_name} is not a valid payload config ({exc})") from exc
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise _refuse(path, f"{config_name}: entry {fqn!r} is malformed")
        if meta.get("use_pickle"):
            raise _refuse(path, f"{config_name}: {fqn!r} is a pickled tensor (use_pickle), which torch reads with "
                                "weights_only=False")
        file = str(meta.get("path_name", ""))
        if not re.fullmatch(rf"{prefix}\d+", file) or folder + file not in names:
            raise _refuse(path, f"{config_name}: {fqn!r} points at {file!r}, {_what(file)}")


def _check_weights_only(path: Path, payload: bytes, name: str) -> None:
    """Torch reads sample inputs with weights_only=True and, if that fails, False: make sure True works."""
    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the safe unpickler raises many types
        raise _refuse(path, f"{name} does not load with weights_only=True ({type(exc).__name__})") from exc


def load_program(path: Path) -> torch.nn.Module:
    """The ``"model"`` program of a vetted ``.pt2`` archive as a module (see the module doc)."""
    from torch.export.pt2_archive._package import load_pt2

    vet_archive(path)
    try:
        contents = load_pt2(str(path))
        program = contents.exported_programs["model"]
    except KeyError as exc:
        raise AdvDetectError(f"{path}: the archive holds no program named 'model' (save it with "
                             "torch.export.save)") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad archives
        raise AdvDetectError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})"
                             .splitlines()[0]) from exc
    return program.module()
