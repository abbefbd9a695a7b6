"""Resolve a model spec to a :class:`ModelWrapper`.

Specs:

* ``cifar10-cnn`` - the built-in classifier shipped under ``data/models``;
* ``torchvision:NAME`` or ``torchvision:NAME:WEIGHTS`` - any torchvision classification model
  (ImageNet normalization; without named weights, the same seeded random initialization every
  time, identified by its sha256);
* a path to a ``torch.export`` program (``.pt2``) or a TorchScript file (``.pt``/``.pth``),
  with normalization and input size from options or a JSON file beside it (``model.pt2.json``
  or ``model.json``).

Nothing is unpickled: the built-in weights are safetensors; a ``.pt2`` archive is vetted entry
by entry before torch reads it (see :mod:`advdetect.models.pt2`); a ``.pt`` is read only as
TorchScript, whose loader builds tensors and TorchScript code, never Python objects.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import seeded
from ..errors import AdvDetectError, UnknownNameError
from ..storage import load_tensors, read_json, sha256_file
from .cifar_cnn import CifarCNN
from .pt2 import load_program
from .wrapper import ModelInfo, ModelWrapper, as_tuple, same_classifier

BUILTIN_MODELS = ("cifar10-cnn",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHITECTURES = {"CifarCNN": CifarCNN}
MODEL_FILE_SUFFIXES = (".pt2", ".pt", ".pth")


def models_dir() -> Path:
    """Where built-in weights live: ``$ADVDETECT_MODELS``, the source checkout's data/models, or,
    in an installed wheel, the package data ``advdetect/builtin_models`` (the same files)."""
    env = os.environ.get("ADVDETECT_MODELS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "data" / "models"
    return checkout if checkout.is_dir() else package / "builtin_models"


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    channels: int | None = None,
) -> ModelWrapper:
    """Load a classifier by spec (see module doc), in eval mode on ``device``.

    For a model file, ``mean``/``std``/``input_size``/``classes``/``channels`` override its JSON
    sidecar (``channels`` defaults to the length of ``mean``, else the one of 3 and 1 it accepts)."""
    if spec in BUILTIN_MODELS:
        model = _load_builtin(spec)
    elif spec.startswith("torchvision:"):
        model = _load_torchvision(spec)
    elif Path(spec).suffix in MODEL_FILE_SUFFIXES:
        model = _load_file(Path(spec), mean, std, input_size, classes, channels)
    else:
        raise UnknownNameError("model", spec, [*BUILTIN_MODELS, "torchvision:<name>[:<weights>]", "<file>.pt2", "<file>.pt"])
    return model.to(device).eval()


def resolve_model(model: str | ModelWrapper, device: str = "auto") -> ModelWrapper:
    """A loaded model: ``model`` itself, or the spec loaded on ``device`` (auto: CUDA if any)."""
    from ..device import resolve_device

    if isinstance(model, ModelWrapper):
        return model
    return load_model(model, device=resolve_device(device))


def load_recorded_model(identity: dict[str, Any], device: str = "auto", where: str = "") -> ModelWrapper:
    """The classifier a detector or a stored set recorded (``ModelInfo.identity()``), checked to be the same.

    A model file is loaded from its recorded absolute path with its recorded normalization, and
    refused if its sha256 changed since. ``where`` names the record, for messages.
    """
    from ..device import resolve_device

    name = str(identity.get("name", ""))
    is_file = Path(name).suffix in MODEL_FILE_SUFFIXES
    if is_file and not Path(name).is_file():
        raise AdvDetectError(f"model file {name} recorded in {where or 'the record'} is missing; pass --model "
                             "with the model's current location")
    model = load_model(name, device=resolve_device(device), mean=identity.get("mean") if is_file else None,
                       std=identity.get("std") if is_file else None,
                       input_size=identity.get("input_size") if is_file else None,
                       channels=len(identity["mean"]) if is_file and isinstance(identity.get("mean"), list) else None)
    check_same_classifier(identity, model.info.identity(), where)
    return model


def check_same_classifier(recorded: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise :class:`AdvDetectError` unless ``current`` is the classifier ``recorded`` in ``where``."""
    if same_classifier(recorded, current):
        return
    if recorded.get("name") == current.get("name") and recorded.get("sha256") != current.get("sha256"):
        raise AdvDetectError(f"{where} was built for classifier {recorded.get('name')} (sha256 "
                             f"{str(recorded.get('sha256'))[:12]}), whose weights changed since (now sha256 "
                             f"{str(current.get('sha256'))[:12]}); restore them or start again")
    raise AdvDetectError(f"{where} was built for classifier {recorded.get('name')} (sha256 "
                         f"{str(recorded.get('sha256'))[:12]}), not {current.get('name')} (sha256 "
                         f"{str(current.get('sha256'))[:12]}); use --model {recorded.get('name')} or start again")


def _load_builtin(name: str) -> ModelWrapper:
    directory = models_dir()
    meta_path = directory / f"{name}.json"
    if not meta_path.is_file():
        raise AdvDetectError(
            f"built-in model {name} is missing ({meta_path}); train it with scripts/train_classifier.py"
        )
    meta = read_json(meta_path)
    arch = ARCHITECTURES.get(meta.get("architecture", ""))
    if arch is None:
        raise AdvDetectError(f"{meta_path}: unknown architecture {meta.get('architecture')!r}")
    state = load_tensors(directory / meta["weights"], sha256=meta["sha256"])
    net = arch(**meta.get("arch_args", {}), num_classes=len(meta["classes"]))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise AdvDetectError(f"{directory / meta['weights']}: weights do not fit {meta['architecture']} ({exc})") from exc
    info = ModelInfo(name, tuple(meta["classes"]), tuple(meta["input_size"]), tuple(meta["mean"]),
                     tuple(meta["std"]), meta["sha256"], {"test_accuracy": meta.get("test_accuracy")})
    return ModelWrapper(net, info)


def _load_torchvision(spec: str) -> ModelWrapper:
    import torchvision

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise AdvDetectError(f"bad model spec {spec!r}; use torchvision:<name> or torchvision:<name>:<weights>")
    name, weights_name = parts[1], (parts[2] if len(parts) == 3 else None)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UnknownNameError("torchvision model", name, sorted(available))
    weights = None
    if weights_name:
        try:
            weights = torchvision.models.get_weight(f"{torchvision.models.get_model_weights(name).__name__}.{weights_name}")
        except (ValueError, AttributeError, KeyError) as exc:
            choices = [w.name for w in torchvision.models.get_model_weights(name)]
            raise UnknownNameError(f"weights for {name}", weights_name, choices) from exc
    try:
        with seeded(0):  # without weights: the same random initialization every time (identity below)
            net = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as exc:
        raise AdvDetectError(f"could not get weights {weights_name} for {name}: {exc}") from exc
    categories = weights.meta.get("categories") if weights is not None else None
    num = net.fc.out_features if hasattr(net, "fc") and isinstance(net.fc, nn.Linear) else 1000
    classes = tuple(categories) if categories else tuple(f"class_{i}" for i in range(num))
    info = ModelInfo(f"torchvision:{name}" + (f":{weights_name}" if weights_name else ""), classes, (224, 224),
                     IMAGENET_MEAN, IMAGENET_STD, weights_name or f"random-init:{state_sha256(net)}")
    return ModelWrapper(net, info)


def state_sha256(net: nn.Module) -> str:
    """sha256 over a network's parameters and buffers (names, shapes and bytes), in order."""
    digest = hashlib.sha256()
    for key, value in net.state_dict().items():
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_file(path: Path, mean, std, input_size, classes, channels) -> ModelWrapper:
    if not path.is_file():
        raise AdvDetectError(f"model file {path}: no such file")
    meta = _sidecar_metadata(path)
    expected = meta.get("sha256")
    if expected is not None and sha256_file(path) != expected:
        raise AdvDetectError(f"{path}: checksum mismatch with the sha256 in its JSON sidecar (file corrupted or "
                             "modified); restore the file or update the sidecar")
    mean = mean if mean is not None else meta.get("mean")
    std = std if std is not None else meta.get("std")
    input_size = input_size if input_size is not None else meta.get("input_size")
    channels = channels if channels is not None else meta.get("channels")
    if mean is None or std is None or input_size is None:
        raise AdvDetectError(
            f"{path}: pass --mean, --std and --input-size (or put them in {path}.json) so inputs in [0, 1] can be normalized"
        )
    net = _read_program(path)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise AdvDetectError(f"{path}: input size must be H,W (or one number), got {input_size}")
    if channels is None and isinstance(mean, (list, tuple)) and len(mean) > 1:
        channels = len(mean)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise AdvDetectError(f"{path}: channels must be 1 or 3, got {channels!r}")
    out, channels = _probe(net, path, size, [channels] if channels else [3, 1])
    num = int(out.shape[-1])
    classes = tuple(classes or meta.get("classes") or (f"class_{i}" for i in range(num)))
    if len(classes) != num:
        raise AdvDetectError(f"{path}: model has {num} outputs but {len(classes)} class names were given")
    info = ModelInfo(str(path.resolve()), classes, size, as_tuple(mean, channels, "mean"), as_tuple(std, channels, "std"),
                     sha256_file(path))
    return ModelWrapper(net, info)


def _probe(net: nn.Module, path: Path, size: tuple[int, ...], channel_options: list[int]) -> tuple[torch.Tensor, int]:
    """The model's output on one zero image, for the first channel count it accepts; checked to take
    batches of other sizes too."""
    failure, hint = "", " (export it with a dynamic batch dimension)" if path.suffix == ".pt2" else ""
    for channels in channel_options:
        try:
            out = _forward(net, torch.zeros(1, channels, *size))
        except Exception as exc:  # noqa: BLE001 - any failure of foreign code is a user-facing error
            failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        if out.dim() != 2 or out.shape[0] != 1:
            raise AdvDetectError(f"{path}: model returns shape {tuple(out.shape)} for one image; expected 1 x classes")
        try:
            _forward(net, torch.zeros(3, channels, *size))
        except Exception as exc:  # noqa: BLE001
            raise AdvDetectError(f"{path}: model fails on a batch of 3 images{hint}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        return out, channels
    tried = " or ".join(f"1x{c}x{size[0]}x{size[1]}" for c in channel_options)
    raise AdvDetectError(f"{path}: model fails on a {tried} input{hint}: {failure}")


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


class ExportedNet(nn.Module):
    """Holds a ``torch.export`` module, which refuses ``train()``/``eval()``.

    An exported program is already fixed in inference behaviour, so it is kept out of the
    module tree (mode switches don't reach it) while device moves still do.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        for p in inner.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "inner", inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's own signature
        self.inner._apply(fn)
        return super()._apply(fn, recurse)


def _sidecar_metadata(path: Path) -> dict[str, Any]:
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            meta = read_json(candidate)
            if not isinstance(meta, dict):
                raise AdvDetectError(f"{candidate}: expected a JSON object")
            return meta
    return {}


def _read_program(path: Path) -> nn.Module:
    if path.suffix == ".pt2":
        return ExportedNet(load_program(path))
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what many users have
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise AdvDetectError(
            f"{path}: not a TorchScript file ({type(exc).__name__}). advdetect does not unpickle arbitrary .pt files; "
            "save your model with torch.export.save (.pt2) or torch.jit.save"
        ) from exc
