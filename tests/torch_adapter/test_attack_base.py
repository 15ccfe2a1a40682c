"""Every attack of the library is an ``Attack``: one call path, one seed default, one vocabulary."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

import pytest
import torch
from torch import nn

import gdws_torch
from gdws_torch.robustness.attacks import PGD, Attack
from gdws_torch.robustness.checks import NORMS
from gdws_torch.robustness.evaluate import batch_outcomes


def package_attack_classes() -> dict[str, type]:
    """Every class of ``gdws_torch`` (all modules imported) called as
    ``attack(images, labels, ...)``: the attack protocol, whatever its base."""
    for module in pkgutil.walk_packages(gdws_torch.__path__, "gdws_torch."):
        if not module.name.endswith("__main__"):  # the CLI's entry point runs on import
            importlib.import_module(module.name)
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("gdws_torch"):
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not cls.__module__.startswith("gdws_torch") or cls is Attack:
                continue
            try:
                parameters = inspect.signature(cls.__call__).parameters
            except (TypeError, ValueError):
                continue
            if "images" in parameters and "labels" in parameters:
                found[cls.__qualname__] = cls
    return found


ATTACKS = package_attack_classes()
EXPECTED = {"PGD", "PGDL2", "PGDL1", "APGD", "APGDT", "FAB", "Square", "AutoAttack"}


def test_the_walk_finds_every_attack_the_package_exports():
    assert EXPECTED <= set(ATTACKS), sorted(ATTACKS)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_subclasses_the_base_and_keeps_its_call(name):
    cls = ATTACKS[name]
    assert issubclass(cls, Attack), f"{cls.__module__}.{name} does not subclass Attack"
    # One call path (checks, modes, sample ids) and one docstring: the base's.
    assert cls.__call__ is Attack.__call__
    assert "forward" in {k for c in cls.__mro__ if c is not Attack for k in vars(c)}
    assert cls.seeds_per_sample is True  # a class attribute, read by the callers
    assert set(cls.norms) <= set(NORMS)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_takes_torchattacks_keywords_with_seed_0_by_default(name):
    parameters = inspect.signature(ATTACKS[name]).parameters
    assert parameters["seed"].default == 0
    assert "eps" in parameters
    assert "restarts" not in parameters and "epsilon" not in parameters
    if "norm" in parameters:
        assert parameters["norm"].default == "Linf"


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()


class Shift(Attack):
    """A minimal subclass: a deterministic step along the sign of the gradient."""

    def __init__(self, model, eps=0.1, seed=0):
        super().__init__(model, norm="Linf", eps=eps, seed=seed)

    def forward(self, images, labels, *, sample_ids=None, top_label=None):
        self.seen = (self.model.training, sample_ids, top_label)
        with torch.enable_grad():
            point = images.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(self.model(point), labels)
            (grad,) = torch.autograd.grad(loss, point)
        return (images + self.eps * grad.sign()).clamp(0, 1)


def test_a_subclass_gets_the_checks_the_modes_and_the_sample_ids():
    model = small_model().train()
    attack = Shift(model)
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 9, 2])
    out = attack(x, y, sample_ids=[7, 8, 9, 10])
    assert out.shape == x.shape and not out.requires_grad
    training, ids, top = attack.seen
    assert training is False and model.training  # eval inside, restored after
    assert ids.tolist() == [7, 8, 9, 10] and top == 9
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        attack(x * 2, y)
    with pytest.raises(ValueError, match="sample_ids must be 4 integer"):
        attack(x, y, sample_ids=[1])
    with pytest.raises(TypeError, match=r"images have dtype torch\.float64"):
        attack(x.double(), y)
    with pytest.raises(RuntimeError, match=r"outside torch\.inference_mode"):
        with torch.inference_mode():
            attack(x, y)
    assert attack(x[:0], y[:0]).shape == (0, 1, 4, 4)  # forward not called
    with pytest.raises(ValueError, match=r"eps must be .* <= 1"):
        Shift(model, eps=8)
    with pytest.raises(TypeError, match="seed must be an integer"):
        Shift(model, seed=None)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        Shift(lambda images: images)


def test_callers_pass_sample_ids_only_to_attacks_that_declare_them():
    model = small_model()
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    calls = []

    def foreign(images, labels, sample_ids=None):  # takes the keyword, declares nothing
        calls.append(sample_ids)
        return images

    class Declaring:
        seeds_per_sample = True

        def __call__(self, images, labels, *, sample_ids=None):
            calls.append(sample_ids.tolist())
            return images

    batch_outcomes(model, x, y, {"a": foreign, "b": Declaring()}, torch.arange(4) + 5)
    assert calls == [None, [5, 6, 7, 8]]


def test_the_repr_names_the_settings():
    model = small_model()
    assert repr(PGD(model, eps=0.25, alpha=0.0625, steps=3, norm="L2")) == (
        "PGD(norm='L2', eps=0.25, alpha=0.0625, steps=3, random_start=True, n_restarts=1, "
        "early_stop=False, seed=0)"
    )
