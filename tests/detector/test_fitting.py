"""One data-parallel step gives the single-process gradient, dropout included; global state untouched."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from advdetect.detector import MaskAlexNet, MaskDetector
from advdetect.detector.fitting import minibatch_backward
from advdetect.distributed import Context, context
from advdetect.device import seeded

BATCH = 12


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.rand(BATCH, 1, 32, 32, generator=gen), (torch.arange(BATCH) % 2).float()


def step_gradient(ctx: Context, model_of=lambda net: net, dropout_seed: int = 7) -> dict[str, torch.Tensor]:
    with seeded(0):
        net = MaskAlexNet(dropout=0.5)
    net.train()
    xb, yb = batch()
    dropout = net.draw_dropout(BATCH, torch.Generator().manual_seed(dropout_seed), "cpu")
    minibatch_backward(model_of(net), net, xb, yb, dropout, ctx)
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:  # one process group (spawning costs most of the time), two steps
        shared = step_gradient(context(), lambda net: DistributedDataParallel(net), dropout_seed=7)
        # per-rank dropout (what the old code did: each rank drew its own) must give another gradient
        per_rank = step_gradient(context(), lambda net: DistributedDataParallel(net), dropout_seed=7 + rank)
        if rank == 0:
            save_file({f"shared.{k}": v for k, v in shared.items()} | {f"per_rank.{k}": v for k, v in per_rank.items()},
                      out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_gradient(tmp_path):
    one = step_gradient(Context())
    out = tmp_path / "grads.safetensors"
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    saved = load_file(str(out))
    for name in one:
        assert torch.allclose(one[name], saved[f"shared.{name}"], atol=1e-6, rtol=1e-5), name
    # the check can fail: dropout drawn per rank (as before) gives another gradient
    assert max(float((one[n] - saved[f"per_rank.{n}"]).abs().max()) for n in one) > 1e-3


def test_fit_leaves_global_random_state_and_is_reproducible():
    X, y = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 2
    state = torch.get_rng_state()
    a = MaskDetector(epochs=2, batch_size=16, seed=3).fit(X, y)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # another global state must not change the result
    b = MaskDetector(epochs=2, batch_size=16, seed=3).fit(X, y)
    assert np.array_equal(a.decision_function(X), b.decision_function(X))


def test_predict_agrees_with_predict_proba():
    X, y = torch.rand(60, 1, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(60) % 2
    det = MaskDetector(epochs=2, batch_size=16).fit(X, y)
    for fpr in (0.05, 0.3, 0.6):
        det.calibrate(X[:30], fpr=fpr)
        assert np.array_equal(det.predict(X), (det.predict_proba(X)[:, 1] > 0.5).astype(int))
        assert 0 < det.predict(X).sum() < len(X)


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    from advdetect.plots import explanation_figure

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's backend (a notebook's, say)
    try:
        explanation_figure(torch.rand(3, 8, 8), torch.rand(1, 8, 8), torch.rand(3, 8, 8), torch.rand(4).softmax(0),
                           torch.rand(4).softmax(0), ["a", "b", "c", "d"], 0, tmp_path / "f.png")
        assert matplotlib.get_backend() == "svg" and (tmp_path / "f.png").stat().st_size > 0
    finally:
        matplotlib.use(before)


def test_attacks_leave_global_random_state():
    from advdetect.attacks import AttackConfig, attack_batch

    from ..conftest import make_tiny_model

    model = make_tiny_model()
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
    state = torch.get_rng_state()
    a = attack_batch(model, x, y, AttackConfig("pgd"), seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, attack_batch(model, x, y, AttackConfig("pgd"), seed=11))


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_drawn_dropout_keeps_the_expected_scale(p):
    net = MaskAlexNet(dropout=p)
    masks = net.draw_dropout(2000, torch.Generator().manual_seed(0), "cpu")
    assert len(masks) == 2 and masks[0].shape == (2000, 64 * 16) and masks[1].shape == (2000, 256)
    assert abs(float(masks[0].mean()) - 1) < 0.02
