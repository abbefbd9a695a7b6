"""Extremal perturbation of a layer's channels (``explain --layer``)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from advdetect.cli import main
from advdetect.errors import OptionError
from advdetect.masks.channels import ChannelConfig, ChannelExtremal

from ..conftest import SHARED_DATA, make_tiny_model, needs_builtin, needs_shared


def test_batched_masks_equal_masks_optimised_alone():
    model = make_tiny_model()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = ChannelConfig(area=0.25, iterations=40)
    together = ChannelExtremal(model, "3", cfg).attribute(x)
    for i in range(3):
        alone = ChannelExtremal(model, "3", cfg).attribute(x[i:i + 1])
        assert torch.allclose(alone.weights, together.weights[i:i + 1], atol=1e-5)
        assert alone.kept.tolist() == together.kept[i:i + 1].tolist()
    assert together.kept.shape == (3, 4)  # a quarter of 16 channels


def test_works_under_no_grad():
    model = make_tiny_model()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = ChannelConfig(iterations=5)
    with torch.no_grad():
        inside = ChannelExtremal(model, "3", cfg).attribute(x)
    assert torch.equal(inside.weights, ChannelExtremal(model, "3", cfg).attribute(x).weights)


def test_model_left_as_it_was_and_bad_layers_refused():
    model = make_tiny_model().train()
    flags = [p.requires_grad for p in model.parameters()]
    ChannelExtremal(model, "0", ChannelConfig(iterations=3)).attribute(torch.rand(2, 3, 16, 16))
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(OptionError, match="no layer 'conv9'.*its layers: 0, 1, 2"):
        ChannelExtremal(model, "conv9")
    with pytest.raises(OptionError, match="area"):
        ChannelConfig(area=1.5)


@needs_shared
@needs_builtin
def test_kept_channels_alone_preserve_the_class():
    """At the requested area (10% of groups.2's channels), the kept channels alone keep the class far
    better than as many random channels."""
    from advdetect.data import DataSpec, open_split, select
    from advdetect.models import load_model

    model = load_model("cifar10-cnn")
    x, _, _ = select(open_split(DataSpec(data_dir=str(SHARED_DATA)), "test", model.info), 16, 0).load()
    explainer = ChannelExtremal(model, "groups.2", ChannelConfig(area=0.1))
    result = explainer.attribute(x)
    channels, k = result.weights.shape[1], result.kept.shape[1]
    assert k == round(0.1 * channels)
    kept = torch.zeros(len(x), channels).scatter_(1, result.kept, 1.0)
    gen = torch.Generator().manual_seed(0)
    random = torch.zeros(len(x), channels).scatter_(
        1, torch.stack([torch.randperm(channels, generator=gen)[:k] for _ in range(len(x))]), 1.0)
    with torch.no_grad():
        with explainer._scaled(kept):
            kept_pred = model.logits(x).argmax(1)
        with explainer._scaled(random):
            random_prob = model.logits(x).softmax(1).gather(1, result.targets[:, None]).squeeze(1)
    assert (kept_pred == result.targets).float().mean() >= 0.9
    assert float(result.prob_kept.mean()) >= float(random_prob.mean()) + 0.3


@needs_shared
@needs_builtin
def test_explain_layer_command(tmp_path):
    image = next((SHARED_DATA / "cifar10-jpeg" / "test" / "cat").iterdir())
    result = CliRunner().invoke(main, ["explain", str(image), "--layer", "groups.2", "--area", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["layer"] == "groups.2" and row["n_kept"] == round(0.05 * row["channels"])
    assert 0 <= row["prob_kept"] <= 1 and len(row["top_channels"]) == min(10, row["n_kept"])
    bad = CliRunner().invoke(main, ["explain", str(image), "--layer", "nope"])
    assert bad.exit_code == 2 and "no layer 'nope'" in bad.output and "groups.2" in bad.output
    both = CliRunner().invoke(main, ["explain", str(image), "--layer", "groups.2", "--out", str(tmp_path / "f.png")])
    assert both.exit_code == 2 and "--out" in both.output
