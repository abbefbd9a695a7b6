"""What ``advdetect evaluate`` runs: its settings and the attack sets of its sweep."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from ..attacks import DETECTOR_ATTACKS, LINF_ATTACKS, AttackConfig, parse_eps
from ..errors import OptionError, UnknownNameError
from ..masks.config import MASK_METHODS
from .heatmaps import HEATMAP_METHODS

ALL_ATTACKS = DETECTOR_ATTACKS


@dataclass
class EvaluateConfig:
    """What ``advdetect evaluate`` runs; every field is recorded in report.json."""

    attacks: tuple[str, ...] = ALL_ATTACKS
    eps: tuple[float, ...] = (4 / 255, 8 / 255)
    n: int = 1000
    n_baseline: int = 500
    baselines: tuple[str, ...] = HEATMAP_METHODS
    adaptive: bool = True
    adaptive_n: int = 100
    adaptive_eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255)
    adaptive_steps: int = 40
    adaptive_restarts: int = 1
    # (lam, kappa) of each attacker run, in turn, each keeping the best images so far: on the fast path + margin
    # the detector-term weight 1 alone fooled 24% of images at 2/255, then 0.3 after it 96%; against the margin
    # combination with blur shifts 22%, 58%, then 0.1 after them 100% (README, margin section)
    adaptive_settings: tuple[tuple[float, float], ...] = ((1.0, 2.0), (0.3, 2.0), (0.1, 2.0))
    # multi-targeted runs after each setting's untargeted one: the classes ranked next on the clean image
    adaptive_targets: int = 0
    # after the surrogate's runs, runs that differentiate the real mask optimisation through this many unrolled
    # steps (evaluation/unrolled.py; 0: off). Each PGD step then costs a warm-started optimisation (several seconds
    # per 100 images on a 2-core CPU), so it is opt-in
    adaptive_unroll: int = 0
    gallery: int = 6
    methods: tuple[str, ...] = ()  # mask methods to compare with the detector's (extremal, robust)
    n_methods: int = 200
    seed: int = 0
    batch_size: int = 256
    shard_size: int = 512

    def __post_init__(self) -> None:
        for name in self.attacks:
            AttackConfig(name)  # unknown names -> UnknownNameError with the choices
        for name in self.baselines:
            if name not in HEATMAP_METHODS:
                raise UnknownNameError("baseline", name, list(HEATMAP_METHODS))
        if not self.attacks:
            raise OptionError("give at least one attack")
        if not self.eps:
            raise OptionError("give at least one eps")
        if self.n < 8:
            raise OptionError(f"n must be at least 8 (it is split in halves), got {self.n}")
        for name in self.methods:
            if name not in MASK_METHODS:
                raise UnknownNameError("mask method", name, list(MASK_METHODS))
        if not self.adaptive_settings or any(len(s) != 2 or min(s) < 0 for s in self.adaptive_settings):
            raise OptionError("adaptive_settings: give at least one (lam, kappa) pair, both >= 0")
        if self.adaptive_targets < 0:
            raise OptionError(f"adaptive_targets: the number of classes the multi-targeted runs aim for (0: untargeted "
                              f"only), got {self.adaptive_targets}")
        if self.adaptive_unroll < 0:
            raise OptionError(f"adaptive_unroll: unrolled steps of the mask optimisation (0: off), got "
                              f"{self.adaptive_unroll}")
        if self.n_baseline > self.n or self.n_methods > self.n or self.adaptive_n > self.n // 2:
            raise OptionError("n_baseline and n_methods must be <= n and adaptive_n <= n / 2 (the adaptive attack "
                             "uses the evaluation half)")

    @property
    def main_eps(self) -> float:
        return max(self.eps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_settings(text: str) -> tuple[tuple[float, float], ...]:
    """``"1:2,0.3:2"`` -> ((1.0, 2.0), (0.3, 2.0)): the adaptive attacker's (lam, kappa) runs."""
    try:
        pairs = tuple((float(a), float(b)) for a, b in (item.split(":") for item in text.split(",") if item.strip()))
    except ValueError:
        raise OptionError(f"adaptive settings look like 1:2,0.3:2 (lam:kappa pairs), got {text!r}") from None
    if not pairs or any(min(p) < 0 for p in pairs):
        raise OptionError(f"adaptive settings need at least one lam:kappa pair, both >= 0, got {text!r}")
    return pairs


def eps_tag(eps: float) -> str:
    """8/255 -> '8/255' (a multiple of 1/255 reads as one), else the float."""
    frac = Fraction(eps).limit_denominator(255)
    return f"{frac.numerator}/{frac.denominator}" if frac.denominator == 255 and abs(float(frac) - eps) < 1e-9 \
        else f"{eps:g}"


@dataclass(frozen=True)
class Spec:
    """One attack set of the sweep."""

    attack: str
    eps: float | None  # None: unbounded attacks (cw, deepfool)

    @property
    def key(self) -> str:
        return self.attack if self.eps is None else f"{self.attack}@{eps_tag(self.eps)}"

    @property
    def dirname(self) -> str:
        return self.key.replace("@", "-").replace("/", "-")

    def config(self) -> AttackConfig:
        return AttackConfig(self.attack) if self.eps is None else AttackConfig(self.attack, eps=self.eps)


def sweep(config: EvaluateConfig) -> list[Spec]:
    specs = []
    for name in config.attacks:
        if name in LINF_ATTACKS:
            specs += [Spec(name, e) for e in sorted(config.eps)]
        else:
            specs.append(Spec(name, None))
    return specs


def main_specs(config: EvaluateConfig) -> list[Spec]:
    """One set per attack: the largest eps for L-inf attacks."""
    return [s for s in sweep(config) if s.eps is None or s.eps == config.main_eps]


def parse_eps_list(text: str) -> tuple[float, ...]:
    values = tuple(parse_eps(v) for v in text.split(",") if v.strip())
    if not values:
        raise OptionError("give at least one eps, e.g. --eps 4/255,8/255")
    return values
