"""The ``advdetect`` command line: parse options, call one library function, render."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import AdvDetectError, OptionError

# advdetect.attacks.DETECTOR_ATTACKS, spelled out so that the CLI starts without importing torch (a test checks)
DETECTOR_ATTACKS = ("fgsm", "bim", "pgd", "mifgsm", "cw", "deepfool")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class AdvDetectCommand(click.Command):
    """An OS error on a path the user gave (or a full disk) becomes a one-line user error.

    Any other OS error is a bug or an environment problem of ours: it stays an exception and
    the group reports it as an internal error (exit code 1).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if isinstance(exc, AdvDetectError) or not _users_problem(exc, _user_paths(self, ctx)):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            hint = "; free space or choose another path" if exc.errno in _FULL else ""
            raise AdvDetectError(f"{exc.strerror or exc}{where}{hint}") from exc


_FULL = {errno.ENOSPC, errno.EDQUOT}


def _user_paths(command: click.Command, ctx: click.Context) -> list[Path]:
    """The paths the user gave this command (every click.Path option and argument that was set)."""
    paths = []
    for param in command.params:
        if not isinstance(param.type, click.Path) and param.name != "model":  # --model may name a file
            continue
        value = ctx.params.get(param.name or "")
        for item in value if isinstance(value, (tuple, list)) else [value]:
            if item:
                paths.append(Path(os.path.abspath(os.fspath(item))))
    return paths


def _users_problem(exc: OSError, paths: list[Path]) -> bool:
    if exc.errno in _FULL:
        return True
    for name in (exc.filename, exc.filename2):
        if name is None or not isinstance(name, (str, bytes, os.PathLike)):
            continue
        failed = Path(os.path.abspath(os.fsdecode(name)))
        if any(failed == p or p in failed.parents or failed in p.parents for p in paths):
            return True
    return False


class AdvDetectGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 2, anything else into exit code 1."""

    command_class = AdvDetectCommand

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `advdetect`: show the help as click would
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException as exc:  # usage errors: one line, not click's usage block
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
            click.echo(f"advdetect: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("advdetect: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except AdvDetectError as exc:  # the user's input: bad option values (OptionError), paths, files
            if debug:
                raise
            click.echo(f"advdetect: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("advdetect: interrupted; finished shards are kept, rerun the same command to continue", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence for users
            if debug:
                raise
            click.echo(f"advdetect: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
                       err=True)
            ctx.exit(1)


def common_options(func: Callable) -> Callable:
    """--device, --seed and --json, shared by every command."""

    @click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                  help="Where to compute; auto picks CUDA when available.")
    @click.option("--seed", default=0, show_default=True, type=int, help="Seed for data subsets and randomness.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def model_file_options(func: Callable) -> Callable:
    """--mean, --std and --input-size for a user's own .pt2/.pt model file."""
    func = click.option("--input-size", default=None, help="Model file's input size, e.g. 32 or 224,224.")(func)
    func = click.option("--std", default=None, help="Model file's normalization std, e.g. 0.247,0.243,0.261.")(func)
    func = click.option("--mean", default=None, help="Model file's normalization mean, e.g. 0.491,0.482,0.447.")(func)
    return func


def model_arg(spec: str | None, kwargs: dict[str, Any]) -> Any:
    """The model for a library call: the spec itself, or the file loaded with --mean/--std/--input-size."""
    mean, std, size = kwargs.pop("mean"), kwargs.pop("std"), kwargs.pop("input_size")
    if mean is None and std is None and size is None:
        return spec
    from .models import load_model
    from .device import resolve_device

    def floats(text: str | None, what: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(v) for v in text.split(",")]
        except ValueError as exc:
            raise AdvDetectError(f"bad --{what} {text!r}: give comma-separated numbers") from exc

    sizes = floats(size, "input-size")
    return load_model(spec or "", device=resolve_device(kwargs.get("device", "auto")), mean=floats(mean, "mean"),
                      std=floats(std, "std"), input_size=[int(v) for v in sizes] if sizes else None)


def emit(result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    from .distributed import context

    if not context().is_main:  # under torchrun, rank 0 speaks for the job
        return
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(render(result))


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


@click.group(cls=AdvDetectGroup, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
@click.version_option(package_name="advdetect")
def main(debug: bool, verbose: bool) -> None:
    """Detect adversarial images from their meaningful-perturbation masks."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None,
    help="CIFAR-10 data root (ImageFolder or torchvision layout). Default: $ADVDETECT_DATA, else "
         "~/.cache/advdetect/data.")
DATA_OPTIONS = [
    DATA_DIR_OPTION,
    click.option("--data", "data_path", type=click.Path(file_okay=False), default=None,
                 help="Your own images instead of CIFAR-10: an ImageFolder DIR/<class>/<image>, or DIR/train and "
                      "DIR/test holding those; a single tree is split 70/30 into train and test by a fixed seed. "
                      "Images are resized to the model's input size and converted to its channels."),
    click.option("--classes", "classes_file", type=click.Path(dir_okay=False), default=None,
                 help="Map class folders to the model's classes: a JSON object {\"folder\": index or name}, or a "
                      "text file with one folder name per line in the model's class order. Default: by name, else "
                      "in sorted order when the counts agree."),
]


def data_spec(kwargs: dict[str, Any]) -> Any:
    """The DataSpec of the data options (removed from ``kwargs``)."""
    from .data import DataSpec

    return DataSpec(path=kwargs.pop("data_path"), data_dir=kwargs.pop("data_dir"),
                    classes_file=kwargs.pop("classes_file"))


def data_options(func: Callable) -> Callable:
    for option in reversed(DATA_OPTIONS):
        func = option(func)
    return func


EXACT_OPTION = click.option("--exact", is_flag=True,
                            help="Judge with optimised masks even when the detector has a fast path.")


@main.command(context_settings=CONTEXT)
@click.option("--model", default="cifar10-cnn", show_default=True,
              help="cifar10-cnn, torchvision:<name>[:<weights>], or a .pt2/.pt file.")
@click.option("--attack", default="bim", show_default=True,
              help="fgsm, bim, pgd, mifgsm, ll-bim, cw or deepfool.")
@click.option("--eps", default="8/255", show_default=True, help="L-inf budget, e.g. 8/255 or 0.03.")
@click.option("--alpha", default=None, help="Step size of iterative attacks [default: 2/255].")
@click.option("--steps", default=None, type=int, help="Iterations [default: 10; cw and deepfool 50].")
@click.option("--n", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Number of images (all of the split, if it holds fewer).")
@click.option("--split", default=None, type=click.Choice(["train", "test", "all"]),
              help="Which images: CIFAR-10's (or --data DIR/train's) train or test split; for a single --data "
                   "folder its 70% train or 30% test part, or all of it [default: test; all for a single folder].")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images per batch: one shard on disk, the most images in memory at once.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@data_options
@model_file_options
@common_options
def attack(model: str, attack: str, eps: str, alpha: str | None, steps: int | None, n: int, split: str | None,
           batch_size: int, out: str, device: str, seed: int, as_json: bool, **files: Any) -> None:
    """Generate adversarial images and store them with predictions in OUT."""
    from .attackset import run_attack

    data = data_spec(files)
    summary = run_attack(model=model_arg(model, dict(files, device=device)), attack=attack, eps=eps, alpha=alpha,
                         steps=steps, n=n, out=out, split=split, data=data, batch_size=batch_size, seed=seed,
                         device=device, progress=not as_json or sys.stderr.isatty())
    emit(summary.to_dict(), as_json, lambda r: (
        "".join(f"note: skipped: {s['error']}\n" for s in r["skipped"]) +
        f"{r['attack']['name']} eps={r['attack']['eps']:.4f} on {r['model']['name']}, {r['n']} images -> {r['out']}\n"
        f"clean accuracy        {pct(r['clean_accuracy'])}\n"
        f"adversarial accuracy  {pct(r['adversarial_accuracy'])}\n"
        f"attack success rate   {pct(r['success_rate'])}  (of correctly classified images)\n"
        f"time                  {r['seconds']:.1f}s"))


MASK_OPTIONS = [
    click.option("--method", type=click.Choice(["meaningful", "extremal", "robust"]), default=None,
                 help="Mask method: meaningful perturbation (default), extremal perturbation (fixed area), "
                      "robust perturbation (cross-checking deletion)."),
    click.option("--game", type=click.Choice(["delete", "preserve", "both", "dual"]), default=None,
                 help="Deletion (default) or preservation game; both: the two games' masks as two channels "
                      "(meaningful masks); extremal also has dual."),
    click.option("--area", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                 help="Extremal masks: area as a fraction of the image [default: 0.2]."),
    click.option("--perturbation", type=click.Choice(["blur", "constant", "noise"]), default=None,
                 help="What a deleted pixel becomes [default: blur]."),
    click.option("--iterations", type=click.IntRange(min=1), default=None, help="Max iterations per mask."),
    click.option("--l1", "l1_coeff", type=click.FloatRange(min=0), default=None, help="lambda1 (area weight)."),
    click.option("--tv", "tv_coeff", type=click.FloatRange(min=0), default=None, help="lambda2 (TV weight)."),
    click.option("--blur-sigma", type=click.FloatRange(min=0), default=None, help="Blur sigma in pixels."),
    click.option("--upsample", type=click.IntRange(min=1), default=None, help="Mask upsampling factor."),
    click.option("--early-stop/--no-early-stop", default=None, help="Stop each image once converged [default: on]."),
    click.option("--mask-batch", "batch_size", type=click.IntRange(min=0), default=None,
                 help="Images optimised together (0 = auto)."),
]


def mask_options(func: Callable) -> Callable:
    for option in reversed(MASK_OPTIONS):
        func = option(func)
    return func


def mask_config(seed: int, **options: Any) -> dict[str, Any]:
    """The mask options the user gave (and the seed): overrides of the settings for the model's input size."""
    return {"seed": seed, **{k: v for k, v in options.items() if v is not None}}


def render_mask_config(config: dict[str, Any]) -> str:
    keys = ("method", "game", "perturbation", "iterations", "upsample", "blur_sigma", "l1_coeff", "tv_coeff", "jitter",
            "early_stop")
    return "mask settings: " + ", ".join(f"{k} {config[k]}" for k in keys if k in config)


MASK_KEYS = ("method", "game", "area", "perturbation", "iterations", "l1_coeff", "tv_coeff", "blur_sigma", "upsample",
             "early_stop", "batch_size")


def pop_mask_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in MASK_KEYS}


@main.command(context_settings=CONTEXT)
@click.option("--in", "in_dir", required=True, type=click.Path(file_okay=False),
              help="Attack set directory written by `advdetect attack`.")
@click.option("--model", default=None, help="Model spec [default: the one the attack set was made with].")
@click.option("--shard-size", default=512, show_default=True, type=click.IntRange(min=1))
@mask_options
@model_file_options
@common_options
def masks(in_dir: str, model: str | None, shard_size: int, device: str, seed: int, as_json: bool,
          **options: Any) -> None:
    """Compute masks for the clean and adversarial images of an attack set (stored in IN/masks)."""
    from .maskset import run_mask_set

    summary = run_mask_set(in_dir, model=model_arg(model, dict(options, device=device)),
                           config=mask_config(seed, **pop_mask_options(options)),
                           shard_size=shard_size, device=device, progress=True)
    emit(summary.to_dict(), as_json, lambda r: (
        f"{2 * r['n']} masks -> {r['out']} in {r['seconds']:.1f}s ({r['masks_per_second']:.1f} masks/s)\n"
        f"clean:       mean iterations {r['clean']['mean_iterations']:.0f}, mean mask {r['clean']['mean_mask']:.3f}, "
        f"class deleted {pct(r['clean']['deleted_fraction'])}\n"
        f"adversarial: mean iterations {r['adversarial']['mean_iterations']:.0f}, mean mask "
        f"{r['adversarial']['mean_mask']:.3f}, class deleted {pct(r['adversarial']['deleted_fraction'])}"))


@main.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path())
@click.option("--model", default="cifar10-cnn", show_default=True, help="Model spec.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the figure here (.png, .pdf, .svg).")
@click.option("--target", default=None, help="Class (name or index) to explain [default: the top prediction].")
@click.option("--layer", default=None,
              help="Explain a layer's channels instead of the pixels: which channels of this module (a name from "
                   "the model's named_modules(), e.g. groups.2) must be kept to keep the class; --area sets the "
                   "fraction kept [default 0.1].")
@mask_options
@model_file_options
@common_options
def explain(image: str, model: str, out: str | None, target: str | None, layer: str | None, device: str, seed: int,
            as_json: bool, **options: Any) -> None:
    """Explain one image: its mask, the perturbed image and the probabilities before and after."""
    from .explanation import explain_file, explain_layer

    if layer is not None:
        if out is not None:
            raise OptionError("--out draws a pixel mask's figure; with --layer the kept channels are listed instead")
        result = explain_layer(image, layer, model=model_arg(model, dict(options, device=device)),
                               area=options.get("area"), target=target, device=device)
        emit(result, as_json, lambda r: "\n".join(
            [*(f"note: {n}" for n in r["notes"]),
             f"{r['image']}: {r['target']} {pct(r['prob_before'])} -> {pct(r['prob_kept'])} keeping {r['n_kept']} of "
             f"the {r['channels']} channels of {r['layer']} (the others zeroed)",
             "channels kept, highest weight first: " + ", ".join(f"{c['channel']} ({c['weight']:.2f})"
                                                                 for c in r["top_channels"])]))
        return

    result = explain_file(image, model=model_arg(model, dict(options, device=device)),
                          config=mask_config(seed, **pop_mask_options(options)), target=target,
                          out=out, device=device)
    emit(result, as_json, lambda r: "\n".join(
        [*(f"note: {n}" for n in r["notes"]), render_mask_config(r["mask_config"]),
         f"{r['image']}: {r['target']} {pct(r['prob_before'])} -> {pct(r['prob_after'])} after deleting "
         f"{pct(r['deleted_area'])} of the image ({r['iterations']} iterations)",
         *(f"  {t['class']:<12} {pct(t['before']):>6} -> {pct(t['after']):>6}" for t in r["top"]),
         *([f"figure: {r['figure']}"] if r.get("figure") else [])]))


@main.command(context_settings=CONTEXT)
@click.option("--model", default="cifar10-cnn", show_default=True, help="Model spec.")
@click.option("--attack", default=",".join(DETECTOR_ATTACKS), show_default=True,
              help="Attack(s) the one detector is trained on; e.g. --attack bim narrows it to BIM.")
@click.option("--eps", default="8/255", show_default=True,
              help="L-inf budget of the L-inf attacks (cw and deepfool are unbounded).")
@click.option("--n", default=5000, show_default=True, type=click.IntRange(min=10),
              help="Training images, attacked; the discriminator is fitted on them (with --calibrate-on train, "
                   "the last 20% set the threshold instead).")
@click.option("--n-eval", default=2000, show_default=True, type=click.IntRange(min=10),
              help="Held-out test images for the reported metrics.")
@click.option("--transfer", default=None, help="Attacks to evaluate the detector on as well, e.g. fgsm,pgd.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Detector directory.")
@data_options
@click.option("--attack-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images per attack batch (one shard of an attack set).")
@click.option("--shard-size", default=512, show_default=True, type=click.IntRange(min=1),
              help="Images per mask shard (the unit of resuming and of splitting work under torchrun).")
@click.option("--calibrate-on", default="test", show_default=True, type=click.Choice(["test", "train"]),
              help="Clean images that set the threshold: test images beside the held-out ones (never seen by the "
                   "classifier), or the last 20% of the training images.")
@click.option("--n-calibration", default=1000, show_default=True, type=click.IntRange(min=10),
              help="Test images for --calibrate-on test.")
@click.option("--fpr", default=0.05, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="False-positive rate the threshold is calibrated to.")
@click.option("--recovery", "recovery_method", default="blur", show_default=True,
              type=click.Choice(["blur", "mask"]),
              help="How the detector recovers labels: a light blur, or the image's deletion mask applied back.")
@click.option("--inputs", default=None,
              help="What the discriminator reads, comma-separated: masks, residual (what the blur removes from "
                   "the image), confidence (target probability before and after the mask, iterations used) "
                   "[default: all three].")
@click.option("--fast/--no-fast", default=True, show_default=True,
              help="Also train the fast path: a mask network that gives the masks in one pass, and a detector "
                   "on its maps (`detect` uses it; --exact there forces optimised masks).")
@click.option("--fast-epochs", default=30, show_default=True, type=click.IntRange(min=1),
              help="Epochs of the fast path's mask network.")
@click.option("--fast-n", default=None, type=click.IntRange(min=1),
              help="Training images the fast path's detector (and --margin's combination) fit on [default: 6 x "
                   "--n, at most 10,000 and what the data's training part holds]. "
                   "Those beyond --n are attacked but not masked (the fast detector reads the mask network's "
                   "maps), so they cost the attacks only (README, 'More images for the fast path').")
@click.option("--adaptive-rounds", default=0, show_default=True, type=click.IntRange(min=0),
              help="Harden the fast path's detector: rounds of adversarial training against the white-box adaptive "
                   "attacker (each attacks the fitting images at 2, 4 and 8/255 and refits on what fooled the "
                   "classifier).")
@click.option("--margin/--no-margin", default=None,
              help="The fast path's verdict combines its detector's score with the classifier's log-probability "
                   "gap between its top two classes, its blur shifts (--squeeze) and noise shifts (--noise), fitted "
                   "on the fitting images and calibrated on the calibration images: catches CW, DeepFool and "
                   "BIM/PGD more often, for three more classifier passes per verdict (README, 'Combining the score "
                   "with the classifier's margin') [default: on whenever the fast path is trained].")
@click.option("--squeeze", default="0.75,1.5", show_default=True,
              help="With --margin: Gaussian blur sigmas (px) whose shift of the classifier's softmax joins the "
                   "combination (feature squeezing's signal; catches CW-L2); none: the gap alone.")
@click.option("--class-calibration/--no-class-calibration", default=False, show_default=True,
              help="With --margin: one threshold per predicted class, so no class of clean images is flagged much "
                   "above --fpr; give it --n-calibration 2000 or more (README, 'Per-class calibration': it costs "
                   "detection on FGSM, BIM and PGD).")
@click.option("--noise", default=None,
              help="With the margin combination: Gaussian pixel-noise sigmas (images in [0, 1]) whose shift of the "
                   "classifier's softmax joins it (one fixed noise pattern; one classifier pass each); none: no "
                   "noise shift [default: 0.01].")
@click.option("--combiner", type=click.Choice(["logistic", "mlp"]), default=None,
              help="With the margin combination: how the evidence is combined: logistic regression, or a small MLP "
                   "that can use the noise shift in both directions (README, 'Noise shifts and an MLP combiner') "
                   "[default: mlp].")
@mask_options
@model_file_options
@common_options
def train(model: str, attack: str, eps: str, n: int, n_eval: int, transfer: str | None, out: str,
          attack_batch: int, shard_size: int, calibrate_on: str, n_calibration: int,
          fpr: float, recovery_method: str, inputs: str | None, fast: bool, fast_epochs: int, fast_n: int | None,
          adaptive_rounds: int, margin: bool | None, squeeze: str, class_calibration: bool, noise: str | None,
          combiner: str | None,
          device: str, seed: int, as_json: bool, **options: Any) -> None:
    """Train and calibrate a detector: attack, masks, discriminator, held-out metrics."""
    from .recovery import RecoveryConfig
    from .training import run_train

    data = data_spec(options)
    report = run_train(model=model_arg(model, dict(options, device=device)), attack=attack, eps=eps, n=n,
                       n_eval=n_eval, out=out, transfer=transfer,
                       mask_config=mask_config(seed, **pop_mask_options(options)), data=data, seed=seed,
                       device=device, progress=True, batch_size=attack_batch, shard_size=shard_size,
                       recovery=RecoveryConfig(method=recovery_method), calibrate_on=calibrate_on,
                       n_calibration=n_calibration, fpr=fpr, inputs=inputs, fast=fast, fast_epochs=fast_epochs,
                       adaptive_rounds=adaptive_rounds, margin=margin, squeeze=squeeze,
                       class_calibration=class_calibration, noise=noise, combiner=combiner, fast_n=fast_n)
    emit(report.to_dict(), as_json, render_train)


def render_train(r: dict[str, Any]) -> str:
    data = r["data"].get("path") or r["data"]["dataset"]
    lines = [f"detector -> {r['out']} (threshold {r['threshold']:.3f} at {pct(r['calibration_fpr'])} FPR on "
             f"{r['n_calibration']} clean {r['calibrated_on']} images), "
             f"{r['n_train']} training / {r['n_eval']} held-out images of {data}, {r['seconds']:.0f}s",
             render_mask_config(r["mask_config"])]
    for name, m in r["metrics"].items():
        tag = "" if m["trained_on"] else " (transfer)"
        lines.append(f"{name}{tag}: accuracy {pct(m['accuracy'])}, ROC-AUC {m['roc_auc']:.3f}, "
                     f"TPR {pct(m['tpr_at_5fpr'])} at 5% FPR, {pct(m['tpr_at_1fpr'])} at 1% FPR; "
                     f"recovery of flagged images top-1 {pct(m['flagged_recovery_top1'])}, top-5 "
                     f"{pct(m['flagged_recovery_top5'])} (of all: {pct(m['recovery_top1'])} / {pct(m['recovery_top5'])}), "
                     f"harm {pct(m['harm'])}"
                     f" [{m['n_clean']} clean / {m['n_adversarial']} adversarial]")
    per_class = next(iter(r["metrics"].values()), {}).get("fpr_per_class")  # the same clean images for every attack
    if per_class:
        lines.append("held-out clean images flagged per class: " +
                     ", ".join(f"{name} {pct(rate)}" for name, rate in per_class.items()))
    if r.get("fast"):
        combined = " + classifier margin" if r["fast"].get("margin") else ""
        combined += f", noise shifts at {r['fast']['noise']}" if r["fast"].get("noise") else ""
        combined += ", MLP" if r["fast"].get("hidden") else ""
        combined += ", a threshold per class" if r["fast"].get("per_class") else ""
        if r["fast"].get("n_train", r["n_train"]) != r["n_train"]:
            combined += f", fitted on {r['fast']['n_train']} training images"
        lines.append(f"fast path (amortized masks{combined}; `detect` uses it): " + "; ".join(
            f"{name} ROC-AUC {m['roc_auc']:.3f}, TPR {pct(m['tpr_at_5fpr'])} at 5% FPR"
            for name, m in r["fast"]["metrics"].items()))
        fast_classes = next(iter(r["fast"]["metrics"].values()), {}).get("fpr_per_class")
        if fast_classes:
            lines.append("fast path: held-out clean images flagged per class: " +
                         ", ".join(f"{name} {pct(rate)}" for name, rate in fast_classes.items()))
    for entry in ((r.get("fast") or {}).get("hardening") or {}).get("history", []):
        lines.append(f"hardening round {entry['round']}: the white-box attack fooled classifier and fast detector on "
                     f"{pct(entry['success_before_refit'])} of {entry['attacked']} fitting images before the refit")
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--detector", "detector_dir", required=True, type=click.Path(), help="Detector directory.")
@click.option("--model", default=None, help="Model spec [default: the detector's classifier].")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images judged together.")
@EXACT_OPTION
@model_file_options
@common_options
def detect(images: tuple[str, ...], detector_dir: str, model: str | None, batch_size: int, exact: bool, device: str,
           seed: int, as_json: bool, **files: Any) -> None:
    """Say for each image whether it is adversarial: label, score, verdict.

    IMAGES are files or folders (searched recursively). With --json, one JSON object per image
    (JSON Lines), written as each batch is judged. A detector trained with a fast path (amortized
    masks, one network pass) uses it; --exact judges with optimised masks instead.
    """
    from .inference import iter_detections, load_deployment

    torch_seed(seed)
    deployed = load_deployment(detector_dir, model_arg(model, dict(files, device=device)), device, exact=exact)
    stream(iter_detections(list(images), deployed, batch_size, progress=sys.stderr.isatty()), as_json,
           lambda row: "\n".join([*(f"note: {row['image']}: {note}" for note in row["notes"]),
                                  f"{row['image']}: {row['label']} ({pct(row['confidence'])}), score "
                                  f"{row['score']:+.2f} -> {'ADVERSARIAL' if row['adversarial'] else 'clean'}"]))


def stream(rows: Any, as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    """Print each result as it comes (a JSON line with --json); unreadable images are reported on stderr
    and, once every other image is done, make the exit code 2."""
    failed, debug = 0, bool(click.get_current_context().find_root().params.get("debug"))
    for row in rows:
        if "error" in row:
            if debug:  # --debug: stop at the first bad image with its traceback
                raise AdvDetectError(row["error"])
            failed += 1
            click.echo(f"advdetect: error: {row['error']}", err=True)
            continue
        click.echo(json.dumps(row) if as_json else render(row))
    if failed:
        sys.exit(2)


@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--detector", "detector_dir", required=True, type=click.Path(), help="Detector directory.")
@click.option("--model", default=None, help="Model spec [default: the detector's classifier].")
@click.option("--out", default=None, type=click.Path(),
              help="Before/after figure (.png) for one image; a folder of them for several.")
@click.option("--method", default=None, type=click.Choice(["blur", "mask"]),
              help="Recovery method [default: the detector's]: a light blur, or the image's mask applied back.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images recovered together.")
@EXACT_OPTION
@model_file_options
@common_options
def recover(images: tuple[str, ...], detector_dir: str, model: str | None, out: str | None, method: str | None,
            batch_size: int, exact: bool, device: str, seed: int, as_json: bool, **files: Any) -> None:
    """Recover the label of (flagged) images and report the recovered top-1 and top-5.

    IMAGES are files or folders (searched recursively). With --json, one JSON object per image
    (JSON Lines), written as each batch is done.
    """
    from .inference import iter_recoveries, load_deployment

    torch_seed(seed)
    deployed = load_deployment(detector_dir, model_arg(model, dict(files, device=device)), device,
                               recovery_method=method, exact=exact)
    stream(iter_recoveries(list(images), deployed, figures=out, batch_size=batch_size,
                           progress=sys.stderr.isatty()), as_json, lambda r: "\n".join(
        [*(f"note: {n}" for n in r["notes"]),
         f"{r['image']}: predicted {r['prediction']} ({pct(r['confidence'])}), "
         f"{'ADVERSARIAL' if r['adversarial'] else 'clean'} (score {r['score']:+.2f})",
         *([f"ruled out: {r['ruled_out']} (the flagged prediction)"] if r["ruled_out"] else []),
         f"recovered ({r['method']}): {r['recovered']}; top-5: "
         + ", ".join(f"{t['class']} {pct(t['probability'])}" for t in r["recovered_top5"]),
         *([f"figure: {r['figure']}"] if r["figure"] else [])]))


@main.command(context_settings=CONTEXT)
@click.option("--detector", "detector_dir", required=True, type=click.Path(), help="Detector directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--attacks", default=",".join(DETECTOR_ATTACKS), show_default=True,
              help="Attacks to evaluate (cw and deepfool are unbounded: one set each).")
@click.option("--eps", "eps_list", default="4/255,8/255", show_default=True,
              help="eps sweep of the L-inf attacks; the largest is the main one.")
@click.option("--n", default=1000, show_default=True, type=click.IntRange(min=8),
              help="Test images (of the detector's data, or --data), the first in the seeded order that the "
                   "detector was neither fitted nor calibrated on.")
@click.option("--n-baseline", default=500, show_default=True, type=click.IntRange(min=4),
              help="Images for the baseline heatmap methods.")
@click.option("--baselines", default="saliency,guided_backprop,grad_cam,occlusion,integrated_gradients,raw_image",
              show_default=True, help="Baseline methods (captum heatmaps and the raw image); '' for none.")
@click.option("--methods", default="", show_default=True,
              help="Mask methods to compare with the detector's own, e.g. extremal,robust (slower: every image "
                   "gets a mask per method).")
@click.option("--n-methods", default=200, show_default=True, type=click.IntRange(min=4),
              help="Images for the mask-method comparison.")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True, help="Run the adaptive attack.")
@click.option("--adaptive-n", default=100, show_default=True, type=click.IntRange(min=1),
              help="Correctly classified evaluation-half images the adaptive attacker perturbs.")
@click.option("--adaptive-eps", default="2/255,4/255,8/255,16/255,32/255,64/255", show_default=True)
@click.option("--adaptive-steps", default=40, show_default=True, type=click.IntRange(min=1),
              help="PGD steps (the sanity check reruns the main eps with 4x as many).")
@click.option("--adaptive-restarts", default=1, show_default=True, type=click.IntRange(min=1),
              help="Random restarts per image.")
@click.option("--adaptive-settings", default="1:2,0.3:2,0.1:2", show_default=True,
              help="The attacker's runs, lam:kappa pairs in turn (detector-term weight : classifier margin aimed "
                   "for), each starting from the best images so far (README, margin section: one weight alone "
                   "stalls).")
@click.option("--adaptive-targets", default=0, show_default=True, type=click.IntRange(min=0),
              help="Multi-targeted runs: after each untargeted run, one aimed at each of this many classes the "
                   "classifier ranks next on the clean image (each adds the cost of a run).")
@click.option("--adaptive-unroll", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also attack the real mask optimisation, differentiated through this many unrolled steps "
                   "(0: the surrogate alone; each PGD step then reruns a warm-started optimisation: slow).")
@data_options
@common_options
def evaluate(detector_dir: str, out: str, attacks: str, eps_list: str, n: int, n_baseline: int, baselines: str,
             methods: str, n_methods: int, adaptive: bool, adaptive_n: int, adaptive_eps: str, adaptive_steps: int,
             adaptive_restarts: int, adaptive_settings: str, adaptive_targets: int, adaptive_unroll: int, device: str,
             seed: int, as_json: bool, **given: Any) -> None:
    """Security evaluation of a detector: report.html, report.json and report.md in OUT."""
    from .evaluation.config import EvaluateConfig, parse_eps_list, parse_settings
    from .evaluation.harness import run_evaluation

    config = EvaluateConfig(
        attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()), eps=parse_eps_list(eps_list), n=n,
        n_baseline=min(n_baseline, n), baselines=tuple(b.strip() for b in baselines.split(",") if b.strip()),
        adaptive=adaptive, adaptive_n=min(adaptive_n, n // 2), adaptive_eps=parse_eps_list(adaptive_eps),
        adaptive_steps=adaptive_steps, adaptive_restarts=adaptive_restarts,
        adaptive_settings=parse_settings(adaptive_settings), adaptive_targets=adaptive_targets,
        adaptive_unroll=adaptive_unroll, seed=seed, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        n_methods=min(n_methods, n))
    report = run_evaluation(detector_dir, out, config, data=data_spec(given), device=device, progress=True)
    emit(report, as_json, render_evaluation)


def render_evaluation(r: dict[str, Any]) -> str:
    lines = [f"report -> {r['out']}/report.html (and report.json, report.md) in {r['timings']['total']:.0f}s",
             f"clean accuracy {pct(r['clean']['accuracy'])}, detector FPR {pct(r['clean']['detector_fpr'])}"]
    for key, a in r["attacks"].items():
        lines.append(f"{key}: success {pct(a['success_rate'] or 0)}, detected {pct(a['tpr_at_threshold'] or 0)}, "
                     f"ROC-AUC {a['roc_auc'] or float('nan'):.3f}, TPR {pct(a['tpr_at_5fpr'] or 0)} at 5% FPR, "
                     f"recovery of flagged {pct(a['flagged_recovery_top1'] or 0)} / "
                     f"{pct(a['flagged_recovery_top5'] or 0)}")
    if r.get("fast_path"):
        f = r["fast_path"]
        lines.append(f"fast path (`detect` uses it): clean FPR {pct(f['clean_fpr'] or 0)}; " + "; ".join(
            f"{key} ROC-AUC {a['roc_auc'] or float('nan'):.3f}, detected {pct(a['tpr_at_threshold'] or 0)}"
            for key, a in f["attacks"].items()))
    if r["baselines"]["winner"]:
        lines.append("best heatmap per attack: " + ", ".join(f"{k} {w}" for k, w in r["baselines"]["winner"].items()))
    if r.get("adaptive"):
        lines.append("adaptive attack success: " + ", ".join(
            f"{x['eps'] * 255:g}/255 {pct(x['success'] or 0)}" for x in r["adaptive"]["sweep"]))
    return "\n".join(lines)


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


if __name__ == "__main__":
    main()
