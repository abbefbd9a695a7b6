"""Adversarial attacks: a registry of canonical names over torchattacks.

========  ==========================================  =====================================
name      method                                      defaults
========  ==========================================  =====================================
fgsm      Fast Gradient Sign Method (Goodfellow 2015)  eps 8/255
bim       Basic Iterative Method / iterative FGSM      eps 8/255, alpha 2/255, steps 10
pgd       PGD with random start (Madry 2018)           eps 8/255, alpha 2/255, steps 10
mifgsm    Momentum iterative FGSM (Dong 2018)          eps 8/255, alpha 2/255, steps 10
ll-bim    iterative least-likely class (Kurakin 2017)  eps 8/255, alpha 2/255, steps 10
cw        Carlini-Wagner L2 (unbounded L-inf)          c 1, kappa 0, steps 50, lr 0.01
deepfool  DeepFool (minimal L2, unbounded L-inf)       steps 50, overshoot 0.02
========  ==========================================  =====================================

Every attack takes and returns images in [0, 1]; the model wrapper normalizes. DeepFool is
:class:`~advdetect.deepfool.BatchedDeepFool` (torchattacks' steps, all images of a batch at once);
the others are torchattacks'.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch
from torch import nn

from .deepfool import BatchedDeepFool
from .device import seeded
from .errors import AdvDetectError, OptionError, UnknownNameError
from .models.wrapper import frozen

ATTACKS = ("fgsm", "bim", "pgd", "mifgsm", "ll-bim", "cw", "deepfool")
LINF_ATTACKS = ("fgsm", "bim", "pgd", "mifgsm", "ll-bim")
# what `advdetect train` fits one detector on, and `evaluate` reports, unless told otherwise
DETECTOR_ATTACKS = ("fgsm", "bim", "pgd", "mifgsm", "cw", "deepfool")
DEFAULT_EPS = 8 / 255
DEFAULT_ALPHA = 2 / 255
DEFAULT_STEPS = {"bim": 10, "pgd": 10, "mifgsm": 10, "ll-bim": 10, "cw": 50, "deepfool": 50}


def parse_eps(text: str | float) -> float:
    """Parse an epsilon such as ``"8/255"``, ``"0.03"`` or ``0.03`` into a float in (0, 1]."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        try:
            value = float(Fraction(str(text).strip()))
        except (ValueError, ZeroDivisionError) as exc:
            raise AdvDetectError(f"bad epsilon {text!r}: use a number in (0, 1] or a fraction such as 8/255") from exc
    if not 0 < value <= 1:
        raise AdvDetectError(f"bad epsilon {text!r}: it must lie in (0, 1] (pixels are in [0, 1]); e.g. 8/255")
    return value


@dataclass(frozen=True)
class AttackConfig:
    """An attack by canonical name with its parameters (None means the documented default)."""

    name: str
    eps: float = DEFAULT_EPS
    alpha: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise UnknownNameError("attack", self.name, list(ATTACKS))
        if self.steps is not None and self.steps < 1:
            raise OptionError(f"steps must be at least 1, got {self.steps}")
        if self.alpha is not None and self.alpha <= 0:
            raise OptionError(f"alpha must be positive, got {self.alpha}")

    @property
    def resolved_steps(self) -> int | None:
        return self.steps if self.steps is not None else DEFAULT_STEPS.get(self.name)

    @property
    def resolved_alpha(self) -> float | None:
        if self.name in ("fgsm", "cw", "deepfool"):
            return None
        return self.alpha if self.alpha is not None else DEFAULT_ALPHA

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alpha"], d["steps"] = self.resolved_alpha, self.resolved_steps
        return d


def build_attack(model: nn.Module, config: AttackConfig, device: torch.device | str | None = None):
    """The attack object (torchattacks' interface) for ``config`` on ``model`` (which takes [0, 1] images), on ``device``.

    torchattacks finds the device from the model's parameters and prints to stdout when it has
    none (an exported program keeps its weights outside the module tree); that print would break
    ``--json`` output, so it is swallowed and the device set explicitly.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        attack = _torchattack(model, config)
    if device is not None:
        attack.set_device(torch.device(device))
    return attack


def _torchattack(model: nn.Module, config: AttackConfig):
    import torchattacks

    name, eps, alpha, steps = config.name, config.eps, config.resolved_alpha, config.resolved_steps
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=eps)
    if name in ("bim", "ll-bim"):
        attack = torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps)
        if name == "ll-bim":
            attack.set_mode_targeted_least_likely(kth_min=1, quiet=True)
        return attack
    if name == "pgd":
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    if name == "mifgsm":
        return torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=steps)
    if name == "cw":
        return torchattacks.CW(model, c=1, kappa=0, steps=steps, lr=0.01)
    return BatchedDeepFool(model, steps=steps, overshoot=0.02)


def attack_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: AttackConfig,
                 seed: int | None = None) -> torch.Tensor:
    """Adversarial versions of ``images`` (float [0, 1], on the model's device).

    The model is used frozen in eval mode and left exactly as it was; ``seed`` seeds the attack's
    randomness (PGD's random start) without touching the caller's random state.
    """
    with frozen(model), (seeded(seed, images.device) if seed is not None else contextlib.nullcontext()):
        attack = build_attack(model, config, images.device)
        adv = attack(images, labels)
    if config.name in LINF_ATTACKS:  # guard against float drift past the budget
        adv = torch.min(torch.max(adv, images - config.eps), images + config.eps)
    return adv.clamp(0, 1).detach()
