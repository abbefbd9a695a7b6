"""Every hyperparameter of the mask optimisation in one object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import OptionError
from .loss import GAMES, SCORES
from .perturbation import PERTURBATIONS


MASK_METHODS = ("meaningful", "extremal", "robust")
PAPER_FROM = 64  # inputs this large (pixels, larger side) get the paper's settings, scaled (for_input_size)
BOTH_CHANNELS = ("preserve", "delete")  # game "both": the channels of its masks, in order
EXTREMAL_KEYS = ("area", "area_coeff", "smooth", "step", "max_blur", "levels")
ROBUST_KEYS = ("cross_coeff", "preserve_coeff")


@dataclass(frozen=True)
class MaskConfig:
    """Hyperparameters of the meaningful-perturbation mask (Fong & Vedaldi 2017).

    The defaults are tuned for 32 x 32 inputs and the built-in ``cifar10-cnn``;
    :meth:`paper` gives the paper's settings for 224 x 224 ImageNet models.

    Attributes:
        game: ``delete`` (smallest deletion that removes the class, the default), ``preserve``, or
            ``both``: the two games' masks of the same image stacked as channels [preserve, delete]
            (N x 2 x H x W; see :mod:`.two_games`).
        score: class evidence in the objective: ``prob`` (the paper's softmax probability) or
            ``log_prob`` (keeps pushing once the probability is small).
        perturbation: ``blur`` (default), ``constant`` or ``noise``.
        blur_sigma: Gaussian blur of the perturbed reference, in pixels.
        upsample: the mask is optimised at ``ceil(H / upsample)`` and upsampled bilinearly.
        l1_coeff: lambda1, weight of the mean perturbed area.
        tv_coeff: lambda2, weight of the total variation.
        tv_beta: beta, the TV exponent.
        iterations: maximum Adam iterations per image.
        lr: Adam learning rate on the mask values (clamped to [0, 1] after each step).
        jitter: maximum random shift of the mask per iteration, in pixels (0 = off).
        noise: std of Gaussian noise added to the perturbed image per iteration (0 = off).
        early_stop: freeze an image's mask once it has converged (see ``tol``, ``patience``).
        check_every: iterations between convergence checks (and batch refills).
        min_iterations: no image stops before this many iterations.
        tol: an image has converged when its low-resolution mask moved less than ``tol``
            (mean abs change over ``check_every`` iterations) and the game's goal is met:
        floor: deletion game: once the target probability is below ``floor`` times the original,
            pushing it lower earns nothing, so the mask shrinks to the smallest deletion that
            reaches the floor and then settles (0 = off, as in the paper).
        stop_ratio: deletion goal - the target probability (mean over the window) is at most
            ``stop_ratio`` times the original. (Preservation: the objective changed < ``tol``.)
        batch_size: images optimised together; 0 picks a size for the device.
        amp: bfloat16 autocast on CUDA.
        seed: seed of the jitter and noise sequences.
        method: ``meaningful`` (this paper, the default), ``extremal`` (Fong, Patrick & Vedaldi
            2019: fixed-area masks; ``game`` may also be ``dual``) or ``robust`` (Kim et al. 2021:
            deletion with cross-checking). The settings below apply to those two only and are left
            out of :meth:`to_dict` for ``meaningful``.
        area: extremal - the mask's area as a fraction of the image.
        area_coeff: extremal - weight of the area (ranking) constraint; it grows geometrically
            from ``area_coeff`` to ``100 * area_coeff`` over the iterations, as in TorchRay.
        smooth: extremal - sigma (pixels) of the smooth max-convolution mask generator.
        step: extremal - spacing (pixels) of the mask generator's parameter grid.
        max_blur: extremal - sigma (pixels) of the blur pyramid's strongest level.
        levels: extremal - number of blur pyramid levels.
        cross_coeff: robust - weight of the cross-check keeping the non-target predictions (KL
            between the non-target class distributions of the image and the perturbed image).
        preserve_coeff: robust - weight of the preserved branch (the deleted region alone must
            keep the target class).
    """

    game: str = "delete"
    score: str = "log_odds"
    perturbation: str = "blur"
    blur_sigma: float = 6.0
    upsample: int = 2
    l1_coeff: float = 0.3
    tv_coeff: float = 0.2
    tv_beta: float = 3.0
    iterations: int = 150
    lr: float = 0.1
    jitter: float = 1.0
    noise: float = 0.02
    early_stop: bool = True
    check_every: int = 10
    min_iterations: int = 30
    tol: float = 0.03
    stop_ratio: float = 0.05
    floor: float = 0.0005
    batch_size: int = 0
    amp: bool = False
    seed: int = 0
    method: str = "meaningful"
    area: float = 0.2
    area_coeff: float = 10.0
    smooth: float = 2.0
    step: int = 4
    max_blur: float = 6.0
    levels: int = 8
    cross_coeff: float = 1.0
    preserve_coeff: float = 0.5

    @property
    def kind(self) -> str:
        """What sort of mask this makes: ``delete``/``preserve`` (meaningful), ``extremal-<game>``, ``robust``."""
        return {"meaningful": self.game, "extremal": f"extremal-{self.game}", "robust": "robust"}[self.method]

    def for_recovery(self) -> MaskConfig:
        """The masks that recover a label: deletion masks (these, if they are; else the default ones).

        Detection may use preservation masks, but only a deletion mask removes the evidence
        for the adversarial class when it is applied back to the image.
        """
        if self.game == "delete":
            return self
        if self.game == "both":  # its deletion channel, exactly
            return self.replace(game="delete")
        return MaskConfig(batch_size=self.batch_size, amp=self.amp, seed=self.seed)

    def __post_init__(self) -> None:
        if self.method not in MASK_METHODS:
            raise OptionError(f"unknown mask method {self.method!r}; choose one of: {', '.join(MASK_METHODS)}")
        games = {"meaningful": (*GAMES, "both"), "extremal": (*GAMES, "dual"), "robust": GAMES}[self.method]
        if self.game not in games:
            raise OptionError(f"unknown game {self.game!r} for {self.method} masks; choose one of: {', '.join(games)}")
        if self.method == "robust" and self.game != "delete":
            raise OptionError("robust perturbation is a deletion method; use game 'delete'")
        if not 0 < self.area < 1:
            raise OptionError(f"area must lie in (0, 1), got {self.area}")
        if self.step < 1 or self.levels < 2 or self.smooth <= 0:
            raise OptionError("step must be >= 1, levels >= 2 and smooth > 0")
        for name in ("area_coeff", "max_blur", "cross_coeff", "preserve_coeff"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.score not in SCORES:
            raise OptionError(f"unknown score {self.score!r}; choose one of: {', '.join(SCORES)}")
        if self.perturbation not in PERTURBATIONS:
            raise OptionError(f"unknown perturbation {self.perturbation!r}; choose one of: {', '.join(PERTURBATIONS)}")
        for name in ("iterations", "upsample", "check_every"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("blur_sigma", "l1_coeff", "tv_coeff", "jitter", "noise", "tol", "stop_ratio", "floor", "min_iterations",
                     "batch_size"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.lr <= 0 or self.tv_beta <= 0:
            raise OptionError("lr and tv_beta must be positive")

    @classmethod
    def paper(cls, **overrides: Any) -> MaskConfig:
        """Fong & Vedaldi's settings for 224 x 224 inputs: 28 x 28 mask upsampled x8, beta 3,
        300 Adam iterations at lr 0.1, blur sigma 10, jitter 4 pixels, no early stopping.
        (The paper's lambda1 = 1e-4 and lambda2 = 1e-2 weigh sums over 224 x 224 pixels; our
        terms are means, so they are scaled by the pixel count.)"""
        pixels = 224 * 224
        base = cls(blur_sigma=10.0, upsample=8, l1_coeff=1e-4 * pixels, tv_coeff=1e-2 * pixels / 64, tv_beta=3.0,
                   iterations=300, lr=0.1, jitter=4.0, noise=0.0, early_stop=False, score="prob", floor=0.0)
        return replace(base, **overrides)

    @classmethod
    def for_input_size(cls, size: int | tuple[int, ...], **overrides: Any) -> MaskConfig:
        """The settings for inputs of ``size`` pixels (the larger side), with ``overrides`` on top.

        The rule: below ``PAPER_FROM`` (64) pixels, the defaults tuned at 32 x 32; from there on,
        the paper's settings (:meth:`paper`) with their geometry scaled from 224 pixels to the
        input - a mask of about 28 x 28 (``upsample = round(size / 28)``), blur sigma
        ``10 * size / 224`` and jitter ``4 * size / 224`` pixels - so at 224 they are exactly the
        paper's. (The loss weights are per-pixel means, so they need no scaling.)
        """
        side = max(size) if isinstance(size, (tuple, list)) else int(size)
        if side < PAPER_FROM:
            return cls(**overrides)
        geometry = {"upsample": max(1, round(side / 28)), "blur_sigma": round(10.0 * side / 224, 2),
                    "jitter": round(4.0 * side / 224, 2)}
        return cls.paper(**{**geometry, **overrides})

    def replace(self, **changes: Any) -> MaskConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting that applies (meaningful masks leave out the other methods' settings)."""
        d = asdict(self)
        drop = {"meaningful": EXTREMAL_KEYS + ROBUST_KEYS + ("method",), "extremal": ROBUST_KEYS,
                "robust": EXTREMAL_KEYS}[self.method]
        return {k: v for k, v in d.items() if k not in drop}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise OptionError(f"unknown mask settings: {', '.join(sorted(unknown))}")
        return cls(**data)


def resolve_mask_config(config: MaskConfig | dict[str, Any] | None, input_size: tuple[int, ...]) -> MaskConfig:
    """``config`` itself, or the settings for ``input_size`` with ``config`` (a dict) as overrides."""
    if isinstance(config, MaskConfig):
        return config
    return MaskConfig.for_input_size(input_size, **(config or {}))
