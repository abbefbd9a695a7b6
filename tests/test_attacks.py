from __future__ import annotations

import pytest
import torch

from advdetect.attacks import ATTACKS, LINF_ATTACKS, AttackConfig, attack_batch, parse_eps
from advdetect.errors import AdvDetectError, UnknownNameError

# eps per attack for the tiny random model: ll-bim must push every image to one fixed class,
# which takes a larger budget than an untargeted misclassification.
EPS = {"ll-bim": 16 / 255}


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_budget_range_and_effect(name, tiny_model, tiny_images):
    labels = tiny_model.predict(tiny_images)
    eps = EPS.get(name, 8 / 255)
    adv = attack_batch(tiny_model, tiny_images, labels, AttackConfig(name, eps=eps), seed=0)
    assert adv.shape == tiny_images.shape and adv.dtype == torch.float32
    assert adv.min() >= 0 and adv.max() <= 1
    if name in LINF_ATTACKS:
        assert (adv - tiny_images).abs().max() <= eps + 1e-6
    else:  # cw and deepfool are L2 attacks: small perturbations, no L-inf budget
        assert (adv - tiny_images).flatten(1).norm(dim=1).median() < 1.0
    changed = (tiny_model.predict(adv) != labels).float().mean().item()
    assert changed >= 0.9, f"{name} changed only {changed:.0%} of predictions"


def test_attack_leaves_model_as_it_was(tiny_model, tiny_images):
    tiny_model.train()
    tiny_model.net[1].eval()  # a mixed state must come back exactly
    flags = [p.requires_grad for p in tiny_model.parameters()]
    attack_batch(tiny_model, tiny_images[:8], torch.zeros(8, dtype=torch.long), AttackConfig("pgd"), seed=0)
    assert tiny_model.training and not tiny_model.net[1].training
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())


def test_pgd_is_deterministic_for_a_seed(tiny_model, tiny_images):
    y = tiny_model.predict(tiny_images)
    a = attack_batch(tiny_model, tiny_images, y, AttackConfig("pgd"), seed=3)
    b = attack_batch(tiny_model, tiny_images, y, AttackConfig("pgd"), seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.03", 0.03), (" 1/255 ", 1 / 255), (0.5, 0.5), ("1", 1.0)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["8/0", "-1", "abc", "0", "2", "", "nan"])
def test_parse_eps_rejects(text):
    with pytest.raises(AdvDetectError, match="epsilon"):
        parse_eps(text)


def test_unknown_attack_lists_choices():
    with pytest.raises(UnknownNameError, match="fgsm, bim, pgd"):
        AttackConfig("fgsmm")


def test_defaults_are_documented_values():
    assert AttackConfig("bim").to_dict() == {"name": "bim", "eps": 8 / 255, "alpha": 2 / 255, "steps": 10}
    assert AttackConfig("fgsm").to_dict()["alpha"] is None
    assert AttackConfig("cw").resolved_steps == 50
