"""The ``advdetect`` command line: parse options, call one library function, render."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import AdvDetectError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class AdvDetectGroup(click.Group):
    """Turns our errors into one line on stderr and exit code 2 (1 for internal errors)."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except AdvDetectError as exc:
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


def emit(result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(render(result))


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@click.group(cls=AdvDetectGroup, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
@click.version_option(package_name="advdetect")
def main(debug: bool, verbose: bool) -> None:
    """Detect adversarial images from their meaningful-perturbation masks."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


DATA_OPTIONS = [
    click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                 help="Data root (CIFAR-10 ImageFolder or torchvision layout). Default: $ADVDETECT_DATA, "
                      "else ~/.cache/advdetect/data."),
    click.option("--data", "data_path", type=click.Path(), default=None,
                 help="Any ImageFolder directory <class>/<image>, resized to the model's input size."),
    click.option("--dataset", default="cifar10", show_default=True, help="Named dataset: cifar10."),
    click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"])),
]


def data_options(func: Callable) -> Callable:
    for option in reversed(DATA_OPTIONS):
        func = option(func)
    return func


@main.command(context_settings=CONTEXT)
@click.option("--model", default="cifar10-cnn", show_default=True,
              help="cifar10-cnn, torchvision:<name>[:<weights>], or a .pt2/.pt file.")
@click.option("--attack", default="bim", show_default=True,
              help="fgsm, bim, pgd, mifgsm, ll-bim, cw or deepfool.")
@click.option("--eps", default="8/255", show_default=True, help="L-inf budget, e.g. 8/255 or 0.03.")
@click.option("--alpha", default=None, help="Step size of iterative attacks [default: 2/255].")
@click.option("--steps", default=None, type=int, help="Iterations [default: 10; cw and deepfool 50].")
@click.option("--n", default=1000, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@data_options
@common_options
def attack(model: str, attack: str, eps: str, alpha: str | None, steps: int | None, n: int, batch_size: int,
           out: str, data_dir: str | None, data_path: str | None, dataset: str, split: str, device: str, seed: int,
           as_json: bool) -> None:
    """Generate adversarial images and store them with predictions in OUT."""
    from .attackset import run_attack

    summary = run_attack(model=model, attack=attack, eps=eps, alpha=alpha, steps=steps, n=n, out=out, split=split,
                         dataset=dataset, data_dir=data_dir, data_path=data_path, batch_size=batch_size, seed=seed,
                         device=device, progress=not as_json or sys.stderr.isatty())
    emit(summary.to_dict(), as_json, lambda r: (
        f"{r['attack']['name']} eps={r['attack']['eps']:.4f} on {r['model']['name']}, {r['n']} images -> {r['out']}\n"
        f"clean accuracy        {pct(r['clean_accuracy'])}\n"
        f"adversarial accuracy  {pct(r['adversarial_accuracy'])}\n"
        f"attack success rate   {pct(r['success_rate'])}  (of correctly classified images)\n"
        f"time                  {r['seconds']:.1f}s"))


if __name__ == "__main__":
    main()
